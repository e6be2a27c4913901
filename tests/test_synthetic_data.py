"""The synthetic cord-v2 receipts: schema, determinism, consistency, and the load path a real copy takes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import PIL.Image
import pytest

from vlmtune.config import DataSource
from vlmtune.data.formats import CORD_PROMPT, detect_format, to_conversation, tokens_to_json
from vlmtune.data.sources import load_rows
from vlmtune.data.synthetic import STAMP, write_synthetic_cord


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def generated(offline, tmp_path_factory) -> tuple[Path, float]:
    folder = tmp_path_factory.mktemp("synth") / "cord"
    start = time.perf_counter()
    write_synthetic_cord(folder)  # the defaults: 64 train, 8 validation
    return folder, time.perf_counter() - start


@pytest.fixture(scope="module")
def splits(generated) -> dict:
    import datasets

    return {split: datasets.load_dataset(str(generated[0]), split=split) for split in ("train", "validation")}


def amount(text: str) -> int:
    return int(text.replace(",", ""))


def test_layout_sizes_features_and_speed(generated, splits):
    import datasets

    folder, seconds = generated
    assert seconds < 5
    assert sorted(p.name for p in (folder / "data").iterdir()) == ["train-00000-of-00001.parquet",
                                                                   "validation-00000-of-00001.parquet"]
    assert (folder / "README.md").read_text().startswith("---\n")
    assert len(splits["train"]) == 64 and len(splits["validation"]) == 8
    assert splits["train"].features == datasets.Features({"image": datasets.Image(),
                                                          "ground_truth": datasets.Value("string")})
    assert detect_format(splits["train"].column_names) == "cord_v2"


def test_cord_schema_and_consistent_totals(splits):
    shapes = set()
    for split, cord_split in (("train", "train"), ("validation", "dev")):
        for i, row in enumerate(splits[split]):
            gt = json.loads(row["ground_truth"])
            assert list(gt) == ["gt_parse", "meta", "valid_line", "roi", "repeating_symbol", "dontcare"]
            assert gt["meta"] == {"version": "2.0.0", "split": cord_split, "image_id": i,
                                  "image_size": {"width": 224, "height": 224}}
            parse = gt["gt_parse"]
            assert list(parse) == ["menu", "sub_total", "total"]
            menu = parse["menu"] if isinstance(parse["menu"], list) else [parse["menu"]]
            shapes.add(type(parse["menu"]).__name__)
            shapes.update("sub" for item in menu if "sub" in item)
            assert all(2 <= len(item["nm"]) <= 12 and item["cnt"].isdigit() for item in menu)
            subtotal = sum(amount(it["price"]) + amount(it.get("sub", {}).get("price", "0")) for it in menu)
            assert amount(parse["sub_total"]["subtotal_price"]) == subtotal
            tax = amount(parse["sub_total"]["tax_price"])
            assert tax == subtotal // 10 and amount(parse["total"]["total_price"]) == subtotal + tax
            assert row["image"].size == (224, 224)
    assert shapes == {"dict", "list", "sub"}  # the CORD quirks all occur


def test_image_shows_the_receipt(splits):
    dark = sum(splits["train"][0]["image"].convert("L").histogram()[:128])
    assert 500 < dark < 224 * 224 // 4  # text drawn, not blank, not black


def test_same_seed_same_bytes_and_stamp_skips(offline, generated, tmp_path):
    folder, _ = generated
    args = {"n_train": 6, "n_validation": 2, "seed": 3, "image_size": (160, 200)}
    first, second = write_synthetic_cord(tmp_path / "a", **args), write_synthetic_cord(tmp_path / "b", **args)
    names = ["data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet", "README.md", STAMP]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = write_synthetic_cord(tmp_path / "c", **{**args, "seed": 4})
    assert (other / names[0]).read_bytes() != (first / names[0]).read_bytes()

    stamp_time = (first / names[0]).stat().st_mtime_ns
    write_synthetic_cord(first, **args)  # same arguments: nothing rewritten
    assert (first / names[0]).stat().st_mtime_ns == stamp_time
    write_synthetic_cord(first, **{**args, "n_validation": 0})  # new arguments: regenerated, stale split gone
    assert not (first / names[1]).exists()
    assert json.loads((first / STAMP).read_text())["n_validation"] == 0
    (first / STAMP).write_text("{damaged")  # an interrupted run: regenerated, not trusted
    write_synthetic_cord(first, **args)
    assert (first / names[1]).read_bytes() == (second / names[1]).read_bytes()

    import datasets

    assert len(datasets.load_dataset(str(first), split="train")) == 6
    # the default folder was generated once and is not touched by a repeat call
    before = (folder / names[0]).stat().st_mtime_ns
    write_synthetic_cord(folder)
    assert (folder / names[0]).stat().st_mtime_ns == before


def test_rows_become_conversations(generated):
    folder, _ = generated
    spec = DataSource(source=str(folder), split="validation", limit=3)
    rows, base_dir = load_rows(spec, "data.validation")
    assert len(rows) == 3 and base_dir == folder
    for i, row in enumerate(rows):
        conv = to_conversation(row, "cord_v2", spec, base_dir, i)
        (user, assistant) = conv
        assert user["role"] == "user" and user["content"][1] == {"type": "text", "text": CORD_PROMPT}
        assert isinstance(user["content"][0]["image"], PIL.Image.Image)
        target = assistant["content"][0]["text"]
        assert target.startswith("<s_menu>") and tokens_to_json(target) == json.loads(row["ground_truth"])["gt_parse"]
