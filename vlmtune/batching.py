"""A step's samples -> its micro-batches: grouping (fixed size or token budget), the same count on every rank,
a vision filler row when several ranks run, and padding-free packing. The loop plans a step at once
(:meth:`Batcher.plan`) and takes the collated micro-batches from a helper thread that works ahead of it
(:meth:`Batcher.stream`), page-locked on CUDA so the copies to the device do not block.

Packing puts a micro-batch's samples into one row. Each sample keeps the positions it would have had alone
(for the Qwen families the 3-D mRoPE positions the model's own ``get_rope_index`` computes, plus a leading row
of 1-D text positions, the layout transformers reads as "packed"), and no ``attention_mask`` is passed, so
with ``train.attention: varlen`` the batcher adds the row's sample boundaries (``cu_seq_lens_q`` ...), computed
here on the host, which vlmtune/attention.py attends in one variable-length call per layer; otherwise
transformers builds a block-diagonal causal mask from the positions, which vlmtune/attention.py turns into sdpa
per sample (flash_attention_2: transformers' varlen path): attention never crosses samples. Labels never cross
either: each sample's first token is never a target. ``extras`` (vlmtune.attention.host_inputs) adds what the
model's attention reads besides: packed-row boundaries and the vision towers' segments.
tests/test_packing.py checks, per family, that packed logits and losses equal the padded ones.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vlmtune.encode import IGNORE, Encoded
from vlmtune.errors import PackingError
from vlmtune.families import Family
from vlmtune.loss import supervised_count
from vlmtune.parallel import max_over_ranks

VISION_PREFIX = "pixel_values"


def check_packing(family: Family) -> None:
    if family.no_packing:
        raise PackingError(f"train.packing=true is not supported for {family.name} models: {family.no_packing}. "
                           "Set train.packing=false (train.micro_batch_tokens still keeps padding low).")


def collate(samples: Sequence[Encoded], pad_id: int, pin: bool = False) -> dict[str, torch.Tensor]:
    """Pad sequence-aligned tensors on the right; concatenate the vision tensors (into page-locked memory if
    `pin`). The result is the model's inputs plus ``labels`` (see vlmtune.loss.model_inputs)."""
    kept = list(samples)
    batch: dict[str, torch.Tensor] = {}
    if not kept:
        return batch
    width = max(e.length for e in kept)
    keys = {k for e in kept for k in e.tensors}
    seq_keys = set(kept[0].seq_keys)
    for key in sorted(keys):
        if key in seq_keys:
            fill = pad_id if key == kept[0].ids_key else IGNORE if key == "labels" else 0
            rows = [torch.nn.functional.pad(e.tensors[key], (0, width - e.length), value=fill) for e in kept]
            batch[key] = torch.stack(rows)
        else:
            parts = _zero_pad_trailing([e.tensors[key] for e in kept if key in e.tensors])
            dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))  # as torch.cat would
            out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=dtype, pin_memory=pin)
            batch[key] = torch.cat(parts, out=out)
    return batch


def _zero_pad_trailing(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad all dimensions but the first to the largest among `tensors`, as a processor pads its own batch:
    Idefics3 / SmolVLM return (1, images, C, H, W) per sample and skip the all-zero padding images."""
    shape = tuple(max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=True))
    padded = []
    for t in tensors:
        if t.shape[1:] != shape:
            t, small = t.new_zeros((t.shape[0], *shape)), t
            t[tuple(slice(0, n) for n in small.shape)] = small
        padded.append(t)
    return padded


def _buckets(samples: list[Encoded], keys: tuple[str, ...]) -> list[list[int]]:
    """Indices of `samples` by the shapes of `keys` beyond the first dimension (one bucket without keys)."""
    buckets: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        buckets.setdefault(tuple(tuple(s.tensors[k].shape[1:]) if k in s.tensors else None for k in keys), []).append(i)
    return list(buckets.values())


def has_vision(sample: Encoded) -> bool:
    return any(k.startswith(VISION_PREFIX) for k in sample.tensors)


def group(lengths: Sequence[int], size: int, budget: int | None, packed: bool) -> list[list[int]]:
    """Indices of the step's samples, grouped into micro-batches.

    No budget: runs of `size` samples in order. A budget: first-fit by decreasing length, a micro-batch costing
    the sum of its lengths when packed, else rows x its longest (the padded size), so batches come out full.
    """
    if budget is None:
        return [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for g in groups:
            cost = sum(lengths[j] for j in g) + lengths[i] if packed else lengths[g[0]] * (len(g) + 1)
            if cost <= budget:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def equalize(groups: list[list[int]], count: int) -> list[list[int]]:
    """Split the largest micro-batches until there are `count` (the most any rank has): FSDP / DDP collectives
    need every rank to run the same number of forwards. A rank out of samples gets empty ones (filler only)."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        biggest = max(groups, key=len, default=[])
        if len(biggest) < 2:
            groups.append([])
            continue
        groups.remove(biggest)
        half = len(biggest) // 2
        groups += [biggest[:half], biggest[half:]]
    return groups


def filler_sample(encoder) -> Encoded:
    """A tiny one-image sample that trains nothing: added to micro-batches without images when several ranks
    run, so every rank runs the vision tower (an FSDP2 unit; DDP with a trained tower) in every forward."""
    import PIL.Image

    image = PIL.Image.new("RGB", (64, 64), (128, 128, 128))
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "."}]}]
    sample = encoder(conversation, -1)
    sample.tensors["labels"] = torch.full_like(sample.tensors["labels"], IGNORE)
    return sample


Extras = Callable[[dict], dict]


def micro_batch(samples: list[Encoded], pad_id: int, packed: bool = False, rope: torch.nn.Module | None = None,
                extras: Extras | None = None, pin: bool = False) -> dict[str, torch.Tensor]:
    """Collate one micro-batch, packed into one row if `packed` (`rope`: see :func:`rope_index_module`);
    `extras(batch)` adds the attention's host-side keywords; `pin`: every tensor in page-locked memory."""
    batch = collate(samples, pad_id, pin)
    batch = pack(batch, rope) if packed else batch
    if extras is not None and batch:
        batch.update(extras(batch))
    if pin:  # the large vision tensors were collated into page-locked memory; the rest are small
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) and not v.is_pinned() else v
                 for k, v in batch.items()}
    return batch


@dataclass
class MicroBatch:
    """One forward's tensors (the model's inputs plus ``labels``) and the dataset indices of its real samples."""

    tensors: dict[str, torch.Tensor]
    indices: list[int]  # a filler row is not among them


@dataclass
class Plan:
    """A step's micro-batches on this rank before they are collated: the rows of each, and what the loop counts."""

    rows: list[list[Encoded]]  # as many micro-batches on every rank; a filler row where one is added
    supervised: int  # targets trained, as the collated labels hold them (the loss is normalised by it first)
    padding: int  # pad positions of the collated micro-batches (0 when packed)
    vision_samples: int  # real samples with images or video


@dataclass
class Batcher:
    """Loaded samples -> the micro-batches one rank runs: grouped by count or token
    budget, as many on every rank (all-reduced), packed or padded, with a vision filler row when distributed.
    :meth:`plan` decides (cheap, on the loop's thread: it takes part in a collective); :meth:`stream` collates."""

    pad_id: int
    size: int
    budget: int | None
    packed: bool
    rope: torch.nn.Module | None
    filler: Encoded | None
    uniform: tuple[str, ...] = ()  # Family.uniform_media: samples whose shapes of these differ never share one
    extras: Extras | None = None  # vlmtune.attention.host_inputs
    pin: bool = False  # CUDA: page-locked tensors, so the loop's non-blocking copies run beside the device's work

    def plan(self, samples: list[Encoded]) -> Plan:
        groups = []
        for bucket in _buckets(samples, self.uniform):
            groups += [[bucket[i] for i in g] for g in group([samples[i].length for i in bucket], self.size,
                                                             self.budget, self.packed)]
        groups = equalize(groups, max_over_ranks(len(groups)))
        rows = [[samples[i] for i in g] for g in groups]
        if self.filler is not None:
            rows = [r if any(has_vision(s) for s in r) else [*r, self.filler] for r in rows]
        padding = 0 if self.packed else sum(len(r) * max(s.length for s in r) - sum(s.length for s in r)
                                            for r in rows if r)
        return Plan(rows, sum(supervised_count(s.tensors["labels"][None]) for s in samples), padding,
                    sum(has_vision(s) for s in samples))

    def collate(self, rows: list[Encoded]) -> MicroBatch:
        tensors = micro_batch(rows, self.pad_id, self.packed, self.rope, self.extras, self.pin)
        return MicroBatch(tensors, [s.index for s in rows if s is not self.filler])

    def __call__(self, samples: list[Encoded]) -> list[MicroBatch]:
        """All of them at once (validation, tests)."""
        return [self.collate(r) for r in self.plan(samples).rows]

    def stream(self, plan: Plan, ahead: int = 2) -> Iterator[MicroBatch]:
        """The plan's micro-batches in order, each collated (packed, pinned) on a helper thread up to `ahead`
        before the loop takes it: the host prepares micro-batch i + 1 while the device runs micro-batch i, even
        where the forward waits on the device. A collation error is raised here, in the loop's thread."""
        with ThreadPoolExecutor(1, thread_name_prefix="vlmtune-collate") as pool:
            pending = deque(pool.submit(self.collate, r) for r in plan.rows[:ahead])
            for rows in plan.rows[ahead:] + [None] * len(pending):
                done = pending.popleft().result()
                if rows is not None:
                    pending.append(pool.submit(self.collate, rows))
                yield done


# ---------------------------------------------------------------------------------------------------------
# Packing


def rope_index_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose ``get_rope_index`` computes mRoPE positions (Qwen families), or None (1-D positions)."""
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module
    return None


def padded_positions(batch: dict, rope: torch.nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(text positions (B, W), mRoPE positions (3, B, W) or None) of a right-padded batch, as the model
    would compute them for it."""
    mask = batch["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if rope is None:
        return text, None
    if not any(k in batch for k in ("image_grid_thw", "video_grid_thw")):  # text only: 1-D positions x 3
        return text, text.unsqueeze(0).expand(3, -1, -1)
    params = inspect.signature(rope.get_rope_index).parameters
    kwargs = {k: v for k, v in batch.items() if k in params and k != "input_ids"}
    with torch.no_grad():
        mrope, _ = rope.get_rope_index(batch["input_ids"], **kwargs)
    return text, mrope


def pack(batch: dict, rope: torch.nn.Module | None = None) -> dict:
    """One row holding every sample of a padded `batch`, without its padding."""
    text, mrope = padded_positions(batch, rope)
    keep = batch["attention_mask"].bool()
    width = batch["attention_mask"].shape[1]
    out = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == width and \
                value.shape[0] == keep.shape[0]:
            value = value[keep].unsqueeze(0)
        out[key] = value
    flat_text = text[keep].unsqueeze(0)
    out["labels"] = out["labels"].masked_fill(flat_text == 0, IGNORE)  # a sample's first token: no target
    out["position_ids"] = flat_text if mrope is None else torch.cat([flat_text[None], mrope[:, keep][:, None]])
    return out
