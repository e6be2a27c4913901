"""Media references in a record -> decoded media: images as RGB PIL images, as people see them.

A reference is a PIL image, ``{"bytes", "path"}`` (the Hugging Face Image storage), raw bytes, a ``data:`` URI,
or a path (absolute, ``file://``, or relative to ``image_root`` / the data file's folder). Remote URLs are refused:
vlmtune never fetches data over the network. A file that cannot be decoded is a :class:`SampleError`
(``unreadable_image``), so the sample is skipped and counted, never a crash inside the processor later.

Decoded as a viewer shows it: the EXIF orientation applied (a phone photo of a receipt is upright), 16- and
32-bit pixels scaled to 8 bits (``convert("RGB")`` alone clips them: a 0-65535 gradient would be 99% white),
transparency composed on white, palettes expanded. An image of more than ``max_pixels`` pixels is skipped
(``image_too_large``) before its pixels are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import PIL.Image
import PIL.ImageOps

from vlmtune.errors import SampleError

DEFAULT_MAX_PIXELS = 64_000_000  # data.max_image_pixels: 8000 x 8000; decoding takes 3 bytes a pixel and more


def sample_error(index: int, reason: str, message: str) -> SampleError:
    return SampleError(reason, f"row {index}: {message}")


def load_image(value: Any, root: Path | None, index: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Decode one image reference of row `index`; relative paths start at `root` (else the working folder)."""
    if isinstance(value, PIL.Image.Image):
        return _decode(value, "in-memory image", index, max_pixels)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # HF Image storage
        if value.get("bytes"):
            return _decode(io.BytesIO(value["bytes"]), value.get("path") or "bytes", index, max_pixels)
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return _decode(io.BytesIO(value), "bytes", index, max_pixels)
    if isinstance(value, str | Path):
        return _image_at(str(value), root, index, max_pixels)
    if value is None:
        raise sample_error(index, "bad_record", "an image is missing (null); fix or remove the record")
    raise sample_error(index, "bad_record", f"image value of type {type(value).__name__} is not supported; use a "
                                            "path, a PIL image or {'bytes': ..., 'path': ...}")


def local_path(ref: str, root: Path | None) -> Path:
    """A data file's path as a record names it (plain or ``file://``, ``~``, percent-escapes), relative ones
    under the data source's ``image_root`` (else the working directory)."""
    path = Path(unquote(ref.removeprefix("file://"))).expanduser()
    return path if path.is_absolute() else (root or Path.cwd()) / path


def _image_at(ref: str, root: Path | None, index: int, max_pixels: int) -> PIL.Image.Image:
    if ref.startswith(("http://", "https://")):
        raise sample_error(index, "unreadable_image", f"image {ref!r} is a remote URL; vlmtune does not fetch images "
                                                      "over the network: download them and use local paths")
    if ref.startswith("data:") and ";base64," in ref:
        try:
            data = base64.b64decode(ref.split(";base64,", 1)[1])
        except binascii.Error as e:
            raise sample_error(index, "unreadable_image", f"data: URI image is not valid base64 ({e})") from e
        return _decode(io.BytesIO(data), "data: URI", index, max_pixels)
    path = local_path(ref, root)
    if not path.is_file():
        raise sample_error(index, "unreadable_image", f"image {ref!r} not found (looked at {str(path)!r}); fix the "
                                                      "path or set the data source's image_root")
    return _decode(path, ref, index, max_pixels)


def _decode(source: PIL.Image.Image | io.BytesIO | Path, label: str, index: int, max_pixels: int) -> PIL.Image.Image:
    # Force-load every pixel here, so a truncated or corrupt file is one counted SampleError now.
    try:
        if isinstance(source, PIL.Image.Image):
            check_pixels(source.width, source.height, "image", label, index, max_pixels)
            source.load()
            return to_rgb(source)
        with PIL.Image.open(source) as im:
            # From the header, before any pixel is decoded.
            check_pixels(im.width, im.height, "image", label, index, max_pixels)
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise sample_error(index, "unreadable_image",
                           f"image {label!r} could not be read ({reason}); fix or remove the file") from e


def image_summary(im: PIL.Image.Image, thumbnail: int = 0) -> dict:
    """What a person checks of a decoded image before training on it: its size, the mean of each channel (0-255;
    a washed-out or inverted image shows here) and, with `thumbnail` > 0, a PNG data: URI at most that wide."""
    summary = {"width": im.width, "height": im.height,
               "mean": [round(float(m), 2) for m in np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0)]}
    if thumbnail:
        small = im.copy()
        small.thumbnail((thumbnail, thumbnail))
        buf = io.BytesIO()
        small.save(buf, format="PNG")
        summary["thumbnail"] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return summary


def check_pixels(width: int, height: int, what: str, label: str, index: int, max_pixels: int) -> None:
    """`what` ("image" or "video": a video's frame size) under data.max_image_pixels, from the header."""
    if width * height > max_pixels:
        raise sample_error(index, f"{what}_too_large", f"{what} {label!r} is {width} x {height} = {width * height:,} "
                                                       f"pixels, more than data.max_image_pixels={max_pixels:,}; "
                                                       f"shrink the {what} or raise data.max_image_pixels")


def _to_8bit(im: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit (I;16*), 32-bit integer (I, read as 16-bit content, as PNG and TIFF store it) and float (F: 0-1, or
    16-bit range above 1) greyscale scaled to 8 bits as a viewer shows them, not clipped at 255."""
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    scale = 255.0 if im.mode == "F" and a.size and a.max() <= 1.0 else 1 / 257  # 65535 -> 255
    return PIL.Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")


def to_rgb(im: PIL.Image.Image) -> PIL.Image.Image:
    im = PIL.ImageOps.exif_transpose(im)  # the orientation a camera recorded; a copy only where it applies
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    # Transparent pixels go on white, as transformers' convert_to_rgb does, so documents stay readable.
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
