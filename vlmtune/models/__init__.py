"""Model families that transformers does not carry, built from its components and registered with its Auto
classes (its extension point) by :func:`register_native_models`, which vlmtune calls before it loads a model.
Nothing happens at import time, and nothing in transformers is replaced."""

from __future__ import annotations

import importlib

# Packages under vlmtune/models, each with a ``register()`` that adds its config, model and processor classes.
NATIVE = ("kimi_vl", "nemotron_parse")


def register_native_models() -> None:
    """Register every native family with transformers' Auto classes (idempotent)."""
    for name in NATIVE:
        try:
            module = importlib.import_module(f"vlmtune.models.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"vlmtune.models.{name}":
                raise
            continue
        module.register()
