"""Kimi-VL's image processor (``KimiVLImageProcessor``, the official ``preprocessor_config.json``'s fields).

Native resolution: an image keeps its size unless its patch count ``(w // 14) * (h // 14)`` exceeds
``in_token_limit``; then it is scaled by ``sqrt(in_token_limit / patches)`` (bicubic, sizes truncated to integers).
With ``pad_input`` it is then padded with black on the right and bottom to a multiple of ``merge_kernel_size *
patch_size`` (else centre-cropped to a multiple of ``patch_size``), normalised, and cut into ``patch_size`` squares
in raster order: ``pixel_values`` [patches, 3, 14, 14] and ``image_grid_hws`` [images, 2] (patch rows, columns).
An image gives ``rows * columns / (merge_h * merge_w)`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import make_flat_list_of_images

# The class defaults are the reference implementation's (OpenAI CLIP's normalisation, no padding); the checkpoints'
# preprocessor_config.json sets its own values (see tests/assets/kimi-vl/SOURCE.md).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Side of the largest patch grid MoonViT takes (its rotary table in the reference implementation is 512 x 512).
MAX_GRID_SIDE = 512


class KimiVLImageProcessor(BaseImageProcessor):
    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_grid_hws"]

    def __init__(self, patch_size: int = 14, pad_input: bool = False, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, in_token_limit: int = 4096,
                 merge_kernel_size: Sequence[int] = (2, 2), num_pooled_tokens: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.pad_input = pad_input
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.in_token_limit = in_token_limit
        self.merge_kernel_size = list(merge_kernel_size)
        self.num_pooled_tokens = num_pooled_tokens  # an official field the algorithm does not read

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the token-limit rescale, before padding."""
        p = self.patch_size
        patches = (width // p) * (height // p)
        if patches <= self.in_token_limit:
            return width, height
        scale = math.sqrt(self.in_token_limit / patches)
        return int(width * scale), int(height * scale)

    def num_image_tokens(self, width: int, height: int) -> int:
        """Tokens an image of this size gives (what ``__call__`` produces, without processing it)."""
        grid_h, grid_w = self._grid(*self.output_size(width, height))
        return grid_h * grid_w // (self.merge_kernel_size[0] * self.merge_kernel_size[1])

    def _grid(self, width: int, height: int) -> tuple[int, int]:
        p = self.patch_size
        if self.pad_input:
            bh, bw = (k * p for k in self.merge_kernel_size)
            return math.ceil(height / bh) * bh // p, math.ceil(width / bw) * bw // p
        return height // p, width // p

    def _prepare(self, image: PIL.Image.Image) -> PIL.Image.Image:
        image = image.convert("RGB")
        size = self.output_size(*image.size)
        if size != image.size:
            image = image.resize(size, PIL.Image.Resampling.BICUBIC)
        grid_h, grid_w = self._grid(*image.size)
        p = self.patch_size
        if self.pad_input:
            padded = PIL.Image.new("RGB", (grid_w * p, grid_h * p), (0, 0, 0))
            padded.paste(image, (0, 0))
            image = padded
        else:
            left, top = (image.width - grid_w * p) // 2, (image.height - grid_h * p) // 2
            image = image.crop((left, top, left + grid_w * p, top + grid_h * p))
        if grid_h == 0 or grid_w == 0:
            raise ValueError(f"image of {image.size[0]}x{image.size[1]} px is smaller than one {p}x{p} patch")
        if grid_h >= MAX_GRID_SIDE or grid_w >= MAX_GRID_SIDE:
            raise ValueError(f"image grid {grid_h}x{grid_w} patches exceeds MoonViT's {MAX_GRID_SIDE - 1} per side; "
                             "lower in_token_limit (model.processor_kwargs) or resize the image")
        return image

    def _patches(self, image: PIL.Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # C, H, W
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        x = (x - mean) / std
        c, h, w = x.shape
        patches = x.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c, p, p)
        return patches, (h // p, w // p)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        unknown = set(kwargs) - {"do_convert_rgb", "data_format", "input_data_format"}
        if unknown:
            raise TypeError(f"KimiVLImageProcessor got unknown arguments {sorted(unknown)}; its settings are "
                            "patch_size, pad_input, image_mean, image_std, in_token_limit, merge_kernel_size")
        pixel_values, grids = [], []
        for image in make_flat_list_of_images(images):
            pil = image if isinstance(image, PIL.Image.Image) else to_pil_image(image)
            patches, grid = self._patches(self._prepare(pil))
            pixel_values.append(patches)
            grids.append(grid)
        data = {"pixel_values": torch.cat(pixel_values), "image_grid_hws": torch.tensor(grids, dtype=torch.long)}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
