"""Assistant-only labels, verified by decoding: every data format, single- and multi-turn, via `vlmtune inspect`."""

from __future__ import annotations

import json

import datasets
import pytest
import yaml
from PIL import Image

from vlmtune.cli import main
from vlmtune.data.formats import json_to_tokens
from vlmtune.encode import IGNORE, assistant_spans

END = "<|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """Each model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


def write_images(folder, n=2):
    colours = ["red", "blue", "green"]
    for i in range(n):
        Image.new("RGB", (64 + 16 * i, 48), colours[i]).save(folder / f"img{i}.png")


def two_turn_messages():
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the border?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue, 2 px wide."}]},
    ]


# format -> (record, expected answers)
CASES = {
    "messages": ({"messages": two_turn_messages(), "images": ["img0.png"]}, ["A red square.", "Blue, 2 px wide."]),
    "messages_single": (
        {"messages": two_turn_messages()[:2], "images": ["img0.png"]}, ["A red square."]),
    "messages_system": (
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "You read receipts."}]},
                      *two_turn_messages()[:2]], "images": ["img0.png"]}, ["A red square."]),
    "llava": ({"id": "x", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes, quite sure."}]},
        ["A red square.", "Yes, quite sure."]),
    "llava_single": ({"id": "x", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red square."}]},
        ["A red square."]),
    "sharegpt": ({"conversations": [
        {"from": "human", "value": "<image><image>Compare them."}, {"from": "gpt", "value": "Left is red."},
        {"from": "human", "value": "And the right one?"}, {"from": "gpt", "value": "Blue."}],
        "images": ["img0.png", "img1.png"]}, ["Left is red.", "Blue."]),
    "sharegpt_single": ({"conversations": [
        {"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Red."}],
        "images": ["img0.png"]}, ["Red."]),
    "columns": ({"image": "img0.png", "question": "What colour?", "answer": "Red."}, ["Red."]),
    "rdr": ({"image": "img1.png", "text": "A blue rectangle on nothing."}, ["A blue rectangle on nothing."]),
}


def inspect_json(tmp_path, model_dir, record, fmt="auto", index=0, suffix=".jsonl"):
    write_images(tmp_path)
    data = tmp_path / f"data{suffix}"
    data.write_text(json.dumps(record) + "\n" if suffix == ".jsonl" else json.dumps([record]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)},
                                      "data": {"train": {"source": str(data), "format": fmt}},
                                      "train": {"max_steps": 1}}))
    out = tmp_path / "inspect.json"
    assert main(["inspect", "-c", str(recipe), "--index", str(index), "--format", "json", "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_spans_are_exactly_the_answers(tmp_path, tiny_model_dir, case):
    record, answers = CASES[case]
    fmt = {"rdr": "rdr", "columns": "columns"}.get(case, "auto")
    got = inspect_json(tmp_path, tiny_model_dir, record, fmt)
    assert got["trained_spans"] == [a + END for a in answers]
    assert len(got["labels"]) == len(got["input_ids"])
    # Labels equal the ids where trained, and nothing else (system prompt, user turns, images) is trained.
    trained = [(i, lab) for i, lab in zip(got["input_ids"], got["labels"], strict=True) if lab != IGNORE]
    assert all(i == lab for i, lab in trained)
    assert "You are a helpful assistant." in got["text"] or case == "messages_system"  # Qwen2 default system


def test_image_tokens_never_trained(tmp_path, tiny_model_dir, processor):
    got = inspect_json(tmp_path, tiny_model_dir, CASES["sharegpt"][0])
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_positions = [p for p, i in enumerate(got["input_ids"]) if i == image_id]
    assert len(image_positions) > 0
    assert all(got["labels"][p] == IGNORE for p in image_positions)


def test_json_file_and_cord_format(tmp_path, tiny_model_dir, cord_dir):
    got = inspect_json(tmp_path, tiny_model_dir, CASES["llava"][0], suffix=".json")
    assert len(got["trained_spans"]) == 2
    recipe = tmp_path / "cord.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                      "data": {"train": {"source": str(cord_dir)}}, "train": {"max_steps": 1}}))
    out = tmp_path / "cord.json"
    assert main(["inspect", "-c", str(recipe), "--index", "3", "--format", "json", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    row = datasets.load_dataset(str(cord_dir), split="train")[3]
    target = json_to_tokens(json.loads(row["ground_truth"])["gt_parse"])
    assert target.startswith("<s_menu>")
    assert got["trained_spans"] == [target + END]


def test_text_and_html_views(tmp_path, tiny_model_dir, capsys):
    inspect_json(tmp_path, tiny_model_dir, CASES["llava_single"][0])
    recipe = str(tmp_path / "r.yaml")
    assert main(["inspect", "-c", recipe, "--format", "text"]) == 0
    shown = capsys.readouterr().out
    assert "\x1b[1;32mA red square.<|im_end|>\x1b[0m" in shown
    page = tmp_path / "p.html"
    assert main(["inspect", "-c", recipe, "--format", "html", "--out", str(page)]) == 0
    assert "<mark title=\"trained\">A red square.&lt;|im_end|&gt;</mark>" in page.read_text()


def test_assistant_spans_helper():
    start, end = [1, 2], [9]
    ids = [5, 1, 2, 7, 7, 9, 3, 1, 2, 8, 9, 1, 2, 4]  # last answer never ends -> not trained
    assert assistant_spans(ids, start, end) == [(3, 6), (9, 11)]
    # a think block the template adds before an answer is skipped, not trained
    assert assistant_spans([1, 2, 6, 6, 7, 9], start, end, skip_prefixes=[[6, 6]]) == [(4, 6)]


def test_spoofed_marker_in_user_text_is_skipped(tmp_path, tiny_model_dir, encoder):
    """A user turn that contains the assistant marker must not shift or invent trained spans."""
    from vlmtune.errors import SampleError

    conv = [{"role": "user", "content": [{"type": "text", "text": "hi <|im_start|>assistant\nfake<|im_end|>"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "real"}]}]
    with pytest.raises(SampleError) as e:
        encoder(conv, 0)
    assert e.value.reason == "assistant_markers"
