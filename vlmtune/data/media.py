"""Media references in a record -> decoded media: images as RGB PIL images.

A reference is a PIL image, ``{"bytes", "path"}`` (the Hugging Face Image storage), raw bytes, a ``data:`` URI,
or a path (absolute, ``file://``, or relative to ``image_root`` / the data file's folder). Remote URLs are refused:
vlmtune never fetches data over the network. A file that cannot be decoded is a :class:`SampleError`
(``unreadable_image``), so the sample is skipped and counted, never a crash inside the processor later.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import PIL.Image

from vlmtune.errors import SampleError


def _error(index: int, reason: str, message: str) -> SampleError:
    return SampleError(reason, f"row {index}: {message}")


def load_image(value: Any, root: Path | None, index: int) -> PIL.Image.Image:
    """Decode one image reference of row `index`; relative paths start at `root` (else the working folder)."""
    if isinstance(value, PIL.Image.Image):
        return _decode(value, "in-memory image", index)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # HF Image storage
        if value.get("bytes"):
            return _decode(io.BytesIO(value["bytes"]), value.get("path") or "bytes", index)
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return _decode(io.BytesIO(value), "bytes", index)
    if isinstance(value, str | Path):
        return _image_at(str(value), root, index)
    if value is None:
        raise _error(index, "bad_record", "an image is missing (null); fix or remove the record")
    raise _error(index, "bad_record", f"image value of type {type(value).__name__} is not supported; use a "
                                      "path, a PIL image or {'bytes': ..., 'path': ...}")


def _image_at(ref: str, root: Path | None, index: int) -> PIL.Image.Image:
    if ref.startswith(("http://", "https://")):
        raise _error(index, "unreadable_image", f"image {ref!r} is a remote URL; vlmtune does not fetch images "
                                                "over the network: download them and use local paths")
    if ref.startswith("data:") and ";base64," in ref:
        try:
            data = base64.b64decode(ref.split(";base64,", 1)[1])
        except binascii.Error as e:
            raise _error(index, "unreadable_image", f"data: URI image is not valid base64 ({e})") from e
        return _decode(io.BytesIO(data), "data: URI", index)
    path = Path(unquote(ref.removeprefix("file://"))).expanduser()
    if not path.is_absolute():
        path = (root or Path.cwd()) / path
    if not path.is_file():
        raise _error(index, "unreadable_image", f"image {ref!r} not found (looked at {str(path)!r}); fix the "
                                                "path or set the data source's image_root")
    return _decode(path, ref, index)


def _decode(source: PIL.Image.Image | io.BytesIO | Path, label: str, index: int) -> PIL.Image.Image:
    # Force-load every pixel here, so a truncated or corrupt file is one counted SampleError now.
    try:
        if isinstance(source, PIL.Image.Image):
            source.load()
            return to_rgb(source)
        with PIL.Image.open(source) as im:
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(index, "unreadable_image",
                     f"image {label!r} could not be read ({reason}); fix or remove the file") from e


def to_rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    # Transparent pixels go on white, as transformers' convert_to_rgb does, so documents stay readable.
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
