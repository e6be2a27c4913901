"""Nemotron-Parse's output syntax and page geometry, as pure functions.

What the model writes for a page (nvidia/NVIDIA-Nemotron-Parse-v1.1, default prompt), one block per layout element
in reading order, blocks separated by a blank line, then the end token ``</s>``::

    <x_0.3779><y_0.3094># DiffBIR: Toward Blind Image Restoration<x_0.624><y_0.3297><class_Title>

    <x_0.3564><y_0.3461>Xinqi Lin, Jingwen He, ...<x_0.6445><y_0.3617><class_Text>

A block is its box's top-left corner, its text (markdown; tables as LaTeX), its bottom-right corner and its class.
Coordinates are fractions of the model's input canvas (the page resized to fit 1648 x 2048 keeping its aspect ratio,
then centred on a white 1648 x 2048 canvas), quantised to 1024 steps across (``<x_i/1024>``) and 1280 steps down
(``<y_j/1280>``), each written as ``str(round(value, 4))``. Sources: the official postprocessing.py
(``extract_classes_bboxes``, ``transform_bbox_to_original``), a decoded page of the real model, and the checkpoint's
tokenizer_config.json (token ids); see tests/assets/nemotron-parse/SOURCE.md.

Here: the prompt (``PROMPT``), the token ids (``token_ids``), page geometry (``resized_size``, ``page_offset``,
``to_canvas``, ``from_canvas``), ``render_page`` / ``parse_page``, and ``teacher_forcing`` (decoder input and labels).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from vlmtune.errors import VlmtuneError

FINAL_SIZE = (2048, 1648)  # (height, width) of the model's input canvas
X_BINS, Y_BINS = 1024, 1280
CLASSES = ("Text", "Title", "Section-header", "List-item", "TOC", "Bibliography", "Footnote", "Page-header",
           "Page-footer", "Picture", "Formula", "Code", "Table", "Caption")
TASK_TOKENS = ("<output_plain>", "<output_markdown>", "<output_no_text>", "<output_ocr>", "<predict_bbox>",
               "<no_bbox>", "<bbox>", "<no_classes>", "<predict_classes>")
BLOCK_SEPARATOR = "\n\n"
# The decoder prompt of every documented use: decoder start (</s>), <s>, then the task tokens. Tokenise it with
# add_special_tokens=False: ids (2, 0, 50004, 50008, 50001) in the v1.1 tokenizer.
PROMPT = "</s><s><predict_bbox><predict_classes><output_markdown>"
PROMPT_NO_TEXT = "</s><s><predict_bbox><predict_classes><output_no_text>"  # boxes and classes only

# Token ids in the v1.1 tokenizer (52,327 tokens): task tokens 50000-50008, <x_..> 50009-51032, <y_..> 51033-52312,
# <class_..> 52313-52326. Other checkpoints differ (v1.2 inserts two task tokens at 50009-50010): use
# `token_ids(tokenizer)` to read them from the tokenizer at hand.
TASK_TOKEN_START = 50000
X_TOKEN_START = TASK_TOKEN_START + len(TASK_TOKENS)
Y_TOKEN_START = X_TOKEN_START + X_BINS
CLASS_TOKEN_START = Y_TOKEN_START + Y_BINS
VOCAB_SIZE = CLASS_TOKEN_START + len(CLASSES)

Units = Literal["pixels", "normalized"]
Box = list[float]

_NUMBER = r"(\d+(?:\.\d+)?(?:[eE]-?\d+)?)"
_MARK = re.compile(rf"<x_{_NUMBER}>|<y_{_NUMBER}>|<class_([^<>]+)>")
_SPECIAL = re.compile(r"</s>|<s>|<pad>|<unk>|" + "|".join(re.escape(t) for t in TASK_TOKENS))


class NemotronParseSyntaxError(VlmtuneError, ValueError):
    pass


def x_token(index: int) -> str:
    return f"<x_{round(index / X_BINS, 4)}>"


def y_token(index: int) -> str:
    return f"<y_{round(index / Y_BINS, 4)}>"


def class_token(name: str) -> str:
    return f"<class_{name}>"


def coordinate_tokens() -> list[str]:
    """Every coordinate token in id order: all ``<x_..>``, then all ``<y_..>``."""
    return [x_token(i) for i in range(X_BINS)] + [y_token(j) for j in range(Y_BINS)]


def added_tokens() -> list[str]:
    """The tokens the v1.1 tokenizer adds after its BPE vocabulary, in id order from 50000."""
    return list(TASK_TOKENS) + coordinate_tokens() + [class_token(c) for c in CLASSES]


def token_ids(tokenizer: Any) -> dict[str, list[int]]:
    """Ids of the task, coordinate and class tokens in `tokenizer`, looked up by their text.

    ``coordinate`` is the ``<x_..>``/``<y_..>`` tokens; ``structure`` is every token from the first task token to the
    last class token (task, coordinate and class tokens): the official training loss weights exactly these (labels
    >= 50000) by 10 (hf_nemotron_parse_modeling.py, NeMo AutoModel's NemotronParseLoss).
    """
    vocab = tokenizer.get_vocab()
    groups = {"task": list(TASK_TOKENS), "coordinate": coordinate_tokens(),
              "class": [class_token(c) for c in CLASSES]}
    missing = [t for tokens in groups.values() for t in tokens if t not in vocab]
    if missing:
        raise NemotronParseSyntaxError(
            f"the tokenizer lacks {len(missing)} Nemotron-Parse tokens (first: {missing[:3]}); it is not a "
            "Nemotron-Parse tokenizer (load the checkpoint's tokenizer.json)")
    ids = {name: [vocab[t] for t in tokens] for name, tokens in groups.items()}
    ids["structure"] = sorted(set(ids["task"] + ids["coordinate"] + ids["class"]))
    return ids


def teacher_forcing(tokenizer: Any, target: str, prompt: str = PROMPT) -> tuple[list[int], list[int]]:
    """(decoder_input_ids, labels) of one page: the prompt then the target as decoder input; labels aligned with it
    (``labels[t]`` is the token after ``decoder_input_ids[:t + 1]``): -100 under the prompt (never trained), then
    the target's tokens and the end token ``</s>``.

    The prompt starts with the decoder start token (``</s>``), so the input is the official training layout too:
    its ``labels`` shifted right behind the start token (``shift_tokens_right``) give the same decoder input.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    target_ids = tokenizer(target, add_special_tokens=False).input_ids
    if not prompt_ids or prompt_ids[0] != tokenizer.eos_token_id:
        raise NemotronParseSyntaxError(f"the prompt {prompt!r} must start with the decoder start token </s>")
    inputs = prompt_ids + target_ids
    labels = [-100] * (len(prompt_ids) - 1) + target_ids + [tokenizer.eos_token_id]
    return inputs, labels


# ---------------------------------------------------------------------------------------------------------------
# Geometry: where a page lands on the model's canvas


def resized_size(width: int, height: int, final_size: Sequence[int] = FINAL_SIZE) -> tuple[int, int]:
    """(width, height) of the page on the canvas: shrunk (never enlarged) to fit, keeping its aspect ratio.

    The official processor's rule (``_resize_with_aspect_ratio``, NVIDIA's "LongestMaxSizeHW"): first cap the
    height, then the width, truncating the other side to an int each time.
    """
    if width <= 0 or height <= 0:
        raise NemotronParseSyntaxError(f"page size must be positive, got {width} x {height}")
    max_height, max_width = final_size
    aspect = width / height
    new_width, new_height = width, height
    if height > max_height:
        new_height = max_height
        new_width = int(new_height * aspect)
    if new_width > max_width:
        new_width = max_width
        new_height = int(new_width / aspect)
    if new_width < 1 or new_height < 1:
        raise NemotronParseSyntaxError(f"a {width} x {height} page shrinks to {new_width} x {new_height} on the "
                                       f"{final_size[1]} x {final_size[0]} canvas: it is too thin to encode")
    return new_width, new_height


def page_offset(width: int, height: int, final_size: Sequence[int] = FINAL_SIZE) -> tuple[int, int]:
    """(left, top) of the resized page on the canvas: centred, the odd pixel of padding going right / down."""
    new_width, new_height = resized_size(width, height, final_size)
    return (final_size[1] - new_width) // 2, (final_size[0] - new_height) // 2


def to_canvas(bbox: Sequence[float], image_size: Sequence[int] | None, units: Units = "pixels",
              final_size: Sequence[int] = FINAL_SIZE) -> Box:
    """A page box (x0, y0, x1, y1) as fractions of the model's canvas.

    `image_size` (width, height) of the page; `units` the box's: pixels of the page, or fractions of its width and
    height. Without `image_size` the box is already in canvas fractions (units must be "normalized").
    """
    _check_box(bbox)
    if image_size is None:
        if units != "normalized":
            raise NemotronParseSyntaxError("a box in pixels needs the page's image_size=(width, height)")
        return [float(v) for v in bbox]
    left, top, fx, fy = _placement(image_size, units, final_size)
    x0, y0, x1, y1 = bbox
    return [(left + x0 * fx) / final_size[1], (top + y0 * fy) / final_size[0],
            (left + x1 * fx) / final_size[1], (top + y1 * fy) / final_size[0]]


def from_canvas(bbox: Sequence[float], image_size: Sequence[int] | None, units: Units = "pixels",
                final_size: Sequence[int] = FINAL_SIZE) -> Box:
    """Inverse of :func:`to_canvas` (the official ``transform_bbox_to_original`` for units="pixels")."""
    if image_size is None:
        return [float(v) for v in bbox]
    left, top, fx, fy = _placement(image_size, units, final_size)
    x0, y0, x1, y1 = bbox
    return [(x0 * final_size[1] - left) / fx, (y0 * final_size[0] - top) / fy,
            (x1 * final_size[1] - left) / fx, (y1 * final_size[0] - top) / fy]


def _placement(image_size: Sequence[int], units: Units, final_size: Sequence[int]) -> tuple[float, ...]:
    """(left, top) of the page on the canvas in pixels, and the page-unit -> canvas-pixel scale (x, y)."""
    width, height = image_size
    new_width, new_height = resized_size(width, height, final_size)
    left, top = page_offset(width, height, final_size)
    fx, fy = (new_width, new_height) if units == "normalized" else (new_width / width, new_height / height)
    return left, top, fx, fy


def _check_box(bbox: Sequence[float]) -> None:
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        raise NemotronParseSyntaxError(f"a bbox is [x0, y0, x1, y1] of 4 finite numbers, got {bbox!r}")
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise NemotronParseSyntaxError(
            f"bbox {list(bbox)} has x1 < x0 or y1 < y0; boxes are [left, top, right, bottom]")


# ---------------------------------------------------------------------------------------------------------------
# Rendering and parsing


def quantize(value: float, bins: int) -> int:
    """Nearest step of 1/bins (clipped to the last step: 1.0 itself has no token).

    Inferred: the sources show the token values (i / bins) but not how NVIDIA rounded its training boxes."""
    return min(max(math.floor(value * bins + 0.5), 0), bins - 1)


def render_block(bbox: Sequence[float], cls: str, text: str) -> str:
    """One block from a box in canvas fractions: ``<x0><y0>text<x1><y1><class>``."""
    if cls not in CLASSES:
        raise NemotronParseSyntaxError(f"unknown class {cls!r}; Nemotron-Parse's classes are {', '.join(CLASSES)}")
    x0, y0, x1, y1 = bbox
    return (f"{x_token(quantize(x0, X_BINS))}{y_token(quantize(y0, Y_BINS))}{text}"
            f"{x_token(quantize(x1, X_BINS))}{y_token(quantize(y1, Y_BINS))}{class_token(cls)}")


def render_page(blocks: Iterable[dict[str, Any]], image_size: Sequence[int] | None = None, units: Units = "pixels",
                final_size: Sequence[int] = FINAL_SIZE) -> str:
    """The target string for a page's blocks ``{"bbox": [x0, y0, x1, y1], "class": "Text", "text": "..."}``.

    Boxes are in `units` of the page of `image_size` (width, height), or, without `image_size`, already in
    fractions of the model's canvas. The end token is not part of the string: the caller appends ``</s>``.
    """
    out = []
    for i, block in enumerate(blocks):
        missing = {"bbox", "class", "text"} - set(block)
        if missing:
            raise NemotronParseSyntaxError(
                f"block {i} lacks {sorted(missing)}; each block is {{'bbox', 'class', 'text'}}")
        if not isinstance(block["text"], str):
            raise NemotronParseSyntaxError(f"block {i}: text must be a string, got {type(block['text']).__name__}")
        if _MARK.search(block["text"]) or _SPECIAL.search(block["text"]):
            raise NemotronParseSyntaxError(f"block {i}: its text contains a coordinate, class or special token, "
                                           f"which would break the syntax: {block['text'][:80]!r}")
        try:
            box = to_canvas(block["bbox"], image_size, units, final_size)
        except NemotronParseSyntaxError as e:
            raise NemotronParseSyntaxError(f"block {i}: {e}") from None
        out.append(render_block(box, block["class"], block["text"]))
    return BLOCK_SEPARATOR.join(out)


def parse_page(text: str, image_size: Sequence[int] | None = None, units: Units = "pixels",
               final_size: Sequence[int] = FINAL_SIZE) -> list[dict[str, Any]]:
    """The blocks of a generated string, boxes mapped back to the page (as :func:`render_page` takes them).

    Tolerant, never raises on model output: special and task tokens are dropped; a block cut short keeps what it
    has (``bbox`` None unless both corners came, ``class`` None when the class did not); text outside any block
    becomes a block with neither; a stray coordinate is ignored; coordinates outside [0, 1] are clipped.
    """
    reader = _Reader()
    source = _SPECIAL.sub("", text)
    cursor = 0
    for match in _MARK.finditer(source):
        reader.text(source[cursor:match.start()])
        cursor = match.end()
        x, y, cls = match.groups()
        if x is not None:
            reader.x(float(x))
        elif y is not None:
            reader.y(float(y))
        else:
            reader.close(cls.strip())
    reader.text(source[cursor:])
    reader.close(None)
    return [{**b, "bbox": None if b["bbox"] is None else from_canvas(b["bbox"], image_size, units, final_size)}
            for b in reader.blocks]


class _Reader:
    """State of :func:`parse_page`: the corners and text of the block being read."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []
        self.corners: list[tuple[float, float]] = []
        self.parts: list[str] = []
        self.pending_x: float | None = None

    def text(self, segment: str) -> None:
        if len(self.corners) == 2:  # after the closing corner only the class belongs to the block
            if not segment.strip():
                return
            self.close(None)  # text instead: that block had no class, and this text is outside any block
        if self.corners or segment.strip():
            self.parts.append(segment)

    def x(self, value: float) -> None:
        if len(self.corners) == 2 or (not self.corners and "".join(self.parts).strip()):
            self.close(None)  # a block awaiting its class, or loose text, ends where a new corner starts
        self.pending_x = min(max(value, 0.0), 1.0)

    def y(self, value: float) -> None:
        if self.pending_x is not None:
            self.corners.append((self.pending_x, min(max(value, 0.0), 1.0)))
            self.pending_x = None

    def close(self, cls: str | None) -> None:
        content = "".join(self.parts)
        if self.corners or cls is not None or content.strip():
            box = None
            if len(self.corners) == 2:
                (x0, y0), (x1, y1) = self.corners
                box = [x0, y0, x1, y1]
            self.blocks.append({"bbox": box, "class": cls, "text": content if self.corners else content.strip()})
        self.corners, self.parts, self.pending_x = [], [], None
