"""Tiny randomly initialised models of every family, with the real processors and chat templates.

Each group module (qwen.py, gemma.py, ...) exposes ``SPECS: list[TinySpec]``. ``scripts/make_tiny_models.py``
writes them to a folder; the tests build them once per session. Real processor files live in
``tests/assets/<family>/`` (copied from the official model repos, see each folder's SOURCE.md).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tiny.common import TinySpec

GROUPS = ("qwen", "gemma", "smolvlm", "llava", "internvl", "llama4", "mistral3", "kimi_vl", "nemotron_parse")


def all_specs() -> dict[str, TinySpec]:
    specs: dict[str, TinySpec] = {}
    for group in GROUPS:
        try:
            module = importlib.import_module(f"tiny.{group}")
        except ModuleNotFoundError as e:
            if e.name != f"tiny.{group}":
                raise
            continue
        specs.update({s.name: s for s in module.SPECS})
    return specs


def chat_specs() -> dict[str, TinySpec]:
    """The specs of chat families (Family.encoding "chat": the generic matrix of tests/test_families.py); the
    encoder-decoder Nemotron-Parse has its own (tests/test_nemotron_parse_training.py)."""
    from vlmtune.families import family_for

    return {name: s for name, s in all_specs().items() if family_for(s.model_type).encoding == "chat"}


def build(name: str, root: Path) -> Path:
    """Build (once) the tiny model `name` under `root` and return its folder. Safe to call from several processes
    at once (pytest-xdist workers): a file lock beside the folder serialises the build."""
    from filelock import FileLock

    spec = all_specs()[name]
    out = Path(root) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            spec.build(out)
    return out
