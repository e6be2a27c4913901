"""Shared fixtures: a tiny Qwen2.5-VL with the real Qwen processor, and synthetic cord-v2 data, built once."""

from __future__ import annotations

import os

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from vlmtune.demo import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def cord_dir(tmp_path_factory):
    from vlmtune.data.synthetic import write_synthetic_cord

    return write_synthetic_cord(tmp_path_factory.mktemp("data") / "cord", n_train=16, n_validation=4)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def encoder(processor):
    from vlmtune.collate import SampleEncoder
    from vlmtune.families import family_for

    return SampleEncoder(processor, family_for("qwen2_5_vl"), max_length=1024)


@pytest.fixture(scope="module")
def image_batch(cord_dir, encoder):
    """Two collated validation receipts of the tiny Qwen2.5-VL."""
    from vlmtune.collate import collate
    from vlmtune.config import DataSource
    from vlmtune.data.dataset import SFTDataset

    ds = SFTDataset(DataSource(source=str(cord_dir), format="cord_v2", split="validation"), encoder, "v")
    return collate([ds[0], ds[1]], pad_id=151643)


def small_recipe(model_dir, data_dir, out_dir, **train) -> dict:
    """A recipe tree for fast loop tests on the tiny model."""
    return {
        "output_dir": str(out_dir),
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"source": str(data_dir), "format": "cord_v2"},
                 "validation": {"source": str(data_dir), "format": "cord_v2", "split": "validation"}},
        "train": {"max_steps": 2, "micro_batch_size": 1, "global_batch_size": 2, "lr": 1e-3, "seed": 0,
                  "max_length": 512, **train},
    }
