"""Each kind of bad input gets a clear error, or is skipped, counted and reported."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from vlmtune.cli import main


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """Each model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


GOOD = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                             {"from": "gpt", "value": "Red."}]}


def write_run(tmp_path, model_dir, records, **train):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"source": str(data)}},
        "train": {"max_steps": 1, "micro_batch_size": 1, "global_batch_size": len(records), "lr": 1e-4,
                  "max_length": 200, **train}}))
    return recipe


def summary(tmp_path):
    return json.loads((tmp_path / "out" / "summary.json").read_text())




def test_skips_by_reason(tmp_path, tiny_model_dir, capsys):
    records = [GOOD] * 5 + [
        {**GOOD, "image": "broken.png"},
        {**GOOD, "image": "missing.png"},
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image><image>Two?"},
                                              {"from": "gpt", "value": "No."}]},
        {**GOOD, "conversations": [{"from": "human", "value": "<image>\n" + "long " * 400},
                                   {"from": "gpt", "value": "Red."}]},
    ]
    recipe = write_run(tmp_path, tiny_model_dir, records)
    assert main(["finetune", "-c", str(recipe)]) == 0
    s = summary(tmp_path)
    assert s["skipped"] == {"unreadable_image": 2, "placeholder_mismatch": 1, "too_long": 1}
    assert s["samples_seen"] == 9
    out = capsys.readouterr().out
    assert "skipped 4 of 9 samples" in out and "broken.png" in out and "train.max_length=200" in out


def test_overlong_text_can_be_truncated_after_the_last_image(tmp_path, tiny_model_dir):
    long_answer = {**GOOD, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                             {"from": "gpt", "value": "red " * 400}]}
    recipe = write_run(tmp_path, tiny_model_dir, [GOOD, long_answer], overlong="truncate_text")
    assert main(["finetune", "-c", str(recipe)]) == 0
    s = summary(tmp_path)
    assert s["skipped"] == {}
    line = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["tokens"] > 200  # the truncated sample (200 tokens) plus the short one


@pytest.mark.parametrize("max_length", [16, 20])  # 16 cuts through the image tokens; 20 cuts the whole answer
def test_truncation_never_cuts_images_or_keeps_answerless_samples(tmp_path, tiny_model_dir, capsys, max_length):
    recipe = write_run(tmp_path, tiny_model_dir, [GOOD, GOOD], overlong="truncate_text", max_length=max_length)
    assert main(["finetune", "-c", str(recipe)]) == 2  # every sample dropped: the run stops, clearly
    err = capsys.readouterr().err
    assert "2 of the first 2 samples were unusable" in err and "2 x too_long" in err


def test_mostly_bad_data_stops_the_run(tmp_path, tiny_model_dir, capsys):
    records = [GOOD] * 4 + [{**GOOD, "image": "broken.png"}] * 16
    recipe = write_run(tmp_path, tiny_model_dir, records)
    assert main(["finetune", "-c", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "16 of the first 20 samples were unusable" in err and "data.max_bad_fraction=0.5" in err
    assert "unreadable_image" in err


def test_missing_column_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    recipe = write_run(tmp_path, tiny_model_dir, [{"image": "ok.png", "question": "Colour?"}])
    assert main(["finetune", "-c", str(recipe), "data.train.format=columns"]) == 2
    err = capsys.readouterr().err
    assert "data.train" in err and "'answer'" in err and "found columns" in err


def test_unknown_config_key_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    recipe = write_run(tmp_path, tiny_model_dir, [GOOD])
    assert main(["finetune", "-c", str(recipe), "train.learning_rate=1e-4", "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "did you mean 'train.max_steps'" in err and "train.learning_rate" in err


def test_unreachable_hub_ids_fail_with_a_clear_message(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_run(tmp_path, tiny_model_dir, [GOOD])
    assert main(["finetune", "-c", str(recipe), "model.name_or_path=nobody/no-such-vlm"]) == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-vlm" in err and "offline" in err and "model.name_or_path" in err
    assert main(["finetune", "-c", str(recipe), "data.train.source=nobody/no-such-dataset"]) == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-dataset" in err and "local" in err


@pytest.mark.parametrize("family_type", ["not_a_vlm"])
def test_unknown_family_is_a_clear_error(family_type):
    from vlmtune.families import FamilyError, family_for

    with pytest.raises(FamilyError, match="family table"):
        family_for(family_type)


def one_line_error(capsys) -> str:
    """What the CLI printed for an error: one 'vlmtune finetune: error:' message, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and "vlmtune finetune: error:" in err, err
    return err


def test_packing_refused_for_a_family_exits_2(tmp_path, tiny_model, capsys):
    """PackingError used to reach users as a traceback."""
    recipe = write_run(tmp_path, tiny_model("qwen3_5"), [GOOD], packing=True)
    assert main(["finetune", "-c", str(recipe)]) == 2
    assert "train.packing=true is not supported for qwen3_5" in one_line_error(capsys)


def test_distributed_setting_that_cannot_work_exits_2(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """DistributedError used to reach users as a traceback (here: two ranks asked to train unrelated copies)."""
    monkeypatch.setattr("vlmtune.train.world", lambda: (0, 2))
    recipe = write_run(tmp_path, tiny_model_dir, [GOOD, GOOD])
    assert main(["finetune", "-c", str(recipe), "distributed.strategy=none"]) == 2
    assert "distributed.strategy=none with 2 processes" in one_line_error(capsys)


def test_global_batch_that_the_ranks_cannot_split_exits_2(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A bare ValueError used to reach users as a traceback; now a recipe error, before the model loads."""
    monkeypatch.setattr("vlmtune.train.world", lambda: (0, 3))
    monkeypatch.setattr("vlmtune.train.build_model", lambda *a: pytest.fail("the model loaded first"))
    recipe = write_run(tmp_path, tiny_model_dir, [GOOD] * 4)  # global 4, micro 1, 3 ranks
    assert main(["finetune", "-c", str(recipe)]) == 2
    err = one_line_error(capsys)
    assert "train.global_batch_size: 4 is not a multiple of train.micro_batch_size (1) x the world size (3)" in err
