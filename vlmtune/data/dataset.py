"""Rows -> Conversations, lazily (in DataLoader workers), and a resumable sampler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from vlmtune.data.formats import Conversation, resolve_format, to_conversation
from vlmtune.data.media import DEFAULT_MAX_PIXELS
from vlmtune.data.sources import load_rows
from vlmtune.data.video import VideoSampling

if TYPE_CHECKING:
    from vlmtune.config import DataSource


class ConversationDataset:
    """The rows of one data source as Conversations. ``conversation(i)`` raises SampleError for a bad record.

    Whether a sample is bad is decided by the sample alone, so a run (and a resumed run) skips the same samples.
    """

    def __init__(self, spec: DataSource, where: str, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 video: VideoSampling | None = None):
        self.spec, self.where, self.max_image_pixels = spec, where, max_image_pixels
        self.video = video or VideoSampling()
        self.rows, self.base_dir = load_rows(spec, where)
        self.format = resolve_format(list(self.rows.column_names), spec, where)

    def __len__(self) -> int:
        return len(self.rows)

    def conversation(self, index: int) -> Conversation:
        return to_conversation(self.rows[index], self.format, self.spec, self.base_dir, index, self.max_image_pixels,
                               self.video)


class EpochSampler(Sampler[int]):
    """A fresh seeded permutation each epoch; this rank takes every world-th index.

    Its position is (epoch, offset): restoring both resumes the exact index stream.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world, self.shuffle = size, seed, rank, world, shuffle
        self.epoch, self.offset = 0, 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            idx = list(range(self.size))
        else:
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(self.size, generator=g).tolist()
        usable = len(idx) - len(idx) % self.world  # equal share per rank keeps collectives in step
        return idx[self.rank : usable : self.world]

    def __len__(self) -> int:
        return self.size // self.world

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)[self.offset :]
