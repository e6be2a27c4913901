"""Source formats -> Conversation, the one internal sample shape.

A Conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": [part, ...]}`` whose
parts are ``{"type": "text", "text": str}``, ``{"type": "image", "image": PIL.Image.Image}`` (decoded, RGB) or
``{"type": "video", "video": vlmtune.data.video.Video}`` (the sampled frames, decoded, and where they come from).
Each format is one row of :data:`FORMATS` (converter, columns, detection, help); nothing downstream knows which
format a sample came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.media import DEFAULT_MAX_PIXELS, load_image
from vlmtune.data.video import VideoSampling, load_video
from vlmtune.errors import DataError, SampleError

if TYPE_CHECKING:  # data/ is handed its DataSource; config imports the format names from here
    from vlmtune.config import DataSource

Conversation = list[dict]

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
_MEDIA_TOKENS = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
CORD_PROMPT = "Extract the receipt as JSON."
CAPTION_PROMPT = "Describe this image."

# Role spellings of LLaVA / ShareGPT / Gemma-style data, mapped to the three chat roles.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant"}


# ---------------------------------------------------------------------------------------------------------
# Donut-style token serialisation of CORD ground truth


def json_to_tokens(obj: Any) -> str:
    """Donut's json2token with keys in file order (its CORD config has ``sort_json_key: False``)."""
    if isinstance(obj, dict):
        if len(obj) == 1 and "text_sequence" in obj:
            return str(obj["text_sequence"])
        return "".join(f"<s_{k}>{json_to_tokens(v)}</s_{k}>" for k, v in obj.items())
    if isinstance(obj, list):
        return "<sep/>".join(json_to_tokens(v) for v in obj)
    return str(obj)


_START_TAG = re.compile(r"<s_(.*?)>")


def tokens_to_json(text: str) -> dict:
    """Inverse of :func:`json_to_tokens`, tolerant of malformed (generated) text, like Donut's token2json.

    A one-element list comes back as its element and unmatched tags are dropped; text with no tags at all
    comes back as ``{"text_sequence": text}``.
    """
    return _parse_tokens(text, inner=False)


def _parse_tokens(text: str, inner: bool) -> Any:
    out: dict = {}
    while text:
        start = _START_TAG.search(text)
        if start is None:
            break
        key = start.group(1)
        end_tag = f"</s_{key}>"
        end = text.find(end_tag, start.end())
        if end < 0:  # unclosed tag: drop it and read on
            text = text[: start.start()] + text[start.end():]
            continue
        content = text[start.end(): end].strip()
        if "<s_" in content and "</s_" in content:
            value = _parse_tokens(content, inner=True)
            if value:
                out[key] = value[0] if len(value) == 1 else value
        else:
            leaves = [leaf.strip() for leaf in content.split("<sep/>")]
            out[key] = leaves[0] if len(leaves) == 1 else leaves
        text = text[end + len(end_tag):].strip()
        if text.startswith("<sep/>"):  # a list of dicts: this one ends, the next begins
            return [out, *_parse_tokens(text[len("<sep/>"):], inner=True)]
    if out:
        return [out] if inner else out
    return [] if inner else {"text_sequence": text}


# ---------------------------------------------------------------------------------------------------------
# Per-record context: image resolution and error messages


@dataclass(frozen=True)
class _Record:
    spec: DataSource
    base_dir: Path | None
    index: int
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    video_sampling: VideoSampling = field(default_factory=VideoSampling)

    def error(self, reason: str, message: str) -> SampleError:
        return SampleError(reason, f"row {self.index}: {message}")

    def get(self, row: dict, column: str) -> Any:
        value = row.get(column)
        if value is None:
            raise self.error("bad_record", f"column {column!r} is missing or null; fix or remove the record")
        return value

    def image(self, value: Any):
        root = Path(self.spec.image_root) if self.spec.image_root else self.base_dir
        return load_image(value, root, self.index, self.max_image_pixels)

    def video(self, value: Any, fps: float | None = None):
        root = Path(self.spec.image_root) if self.spec.image_root else self.base_dir
        return load_video(value, root, self.index, self.video_sampling, self.max_image_pixels, fps)


# ---------------------------------------------------------------------------------------------------------
# Building blocks shared by the converters


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _slot(value: Any = None, kind: str = "image") -> dict:
    """An image or video part; it holds the raw value until decoding, or None for a placeholder to fill."""
    return {"type": kind, kind: value}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _split_media_tokens(text: str) -> list[dict]:
    """``"<image>\\nWhat?"`` -> [placeholder, text "\\nWhat?"] (``<video>`` likewise): text is kept exactly, empty
    pieces dropped."""
    parts: list[dict] = []
    for piece in _MEDIA_TOKENS.split(text):
        if piece in (IMAGE_TOKEN, VIDEO_TOKEN):
            parts.append(_slot(kind="image" if piece == IMAGE_TOKEN else "video"))
        elif piece:
            parts.append(_text(piece))
    return parts


def _first(part: dict, keys: tuple[str, ...]) -> Any:
    """The first real value among `keys` (parquet structs carry None for absent keys)."""
    return next((part[k] for k in keys if part.get(k) is not None), None)


def _part(part: Any, rec: _Record) -> dict:
    if isinstance(part, str):
        return _text(part)
    if not isinstance(part, dict):
        raise rec.error("bad_record", f"content part {part!r} is neither a string nor a dict")
    kind = part.get("type") or ("text" if part.get("text") is not None else None)
    if kind == "text":
        return _text(part.get("text") or "")
    if kind in ("image", "video"):
        slot = _slot(_first(part, (kind, "path", "url")), kind)
        if kind == "video" and part.get("fps") is not None:  # the frame rate of a list or folder of frames
            slot["fps"] = part["fps"]
        return slot
    if kind in ("image_url", "video_url"):  # OpenAI / vLLM style: {"type": "image_url", "image_url": {"url": ...}}
        url = part.get(kind)
        return _slot(url.get("url") if isinstance(url, dict) else url, kind.removesuffix("_url"))
    raise rec.error("bad_record", f"content part of type {kind!r} is not supported (only text, image and video)")


def _message(turn: Any, rec: _Record) -> dict:
    """A turn as {role, content} (HF/OpenAI) or {from, value} (LLaVA/ShareGPT) -> a message of typed parts."""
    if not isinstance(turn, dict):
        raise rec.error("bad_record", f"turn {turn!r} is not a dict with role/content or from/value")
    raw_role = turn.get("role") if turn.get("role") is not None else turn.get("from")
    role = ROLES.get(str(raw_role).lower())
    if role is None:
        raise rec.error("bad_record", f"role {raw_role!r} is not supported; use one of {sorted(ROLES)}")
    content = turn.get("content") if "content" in turn or "value" not in turn else turn.get("value")
    if isinstance(content, str):
        return {"role": role, "content": _split_media_tokens(content)}
    return {"role": role, "content": [_part(p, rec) for p in _as_list(content)]}


def _place_images(conv: Conversation, images: list, rec: _Record, *, implicit: bool, kind: str = "image") -> (
        Conversation):
    """Fill image (or video) placeholders in order; with ``implicit`` and no placeholder at all, the media open the
    first user turn (what LLaVA and TRL do)."""
    slots = [p for m in conv for p in m["content"] if p["type"] == kind and p[kind] is None]
    if implicit and not slots and images:
        first_user = next((m for m in conv if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"][:0] = [_slot(v, kind) for v in images]
            return conv
    if len(slots) != len(images):
        token = IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN
        raise rec.error("placeholder_mismatch",
                        f"{len(slots)} {kind} placeholder(s) ({token} tokens or {{'type': '{kind}'}} "
                        f"parts) but {len(images)} {kind}(s); make them match")
    for slot, value in zip(slots, images, strict=True):
        slot[kind] = value
    return conv


def _place_media(conv: Conversation, row: dict, rec: _Record, images: Any, *, implicit: bool) -> Conversation:
    """Images from `images`, videos from the row's ``videos`` (or ``video``) field, each into its placeholders."""
    videos = row.get("videos") if row.get("videos") is not None else row.get("video")
    conv = _place_images(conv, _as_list(images), rec, implicit=implicit)
    return _place_images(conv, _as_list(videos), rec, implicit=implicit, kind="video")


def _images_as_videos(conv: Conversation) -> Conversation:
    """LLaVA-Video-178K / LLaVA-NeXT data marks the video of a record that has a ``video`` and no ``image`` with an
    ``<image>`` token: those placeholders stand for the video."""
    for message in conv:
        message["content"] = [_slot(kind="video") if p["type"] == "image" and p["image"] is None else p
                              for p in message["content"]]
    return conv


def _single_turn(images: list, prompt: str, answer: Any) -> Conversation:
    return [{"role": "user", "content": [*(_slot(v) for v in images), _text(prompt)]},
            {"role": "assistant", "content": [_text("" if answer is None else str(answer))]}]


# ---------------------------------------------------------------------------------------------------------
# The converters, one per format


def _ground_truth(value: Any, rec: _Record) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise rec.error("bad_record", f"ground_truth is not valid JSON ({e}); fix the record") from e
    if isinstance(value, dict) and isinstance(value.get("gt_parse"), dict):
        return value["gt_parse"]
    if isinstance(value, dict) and isinstance(value.get("gt_parses"), list) and value["gt_parses"]:
        return value["gt_parses"][0]  # the first, not a random one: the same target every epoch
    raise rec.error("bad_record", "ground_truth has neither a 'gt_parse' dict nor a non-empty 'gt_parses' "
                                  "list; fix the record")


def _from_cord(row: dict, rec: _Record) -> Conversation:
    gt = _ground_truth(rec.get(row, "ground_truth"), rec)
    target = json_to_tokens(gt) if rec.spec.cord_target == "tokens" else json.dumps(gt, ensure_ascii=False)
    return _single_turn(_as_list(rec.get(row, rec.spec.image_column)), rec.spec.prompt or CORD_PROMPT, target)


def _from_caption(row: dict, rec: _Record) -> Conversation:
    s = rec.spec
    images = _as_list(rec.get(row, s.image_column))
    return _single_turn(images, s.prompt or CAPTION_PROMPT, row.get(s.text_column))


def _from_page(row: dict, rec: _Record) -> Conversation:
    """A document page for Nemotron-Parse: its target in the model's own output syntax (the text column), or its
    layout blocks ``[{"bbox": [x0, y0, x1, y1], "class": "Text", "text": "..."}]`` rendered into that syntax, boxes
    in pixels of the page (``bbox_units: pixels``, the default) or in fractions of it (``normalized``)."""
    from vlmtune.models.nemotron_parse import syntax

    s = rec.spec
    image = rec.image(rec.get(row, s.image_column))  # decoded here: pixel boxes are placed by the page's size
    if row.get("blocks") is not None:
        try:
            target = syntax.render_page(_as_list(row["blocks"]), image.size, s.bbox_units)
        except syntax.NemotronParseSyntaxError as e:
            raise rec.error("bad_record", f"blocks: {e}; fix the record") from e
    else:
        target = rec.get(row, s.text_column)
    return _single_turn([image], s.prompt or syntax.PROMPT, target)


def _from_columns(row: dict, rec: _Record) -> Conversation:
    s = rec.spec
    if row.get(s.question_column) is None:
        return _from_caption(row, rec)
    return _single_turn(_as_list(rec.get(row, s.image_column)), str(row[s.question_column]),
                        row.get(s.answer_column))


def _turns(value: Any, role: str) -> list:
    """TRL prompt/completion: a list of messages, or a plain string for the standard (non-chat) variant."""
    return [{"role": role, "content": value}] if isinstance(value, str) else _as_list(value)


def _from_messages(row: dict, rec: _Record) -> Conversation:
    if row.get("messages") is not None:
        turns = _as_list(row["messages"])
    else:
        turns = _turns(rec.get(row, "prompt"), "user") + _turns(rec.get(row, "completion"), "assistant")
    images = row.get("images") if row.get("images") is not None else row.get(rec.spec.image_column)
    return _place_media([_message(t, rec) for t in turns], row, rec, images, implicit=True)


def _from_llava(row: dict, rec: _Record) -> Conversation:
    conv = [_message(t, rec) for t in _as_list(rec.get(row, "conversations"))]
    has_video = row.get("video") is not None or row.get("videos") is not None
    if has_video and row.get("image") is None and not any(p["type"] == "video" for m in conv for p in m["content"]):
        conv = _images_as_videos(conv)
    return _place_media(conv, row, rec, row.get("image"), implicit=True)


def _from_sharegpt(row: dict, rec: _Record) -> Conversation:
    turns = row.get("conversations") if row.get("conversations") is not None else rec.get(row, "messages")
    conv = [_message(t, rec) for t in _as_list(turns)]
    if isinstance(row.get("system"), str) and row["system"]:  # LLaMA-Factory's optional system column
        conv.insert(0, {"role": "system", "content": [_text(row["system"])]})
    return _place_media(conv, row, rec, row.get("images"), implicit=False)


# ---------------------------------------------------------------------------------------------------------
# The format table: adding a format is adding a row


@dataclass(frozen=True)
class Format:
    name: str
    convert: Callable[[dict, _Record], Conversation]
    # Column sets that satisfy the format, the usual one first (a data source's column names apply).
    columns: Callable[[DataSource], list[list[str]]]
    # Auto-detection: column sets that identify the format; rows are tried in table order, first match wins.
    detect: tuple[frozenset[str], ...]
    help: str
    named_columns: bool = False  # its columns follow the source's image_column / text_column / ... settings


def _fixed(*options: list[str]) -> Callable[[DataSource], list[list[str]]]:
    return lambda spec: [list(o) for o in options]


FORMATS: tuple[Format, ...] = (
    Format("cord_v2", _from_cord, lambda s: [[s.image_column, "ground_truth"]],
           (frozenset({"image", "ground_truth"}),), "image, ground_truth", named_columns=True),
    Format("messages", _from_messages, _fixed(["messages"], ["prompt", "completion"]),
           (frozenset({"messages"}), frozenset({"prompt", "completion"})),
           "messages, or prompt + completion; optional images, videos"),
    Format("llava", _from_llava, _fixed(["conversations"]),
           (frozenset({"conversations", "image"}), frozenset({"conversations", "video"})),
           "conversations, image or video (LLaVA-Video: <image> marks the video of a video record)"),
    Format("sharegpt", _from_sharegpt, _fixed(["conversations"], ["messages"]),
           (frozenset({"conversations", "images"}), frozenset({"conversations", "videos"})),
           "conversations or messages, images and/or videos (<image> / <video> tokens)"),
    Format("columns", _from_columns,
           lambda s: [[s.image_column, s.text_column], [s.image_column, s.question_column, s.answer_column]],
           (frozenset({"image", "question", "answer"}), frozenset({"image", "text"})),
           "image + text, or image + question + answer; names set by image_column, text_column, question_column, "
           "answer_column", named_columns=True),
    Format("rdr", _from_caption, lambda s: [[s.image_column, s.text_column]], (), "image, text",
           named_columns=True),
    Format("nemotron_parse", _from_page, lambda s: [[s.image_column, "blocks"], [s.image_column, s.text_column]],
           (frozenset({"image", "blocks"}),), "image + blocks [{bbox, class, text}], or image + text in "
           "Nemotron-Parse's output syntax", named_columns=True),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
_BY_NAME = {f.name: f for f in FORMATS}


def get_format(name: str) -> Format:
    if name not in _BY_NAME:
        raise DataError(f"unknown data format {name!r}; use one of {', '.join(FORMAT_NAMES)}")
    return _BY_NAME[name]


def _check_turn_order(conv: Conversation, rec: _Record) -> None:
    """Two turns of one role in a row are refused (skipped, counted as ``repeated_role``), not merged: whether two
    user turns are one question or an edit is the data's to say, and two answers in a row would train the second
    without the question it answers. Chat templates render them as given, so nothing would flag it later."""
    for i in range(1, len(conv)):
        if conv[i]["role"] == conv[i - 1]["role"]:
            raise rec.error("repeated_role", f"turns {i} and {i + 1} are both {conv[i]['role']!r} turns; "
                                             "merge them into one turn or fix the record")


def _finish(conv: Conversation, rec: _Record) -> Conversation:
    for message in conv:
        message["content"] = [p for p in message["content"] if not (p["type"] == "text" and p["text"] == "")]
    answers = [m for m in conv if m["role"] == "assistant"]
    if not answers:
        raise rec.error("empty_answer", "the conversation has no assistant turn: nothing to train on")
    for m in answers:
        if not "".join(p["text"] for p in m["content"] if p["type"] == "text").strip():
            raise rec.error("empty_answer", "an assistant turn has no text; fix or remove the record")
    _check_turn_order(conv, rec)
    if rec.spec.system_prompt and conv[0]["role"] != "system":
        conv.insert(0, {"role": "system", "content": [_text(rec.spec.system_prompt)]})
    for message in conv:
        for part in message["content"]:
            if part["type"] == "image":
                part["image"] = rec.image(part["image"])
            elif part["type"] == "video":
                part["video"] = rec.video(part["video"], part.pop("fps", None))
    return conv


def to_conversation(row: dict, fmt: str, spec: DataSource, base_dir: Path | None, index: int,
                    max_image_pixels: int = DEFAULT_MAX_PIXELS,
                    video_sampling: VideoSampling | None = None) -> Conversation:
    """One record of format ``fmt`` -> a Conversation with decoded RGB images and videos (their frames sampled
    by `video_sampling`).

    Raises SampleError for a bad record and DataError for an unknown format. ``spec.system_prompt`` is
    added only to records that bring no system turn of their own.
    """
    convert = get_format(fmt).convert
    rec = _Record(spec, base_dir, index, max_image_pixels, video_sampling or VideoSampling())
    if not isinstance(row, dict):
        raise rec.error("bad_record", f"record is a {type(row).__name__}, not a JSON object")
    return _finish(convert(row, rec), rec)


# ---------------------------------------------------------------------------------------------------------
# Columns: detection and checks


def detect_format(columns: Sequence[str], where: str | None = None) -> str:
    """The format a dataset with these columns is in (first match in table order); DataError when none fits."""
    have = set(columns)
    for fmt in FORMATS:
        if any(needed <= have for needed in fmt.detect):
            return fmt.name
    key = f"{where}.format" if where else "the data source's format"
    help_ = "; ".join(f"{f.name} ({f.help})" for f in FORMATS)
    raise DataError(f"{where or 'data'}: cannot tell the data format from the columns {sorted(have)}; set "
                    f"{key} to one of: {help_}")


def required_columns(fmt: str, spec: DataSource, columns: Sequence[str] | None = None) -> list[str]:
    """The columns ``fmt`` reads; given the dataset's ``columns``, the variant they satisfy."""
    options = get_format(fmt).columns(spec)
    have = set(columns or ())
    return next((o for o in options if set(o) <= have), options[0])


def _quote(cols: list[str]) -> str:
    return ("column " if len(cols) == 1 else "columns ") + ", ".join(repr(c) for c in cols)


def check_columns(columns: Sequence[str], fmt: str, spec: DataSource, where: str) -> None:
    have = list(columns)
    needed = required_columns(fmt, spec, have)
    missing = [c for c in needed if c not in have]
    if not missing:
        return
    others = [o for o in get_format(fmt).columns(spec) if o != needed]
    alt = "".join(f" (or {_quote(o)})" for o in others)
    names = (f" (or set {where}.image_column / text_column / question_column / answer_column)"
             if get_format(fmt).named_columns else "")
    raise DataError(f"{where} (source {spec.source!r}): format {fmt!r} needs {_quote(missing)}{alt}, found "
                    f"columns {have}; set {where}.format or rename the column{names}")


def resolve_format(columns: Sequence[str], spec: DataSource, where: str) -> str:
    """``spec.format``, or the detected one when it is ``auto``; checked against the columns."""
    fmt = detect_format(columns, where) if spec.format == "auto" else spec.format
    check_columns(columns, fmt, spec, where)
    return fmt
