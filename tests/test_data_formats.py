"""Every source format -> Conversation, image value forms, column detection, sources, and the bad inputs."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import PIL.Image
import pytest

from vlmtune.config import DataSource
from vlmtune.data.formats import (
    CAPTION_PROMPT,
    CORD_PROMPT,
    check_columns,
    detect_format,
    json_to_tokens,
    required_columns,
    resolve_format,
    to_conversation,
    tokens_to_json,
)
from vlmtune.data.sources import load_rows
from vlmtune.errors import DataError, SampleError


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and a private datasets cache. The libraries read these variables at import, so their
    constants are patched too."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def make_image(width: int, height: int = 6, color: str = "red", mode: str = "RGB") -> PIL.Image.Image:
    """Images are told apart by their width in the assertions below."""
    return PIL.Image.new(mode, (width, height), color)


def png_bytes(width: int) -> bytes:
    buffer = io.BytesIO()
    make_image(width).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(folder: Path, name: str, width: int) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(width))
    return path


def spec(**kwargs) -> DataSource:
    return DataSource(source=kwargs.pop("source", "data.jsonl"), **kwargs)


def shape(conv: list[dict]) -> list[tuple[str, list]]:
    """A Conversation with each image replaced by its width, after checking it is decoded RGB."""
    out = []
    for message in conv:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                assert isinstance(part["image"], PIL.Image.Image) and part["image"].mode == "RGB"
                parts.append(("image", part["image"].size[0]))
            else:
                assert set(part) == {"type", "text"} and part["type"] == "text"
                parts.append(part["text"])
        out.append((message["role"], parts))
    return out


def convert(row: dict, fmt: str, base_dir: Path | None = None, **kwargs) -> list[tuple[str, list]]:
    return shape(to_conversation(row, fmt, spec(**kwargs), base_dir, index=3))


def sample_error(row: dict, fmt: str, base_dir: Path | None = None, **kwargs) -> SampleError:
    with pytest.raises(SampleError) as info:
        to_conversation(row, fmt, spec(**kwargs), base_dir, index=7)
    assert str(info.value).startswith("row 7: ")
    return info.value


# ---------------------------------------------------------------------------------------------------------
# Donut tokens

CORD_GT = {
    "menu": [{"nm": ["AYAM", "BAKAR"], "cnt": "1 x", "price": "75,000",
              "sub": [{"nm": "Rice", "price": "5,000"}, {"nm": "Egg", "price": "3,000"}]},
             {"nm": "Es Teh", "cnt": "2", "price": "20,000"}],
    "sub_total": {"subtotal_price": "103,000", "tax_price": "10,300"},
    "total": {"total_price": "113,300"},
}


def test_json_to_tokens_keeps_file_order_and_cord_shapes():
    assert json_to_tokens(CORD_GT) == (
        "<s_menu><s_nm>AYAM<sep/>BAKAR</s_nm><s_cnt>1 x</s_cnt><s_price>75,000</s_price>"
        "<s_sub><s_nm>Rice</s_nm><s_price>5,000</s_price><sep/><s_nm>Egg</s_nm><s_price>3,000</s_price></s_sub>"
        "<sep/><s_nm>Es Teh</s_nm><s_cnt>2</s_cnt><s_price>20,000</s_price></s_menu>"
        "<s_sub_total><s_subtotal_price>103,000</s_subtotal_price><s_tax_price>10,300</s_tax_price></s_sub_total>"
        "<s_total><s_total_price>113,300</s_total_price></s_total>")
    single = {"menu": {"nm": "Latte", "price": "30,000", "sub": {"nm": "Boba"}}, "void_menu": []}
    assert json_to_tokens(single) == ("<s_menu><s_nm>Latte</s_nm><s_price>30,000</s_price><s_sub><s_nm>Boba</s_nm>"
                                      "</s_sub></s_menu><s_void_menu></s_void_menu>")
    assert json_to_tokens({"text_sequence": "plain"}) == "plain"
    assert json_to_tokens({"n": 3}) == "<s_n>3</s_n>"


@pytest.mark.parametrize("gt", [CORD_GT, {"menu": {"nm": "Latte", "cnt": "1", "sub": {"nm": "Boba", "price": "5"}},
                                          "total": {"total_price": "5"}}])
def test_tokens_to_json_round_trip(gt):
    assert tokens_to_json(json_to_tokens(gt)) == gt


def test_tokens_to_json_tolerates_malformed_text():
    assert tokens_to_json("<s_menu><s_nm>Latte</s_nm><s_price>3</s_menu> junk") == {"menu": {"nm": "Latte"}}
    assert tokens_to_json("<s_total><s_total_price>5</s_total_price>") == {"total_price": "5"}
    assert tokens_to_json("<s_a>\n1\n</s_a><s_b>2") == {"a": "1"}
    assert tokens_to_json("no tags here") == {"text_sequence": "no tags here"}


# ---------------------------------------------------------------------------------------------------------
# One test group per format: single-turn and multi-turn records


def cord_row(**ground_truth) -> dict:
    return {"image": make_image(11), "ground_truth": json.dumps({"meta": {}, **ground_truth})}


def test_cord_v2_tokens_json_gt_parses_prompt_and_system():
    gt = {"menu": {"nm": "Latte", "price": "30,000"}, "total": {"total_price": "30,000"}}
    tokens = ("<s_menu><s_nm>Latte</s_nm><s_price>30,000</s_price></s_menu>"
              "<s_total><s_total_price>30,000</s_total_price></s_total>")
    assert convert(cord_row(gt_parse=gt), "cord_v2") == [
        ("user", [("image", 11), CORD_PROMPT]), ("assistant", [tokens])]
    assert convert(cord_row(gt_parse=gt), "cord_v2", cord_target="json", prompt="JSON?", system_prompt="Sys.") == [
        ("system", ["Sys."]), ("user", [("image", 11), "JSON?"]), ("assistant", [json.dumps(gt)])]
    # gt_parses: the first, every time; ground_truth may also be a dict already
    row = {"image": make_image(11), "ground_truth": {"gt_parses": [{"answer": "Ä"}, {"answer": "b"}]}}
    assert convert(row, "cord_v2", cord_target="json")[1] == ("assistant", ['{"answer": "Ä"}'])


def test_rdr_caption():
    row = {"image": make_image(12), "text": "A red square."}
    assert convert(row, "rdr") == [("user", [("image", 12), CAPTION_PROMPT]), ("assistant", ["A red square."])]


def test_columns_caption_question_answer_renamed_and_multi_image(tmp_path):
    assert convert({"image": make_image(13), "text": "cap"}, "columns", prompt="Caption:") == [
        ("user", [("image", 13), "Caption:"]), ("assistant", ["cap"])]
    assert convert({"image": make_image(13), "question": "Color?", "answer": "red"}, "columns") == [
        ("user", [("image", 13), "Color?"]), ("assistant", ["red"])]
    write_png(tmp_path, "a.png", 14)
    row = {"pics": ["a.png", make_image(15)], "q": "Same?", "a": 0}  # several images go before the text
    assert convert(row, "columns", tmp_path, image_column="pics", question_column="q", answer_column="a") == [
        ("user", [("image", 14), ("image", 15), "Same?"]), ("assistant", ["0"])]


def test_messages_typed_parts_single_and_multi_turn(tmp_path):
    for i in range(3):
        write_png(tmp_path, f"{i}.png", 20 + i)
    single = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Extract"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "{}"}]}],
              "images": ["0.png"]}
    assert convert(single, "messages", tmp_path) == [("user", [("image", 20), "Extract"]), ("assistant", ["{}"])]
    multi = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "You parse receipts."}]},
        {"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": "two"}],
        "images": ["0.png", "1.png", "2.png"]}
    assert convert(multi, "messages", tmp_path, system_prompt="ignored: the record has one") == [
        ("system", ["You parse receipts."]), ("user", ["First:", ("image", 20)]), ("assistant", ["one"]),
        ("user", [("image", 21), "and", ("image", 22)]), ("assistant", ["two"])]


def test_messages_parquet_struct_parts_inline_images_and_roles(tmp_path):
    write_png(tmp_path, "in.png", 31)
    row = {"messages": [
        {"role": "human", "content": [{"type": "image", "text": None, "index": 0},
                                      {"type": "text", "text": "Hi", "index": None},
                                      {"type": "image", "image": None, "path": "in.png", "url": None},
                                      {"type": "image", "url": f"file://{tmp_path / 'in.png'}"},
                                      {"type": "image_url", "image_url": {"url": str(tmp_path / "in.png")}}]},
        {"role": "model", "content": [{"type": "text", "text": "Hello", "index": None}]}],
        "image": make_image(30)}  # the single-image column fills the one placeholder
    assert convert(row, "messages", tmp_path) == [
        ("user", [("image", 30), "Hi", ("image", 31), ("image", 31), ("image", 31)]), ("assistant", ["Hello"])]


def test_messages_string_content_with_image_tokens(tmp_path):
    # LLaMA-Factory's OpenAI style: text kept exactly around the tokens, empty pieces dropped
    row = {"messages": [{"role": "user", "content": "<image>\nWho are they?"},
                        {"role": "assistant", "content": "Kane and Gretzka."},
                        {"role": "user", "content": "Left <image> right <image>"},
                        {"role": "assistant", "content": "Celebrating."}],
           "images": [make_image(40), make_image(41), {"bytes": png_bytes(42), "path": None}]}
    assert convert(row, "messages") == [
        ("user", [("image", 40), "\nWho are they?"]), ("assistant", ["Kane and Gretzka."]),
        ("user", ["Left ", ("image", 41), " right ", ("image", 42)]), ("assistant", ["Celebrating."])]


def test_messages_without_placeholders_put_images_first():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "What?"},
                        {"role": "assistant", "content": "This."}], "images": [make_image(43), make_image(44)]}
    assert convert(row, "messages") == [
        ("system", ["S"]), ("user", [("image", 43), ("image", 44), "What?"]), ("assistant", ["This."])]


def test_messages_prompt_completion():
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
           "completion": [{"role": "assistant", "content": [{"type": "text", "text": "A"}]}],
           "images": [make_image(50)]}
    assert convert(row, "messages") == [("user", [("image", 50), "Q"]), ("assistant", ["A"])]
    plain = {"prompt": "<image>Q", "completion": "A", "images": [make_image(51)]}
    assert convert(plain, "messages") == [("user", [("image", 51), "Q"]), ("assistant", ["A"])]


def test_llava_single_multi_turn_and_implicit_image(tmp_path):
    write_png(tmp_path, "part-000001/997bb945.jpg", 60)
    row = {"id": "997bb945", "image": "part-000001/997bb945.jpg",
           "conversations": [{"from": "human", "value": "<image>\nWrite a prompt."},
                             {"from": "gpt", "value": "a beautiful painting"}]}
    assert convert(row, "llava", tmp_path) == [
        ("user", [("image", 60), "\nWrite a prompt."]), ("assistant", ["a beautiful painting"])]
    multi = {"image": "part-000001/997bb945.jpg",
             "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Color?"},
                               {"from": "gpt", "value": "Red."}, {"from": "human", "value": "Shape?"},
                               {"from": "gpt", "value": "Square."}]}
    assert convert(multi, "llava", tmp_path) == [
        ("system", ["Be brief."]), ("user", [("image", 60), "Color?"]), ("assistant", ["Red."]),
        ("user", ["Shape?"]), ("assistant", ["Square."])]
    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert convert(text_only, "llava") == [("user", ["Hi"]), ("assistant", ["Hello"])]


def test_sharegpt_conversations_messages_and_system_column(tmp_path):
    write_png(tmp_path, "1.jpg", 70)
    write_png(tmp_path, "2.jpg", 71)
    row = {"conversations": [{"from": "human", "value": "<image><image>Compare."}, {"from": "gpt", "value": "Same."}],
           "images": ["1.jpg", "2.jpg"], "system": "Sys."}
    assert convert(row, "sharegpt", tmp_path) == [
        ("system", ["Sys."]), ("user", [("image", 70), ("image", 71), "Compare."]), ("assistant", ["Same."])]
    multi = {"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Kane."},
                          {"role": "user", "content": "And <image>?"}, {"role": "assistant", "content": "Gretzka."}],
             "images": ["1.jpg", "2.jpg"]}
    assert convert(multi, "sharegpt", tmp_path) == [
        ("user", [("image", 70), "Who?"]), ("assistant", ["Kane."]),
        ("user", ["And ", ("image", 71), "?"]), ("assistant", ["Gretzka."])]


# ---------------------------------------------------------------------------------------------------------
# Image value forms


@pytest.mark.parametrize("form", ["pil", "bytes_dict", "path_dict", "relative", "image_root", "absolute", "file_url",
                                  "raw_bytes"])
def test_image_value_forms(tmp_path, form):
    data_dir, root = tmp_path / "data", tmp_path / "media"
    write_png(data_dir, "imgs/a.png", 80)
    write_png(root, "imgs/a.png", 81)
    absolute = data_dir / "imgs/a.png"
    value, kwargs, width = {
        "pil": (make_image(80, mode="P"), {}, 80),
        "bytes_dict": ({"bytes": png_bytes(80), "path": "ignored.png"}, {}, 80),
        "path_dict": ({"bytes": None, "path": "imgs/a.png"}, {}, 80),
        "relative": ("imgs/a.png", {}, 80),
        "image_root": ("imgs/a.png", {"image_root": str(root)}, 81),
        "absolute": (str(absolute), {"image_root": str(root)}, 80),
        "file_url": (f"file://{absolute}", {}, 80),
        "raw_bytes": (png_bytes(80), {}, 80),
    }[form]
    assert convert({"image": value, "text": "t"}, "rdr", data_dir, **kwargs)[0] == ("user", [("image", width),
                                                                                            CAPTION_PROMPT])


def test_transparent_pixels_become_white():
    rgba = PIL.Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    conv = to_conversation({"image": rgba, "text": "t"}, "rdr", spec(), None, 0)
    assert conv[0]["content"][0]["image"].getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------------------
# Bad samples: SampleError with a reason the caller counts


def test_corrupt_and_truncated_image_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/bad.png").write_bytes(b"not an image")
    err = sample_error({"image": "imgs/bad.png", "text": "t"}, "rdr", tmp_path)
    assert err.reason == "unreadable_image"
    assert "image 'imgs/bad.png' could not be read" in str(err) and "fix or remove the file" in str(err)
    big = io.BytesIO()
    PIL.Image.effect_noise((64, 64), 50).save(big, format="PNG")
    (tmp_path / "imgs/cut.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])  # header reads fine
    assert sample_error({"image": "imgs/cut.png", "text": "t"}, "rdr", tmp_path).reason == "unreadable_image"
    assert sample_error({"image": {"bytes": b"xx", "path": "p.png"}, "text": "t"}, "rdr").reason == "unreadable_image"


def test_missing_image_and_remote_url(tmp_path):
    err = sample_error({"image": "nope.png", "text": "t"}, "rdr", tmp_path)
    assert err.reason == "unreadable_image" and "not found" in str(err) and "image_root" in str(err)
    err = sample_error({"image": "https://example.com/a.png", "text": "t"}, "rdr")
    assert err.reason == "unreadable_image" and "remote URL" in str(err) and "download" in str(err)


@pytest.mark.parametrize(("fmt", "row"), [
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                               {"role": "assistant", "content": "A"}], "images": [make_image(5)]}),
    ("messages", {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}]}),
    ("llava", {"image": make_image(5), "conversations": [{"from": "human", "value": "<image><image>Q"},
                                                         {"from": "gpt", "value": "A"}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                  "images": [make_image(5)]}),
])
def test_placeholder_mismatch(fmt, row):
    err = sample_error(row, fmt)
    assert err.reason == "placeholder_mismatch" and "make them match" in str(err)


@pytest.mark.parametrize(("fmt", "row"), [
    ("llava", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]}),
    ("messages", {"messages": [{"role": "user", "content": "Q"}]}),
    ("messages", {"messages": [{"role": "user", "content": "Q"},
                               {"role": "assistant", "content": [{"type": "text", "text": None}]}]}),
    ("columns", {"image": make_image(5), "question": "Q", "answer": None}),
    ("rdr", {"image": make_image(5), "text": ""}),
])
def test_empty_answer(fmt, row):
    assert sample_error(row, fmt).reason == "empty_answer"


@pytest.mark.parametrize(("fmt", "row", "says"), [
    ("llava", {"id": 1}, "'conversations' is missing"),
    ("llava", {"conversations": [{"from": "observation", "value": "x"}]}, "role 'observation'"),
    ("cord_v2", {"image": make_image(5), "ground_truth": "{not json"}, "not valid JSON"),
    ("cord_v2", {"image": make_image(5), "ground_truth": "{}"}, "gt_parse"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}]}, "'audio'"),
    ("rdr", {"image": None, "text": "t"}, "'image' is missing"),
])
def test_bad_record(fmt, row, says):
    err = sample_error(row, fmt)
    assert err.reason == "bad_record" and says in str(err)


def test_unknown_format_is_a_data_error():
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        to_conversation({}, "csv", spec(), None, 0)


# ---------------------------------------------------------------------------------------------------------
# Columns: detection and checks


@pytest.mark.parametrize(("columns", "fmt"), [
    (["image", "ground_truth"], "cord_v2"),
    (["messages", "images"], "messages"),
    (["prompt", "completion"], "messages"),
    (["id", "image", "conversations"], "llava"),
    (["conversations", "images"], "sharegpt"),
    (["image", "question", "answer", "text"], "columns"),
    (["image", "text"], "columns"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns) == fmt


def test_detect_format_failure_lists_columns_and_formats():
    with pytest.raises(DataError) as info:
        detect_format(["id", "caption"], where="data.train")
    message = str(info.value)
    assert "['caption', 'id']" in message and "data.train.format" in message
    for needed in ("cord_v2 (image, ground_truth)", "llava (conversations, image or video", "prompt + completion"):
        assert needed in message
    with pytest.raises(DataError, match="set the data source's format to one of"):
        detect_format([])


def test_check_columns_message_and_variants():
    with pytest.raises(DataError) as info:
        check_columns(["id", "image"], "llava", spec(source="x.jsonl"), "data.train")
    assert str(info.value) == ("data.train (source 'x.jsonl'): format 'llava' needs column 'conversations', "
                               "found columns ['id', 'image']; set data.train.format or rename the column")
    with pytest.raises(DataError, match=r"needs column 'caption'.*image_column"):
        check_columns(["img", "caption2"], "columns", spec(image_column="img", text_column="caption"), "data.val")
    assert required_columns("columns", spec(), ["image", "question", "answer"]) == ["image", "question", "answer"]
    assert required_columns("columns", spec()) == ["image", "text"]
    assert required_columns("messages", spec(), ["prompt", "completion"]) == ["prompt", "completion"]
    check_columns(["prompt", "completion", "images"], "messages", spec(), "data.train")
    assert resolve_format(["image", "ground_truth"], spec(), "data.train") == "cord_v2"
    with pytest.raises(DataError, match="needs column 'text'"):
        resolve_format(["image", "ground_truth"], spec(format="rdr"), "data.train")


# ---------------------------------------------------------------------------------------------------------
# Sources


def test_jsonl_rows_heterogeneous_with_base_dir_and_limit(tmp_path):
    write_png(tmp_path, "a.png", 90)
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>Q"},
                                                    {"from": "gpt", "value": "A"}]},
               {"id": 2, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
               {"id": 3, "conversations": []}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    rows, base_dir = load_rows(spec(source=str(path)), "data.train")
    assert base_dir == tmp_path and len(rows) == 3 and rows.column_names == ["image", "conversations", "id"]
    assert resolve_format(rows.column_names, spec(), "data.train") == "llava"
    assert shape(to_conversation(rows[0], "llava", spec(), base_dir, 0))[0] == ("user", [("image", 90), "Q"])
    rows, _ = load_rows(spec(source=str(path), limit=2), "data.train")
    assert [r.get("id") for r in rows] == [None, 2] and rows.column_names == ["image", "conversations", "id"]


def test_json_list_file_and_bad_json(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"image": "a.png", "text": "x"}], indent=1))
    rows, _ = load_rows(spec(source=str(path)), "data.train")
    assert list(rows) == [{"image": "a.png", "text": "x"}]
    path.write_text('[\n {"image": "a.png",\n  "text": x}\n]')
    with pytest.raises(DataError, match="invalid JSON at line 3"):
        load_rows(spec(source=str(path)), "data.train")
    path.write_text('{"text": "a"}\n{"text": "b"}\n')  # JSON Lines under a .json name
    assert [r["text"] for r in load_rows(spec(source=str(path)), "data.train")[0]] == ["a", "b"]
    path.write_text('{\n "data": []\n}')
    with pytest.raises(DataError, match="holds one JSON dict; expected a list of records"):
        load_rows(spec(source=str(path)), "data.train")
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"data.train \(source .*train.jsonl'\): invalid JSON at line 2"):
        load_rows(spec(source=str(bad)), "data.train")
    bad.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is a list, not a JSON object"):
        load_rows(spec(source=str(bad)), "data.train")


def hub_like_folder(folder: Path) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    for split, n in (("train", 3), ("validation", 2)):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(100 + i), "path": None} for i in range(n)],
                                         "text": [f"{split} {i}" for i in range(n)]}, features=features)
        (folder / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / f"data/{split}-00000-of-00001.parquet"))
    return folder


def test_parquet_file_with_and_without_hf_metadata(tmp_path):
    import pyarrow.parquet as pq

    folder = hub_like_folder(tmp_path / "ds")
    path = folder / "data/train-00000-of-00001.parquet"
    rows, base_dir = load_rows(spec(source=str(path)), "data.train")
    assert base_dir == path.parent and len(rows) == 3 and isinstance(rows[0]["image"], PIL.Image.Image)
    raw = tmp_path / "raw.parquet"  # as written by other tools: image is a plain {bytes, path} struct
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), raw)
    rows, _ = load_rows(spec(source=str(raw), limit=2), "data.train")
    assert len(rows) == 2 and isinstance(rows[1]["image"], dict)
    assert detect_format(rows.column_names) == "columns"
    assert convert(rows[1], "columns") == [("user", [("image", 101), CAPTION_PROMPT]), ("assistant", ["train 1"])]


def test_folder_splits_and_missing_split(tmp_path):
    folder = hub_like_folder(tmp_path / "ds")
    rows, base_dir = load_rows(spec(source=str(folder), split="validation"), "data.validation")
    assert base_dir == folder and [r["text"] for r in rows] == ["validation 0", "validation 1"]
    with pytest.raises(DataError, match=r"split 'test' not found; available splits: \['train', 'validation'\]"):
        load_rows(spec(source=str(folder), split="test"), "data.validation")


def test_folder_without_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"could not load the data .*Hub-style dataset"):
        load_rows(spec(source=str(tmp_path / "empty")), "data.train")


def test_hub_id_offline_fails_fast_with_a_way_out():
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_rows(spec(source="nobody-vlmtune/no-such-dataset"), "data.train")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    for needed in ("Hugging Face Hub", "offline", "HF_HUB_OFFLINE", "hf download nobody-vlmtune/no-such-dataset",
                   "data.train.source: ./no-such-dataset"):
        assert needed in message


@pytest.mark.parametrize("source", ["missing.jsonl", "data/train.jsonl", "./nothing", "no/such/folder"])
def test_nonexistent_source(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"file or folder not found.*fix data.train.source"):
        load_rows(spec(source=source), "data.train")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "train.csv").write_text("image,text\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_rows(spec(source=str(tmp_path / "train.csv")), "data.train")
