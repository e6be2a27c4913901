"""Nemotron-Parse's image processor and processor, saved and loaded in the official checkpoint's file layout.

The official image processor (remote code ``hf_nemotron_parse_processor.py``, albumentations 1.4.1 and OpenCV as
pinned in the checkpoint's requirements.txt) turns a page into the model's 2048 x 1648 input as follows:

1. RGB (PIL ``convert("RGB")``), as a uint8 array;
2. shrink to fit, keeping the aspect ratio (``syntax.resized_size``), never enlarging, with ``cv2.resize``
   ``INTER_LINEAR`` (uint8 in, uint8 out);
3. ``A.PadIfNeeded`` (position "center", BORDER_CONSTANT, value 255): the page centred on white, the odd pixel
   of padding right / bottom (``syntax.page_offset``);
4. ``ToTensor``: float32, divided by 255. No normalisation: the C-RADIO encoder normalises inside the model.

Step 2 is computed here the way OpenCV computes it, so the pixels are the same without OpenCV: bilinear with
half-pixel centres and no antialiasing, source positions in float32, weights rounded to 1/2048, the horizontal pass
exact in integers and the vertical one in OpenCV's SIMD fixed point (``_cv2_linear_resize``). Measured equal, pixel
for pixel, to ``cv2.resize`` of opencv-python-headless 4.12.0.88 (x86-64) on random pages, including exact halvings
(where OpenCV switches to area averaging, which gives the same values).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

import vlmtune.models.nemotron_parse.syntax as syntax

PROCESSOR_CONFIG = "processor_config.json"


class NemotronParseImageProcessorKwargs(ImagesKwargs, total=False):
    final_size: list[int] | tuple[int, int]


class NemotronParseImageProcessor(BaseImageProcessor):
    """Resize to fit and centre-pad (white) every page to `final_size` (height, width); pixels in [0, 1].

    The official preprocessor_config.json gives the size twice (``final_size`` and ``size``); ``final_size`` wins,
    so ``AutoProcessor.from_pretrained(path, final_size=[h, w])`` (vlmtune: ``model.processor_kwargs``) overrides it.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values"]
    valid_kwargs = NemotronParseImageProcessorKwargs

    def __init__(self, final_size: Sequence[int] | None = None, size: dict[str, Any] | None = None,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = False, **kwargs):
        super().__init__(**kwargs)
        final = _final_size(final_size, size)
        if do_normalize:
            raise ValueError(
                "NemotronParseImageProcessor: do_normalize=true is not supported; the C-RADIO encoder normalises "
                "pixel values itself (its input conditioner), so the processor must pass them in [0, 1]")
        self.final_size = list(final)
        self.size = {"height": final[0], "width": final[1], "longest_edge": list(final)}
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = False

    def to_dict(self) -> dict[str, Any]:
        # The official preprocessor_config.json also names its class as a feature extractor and its processor, and
        # states the size twice; final_size is the one this class reads (it may have been set after construction).
        out = {"feature_extractor_type": type(self).__name__, "processor_class": "NemotronParseProcessor",
               **super().to_dict()}
        height, width = out["final_size"]
        out["size"] = {"height": height, "width": width, "longest_edge": [height, width]}
        return out

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """`images`: a page or a list of pages (PIL images, or uint8 arrays H x W x 3 or H x W)."""
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"NemotronParseImageProcessor got unexpected options {unknown}; its only setting is "
                            "final_size=(height, width), given when it is built")
        pages = images if isinstance(images, (list, tuple)) else [images]
        if not pages:
            raise ValueError("NemotronParseImageProcessor: no images given")
        pixels = torch.stack([self.page_pixels(page) for page in pages])
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)

    def page_pixels(self, image) -> torch.Tensor:
        """(3, height, width) float32 pixels of one page on the model's canvas."""
        array = _rgb_uint8(image)
        height, width = array.shape[:2]
        new_width, new_height = syntax.resized_size(width, height, self.final_size)
        page = _cv2_linear_resize(torch.from_numpy(array), new_width, new_height).permute(2, 0, 1)
        left, top = syntax.page_offset(width, height, self.final_size)
        canvas = torch.full((3, *self.final_size), 255, dtype=torch.uint8)
        canvas[:, top:top + new_height, left:left + new_width] = page
        pixels = canvas.to(torch.float32)
        # ToTensor divides by 255 in float32; dividing by 1 / (1/255) (== 255.0 in float32) is the same to the bit.
        return pixels.div_(1 / self.rescale_factor) if self.do_rescale else pixels


def _cv2_linear_resize(page: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(H, W, C) uint8 -> (height, width, C) uint8, as ``cv2.resize(page, (width, height), cv2.INTER_LINEAR)``."""
    if page.shape[:2] == (height, width):
        return page
    columns, column_weights = _cv2_linear_taps(page.shape[1], width)
    rows, row_weights = _cv2_linear_taps(page.shape[0], height)
    # Horizontal pass, exact: sums of uint8 x weight/2048, at most 255 * 2048.
    across = page.index_select(1, columns[0]).to(torch.int32).mul_(column_weights[0][:, None])
    across += page.index_select(1, columns[1]).to(torch.int32).mul_(column_weights[1][:, None])
    # Vertical pass, OpenCV's SIMD fixed point (VResizeLinearVec_32s8u): (((s >> 4) * w) >> 16) per tap, then a
    # rounding shift by 2. Its scalar formula, (s0 * w0 + s1 * w1 + 2**21) >> 22, differs in the last bit.
    across >>= 4
    top = across.index_select(0, rows[0]).mul_(row_weights[0][:, None, None]).bitwise_right_shift_(16)
    bottom = across.index_select(0, rows[1]).mul_(row_weights[1][:, None, None]).bitwise_right_shift_(16)
    return top.add_(bottom).add_(2).bitwise_right_shift_(2).clamp_(0, 255).to(torch.uint8)


def _cv2_linear_taps(size: int, new_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Source indices and 1/2048 weights of each output position along one axis (OpenCV's resize coefficients)."""
    scale = 1.0 / (new_size / size)  # OpenCV: scale = 1 / inv_scale, inv_scale = new / old, in double
    position = ((np.arange(new_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first).astype(np.float32)
    outside = (first < 0) | (first >= size - 1)  # clamped to the border pixel, weight 1
    fraction[outside] = 0
    first = np.clip(first, 0, size - 1)
    weights = (np.rint((np.float32(1) - fraction) * np.float32(2048)), np.rint(fraction * np.float32(2048)))
    second = np.minimum(first + 1, size - 1)
    return ((torch.from_numpy(first), torch.from_numpy(second)),
            tuple(torch.from_numpy(w.astype(np.int32)) for w in weights))


def _final_size(final_size: Sequence[int] | None, size: dict[str, Any] | None) -> tuple[int, int]:
    """(height, width) from `final_size`, else from the official `size` dict (its longest_edge, else height/width)."""
    if final_size is not None:
        final = tuple(int(v) for v in final_size)
    elif size is not None:
        if isinstance(size.get("longest_edge"), (list, tuple)):
            final = tuple(int(v) for v in size["longest_edge"])
        elif "height" in size and "width" in size:
            final = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(f"NemotronParseImageProcessor: size={size!r} needs height and width")
    else:
        final = syntax.FINAL_SIZE
    if len(final) != 2 or min(final) <= 0:
        raise ValueError(f"NemotronParseImageProcessor: final_size must be (height, width), got {list(final)}")
    return final[0], final[1]


def _rgb_uint8(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        if image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] == 3:
            return np.ascontiguousarray(image)
    raise TypeError("NemotronParseImageProcessor takes PIL images or uint8 arrays (H x W x 3, or H x W grey), got "
                    f"{type(image).__name__}" + (f" {image.dtype} {image.shape}" if hasattr(image, "shape") else ""))


def _name_tokenizer_class(path: Path, tokenizer) -> None:
    """transformers 5 names its tokenizers.json-backed class ``TokenizersBackend``, which transformers 4 (the
    official remote code's) cannot load; the official file says ``PreTrainedTokenizerFast``, an alias of it in 5."""
    from transformers import PreTrainedTokenizerFast

    if type(tokenizer) is PreTrainedTokenizerFast and path.is_file():
        config = json.loads(path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class NemotronParseProcessor(ProcessorMixin):
    """Image processor + tokenizer (the checkpoint's ``PreTrainedTokenizerFast``), as the official processor.

    ``processor(images=pages)`` gives ``pixel_values``; ``processor(text=...)`` tokenises as the tokenizer does (pass
    ``add_special_tokens=False`` for the decoder prompt ``syntax.PROMPT``). Saved as the official checkpoint lays
    its files out: preprocessor_config.json, processor_config.json and the tokenizer's files.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, images=None, text=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("NemotronParseProcessor: give images and/or text")
        data: dict[str, Any] = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=None))
        if text is not None:
            data.update(self.tokenizer(text, **kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def parse(self, text: str, image_size: Sequence[int] | None = None, units: syntax.Units = "pixels"):
        """The blocks of a decoded generation (``syntax.parse_page`` on this processor's canvas size)."""
        return syntax.parse_page(text, image_size, units, self.image_processor.final_size)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        """The official layout: transformers 5 would fold the image processor into processor_config.json."""
        if push_to_hub:
            raise NotImplementedError("NemotronParseProcessor.save_pretrained: push the saved folder with `hf upload`")
        folder = Path(save_directory)
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.init_kwargs["processor_class"] = type(self).__name__
        files = list(self.tokenizer.save_pretrained(folder))
        _name_tokenizer_class(folder / "tokenizer_config.json", self.tokenizer)
        files += list(self.image_processor.save_pretrained(folder))
        config = {"processor_class": type(self).__name__, "image_processor_type": type(self.image_processor).__name__}
        auto_map = getattr(self.image_processor, "auto_map", None)
        if auto_map:
            config["auto_map"] = auto_map
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return [str(f) for f in files] + [str(folder / PROCESSOR_CONFIG)]
