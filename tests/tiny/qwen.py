"""Qwen-VL family tiny models."""

from __future__ import annotations

from pathlib import Path

from tiny.common import TinySpec
from vlmtune.demo import build_tiny_qwen2_5_vl


def build_qwen2_5_vl(out: Path) -> Path:
    return build_tiny_qwen2_5_vl(out)


SPECS = [TinySpec("qwen2_5_vl", build_qwen2_5_vl, "qwen2_5_vl")]
