"""What a tiny-model builder declares about its family, plus shared helpers."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent.parent / "assets"


@dataclass(frozen=True)
class TinySpec:
    name: str  # e.g. "qwen2_5_vl"
    build: Callable[[Path], object]  # writes model + processor (save_pretrained) into the folder
    model_type: str  # config.model_type, the key of vlmtune's family table
    multi_image: bool = True  # several images in one sample
    video: bool = False  # a video sample (frames as a list of PIL images)
    text_only: bool = True  # text-only samples train beside image samples


def deep_update(base: dict, over: dict) -> dict:
    """A copy of `base` with `over` merged in, nested dicts key by key (shrinking a real config.json)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_update(out[key], value) if nested else value
    return out
