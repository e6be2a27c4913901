"""Kimi-VL built from transformers' components: ``kimi_k25``'s MoonViT tower and projector, ``deepseek_v3``'s
text model, under the module names of the official checkpoint (``vision_tower``, ``multi_modal_projector``,
``language_model``).

What is transformers' own and what is not (tests/test_kimi_vl.py checks each claim numerically):

- Vision tower: ``Kimi_K25VisionModel`` computes what MoonViT computes for an image: the learned position table
  resampled bicubically to the patch grid (``F.interpolate``, align_corners=False), pre-norm blocks with
  GELU-tanh MLPs, attention image by image, 2-D rotary embedding (base 10000; pair ``2j`` of a head rotated by
  the column, ``2j+1`` by the row, both at frequency ``10000^(-4j/head_dim)``), a final LayerNorm, and 2x2
  patch groups in raster order. K2.5 adds a temporal embedding that is zero for single frames. Two
  differences are in the weights only, and the checkpoint conversion (conversion.py) handles them: MoonViT's
  fused ``wqkv`` is split into q/k/v, and its rotary layout (complex pairs ``(2j, 2j+1)``) is K2.5's half-split
  layout after a fixed permutation of the q and k rows. Kimi-VL's processor gives ``image_grid_hws`` (rows,
  columns); K2.5 takes ``grid_thw``: a frame count of 1 is prepended.
- Projector: ``Kimi_K25MultimodalProjection`` = Kimi-VL's (LayerNorm per patch, the 2x2 patches concatenated,
  linear, exact GELU, linear); only its linear layers' names differ (``linear_1``/``linear_2``).
- Text model: ``DeepseekV3ForCausalLM`` as is (MLA attention with interleaved rotary dims, sigmoid router with
  the score-correction bias, shared + routed experts, the official weight names but for the routed experts,
  which transformers stores fused per layer and converts on load and save).
- Ours: the composition (placeholder scatter, the checkpoint's module layout) and the 2-column image grids.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3ForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, MoeCausalLMOutputWithPast
from transformers.models.kimi_k25.modeling_kimi_k25 import (
    Kimi_K25MultimodalProjection,
    Kimi_K25VisionModel,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import accepts_precomputed_kwargs

from vlmtune.models.kimi_vl.configuration import KimiVLConfig, MoonViTConfig


def grid_thw(grid_hws: torch.Tensor) -> torch.Tensor:
    """Kimi-VL's (rows, columns) patch grids as K2.5's (frames, rows, columns), one frame per image."""
    if grid_hws.dim() != 2 or grid_hws.shape[-1] != 2:
        raise ValueError(f"image_grid_hws must have shape (images, 2) = (patch rows, patch columns) per image, got "
                         f"{tuple(grid_hws.shape)}")
    return F.pad(grid_hws, (1, 0), value=1)


class MoonViTModel(Kimi_K25VisionModel):
    """MoonViT: transformers' kimi_k25 vision tower, fed Kimi-VL's (rows, columns) image grids.

    Returns K2.5's output: ``pooler_output`` holds each 2x2 patch group ([groups, 4, hidden]) in raster order.
    """

    config: MoonViTConfig
    config_class = MoonViTConfig

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return super().forward(pixel_values, grid_thw=grid_thw(grid_hws), **kwargs)


class KimiVLPreTrainedModel(PreTrainedModel):
    config: KimiVLConfig
    config_class = KimiVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["Kimi_K25VisionEncoderLayer", "DeepseekV3DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


class KimiVLForConditionalGeneration(KimiVLPreTrainedModel, GenerationMixin):
    """Kimi-VL: image patches -> MoonViT -> 2x2 merge + MLP projector -> ``<|media_pad|>`` positions of a
    DeepSeek-V3 MoE language model."""

    def __init__(self, config: KimiVLConfig):
        super().__init__(config)
        self.vision_tower = MoonViTModel._from_config(config.vision_config)
        self.multi_modal_projector = Kimi_K25MultimodalProjection(config)
        self.language_model = DeepseekV3ForCausalLM._from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @accepts_precomputed_kwargs(modality="image")
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor, **kwargs) -> torch.Tensor:
        """[image tokens, text hidden]: every image's 2x2 patch groups, projected, in prompt order. ``kwargs``:
        the tower's inputs computed beforehand, as ``image_<name>`` (``image_cu_seqlens`` ...; vlmtune/vision.py)."""
        groups = self.vision_tower(pixel_values, image_grid_hws, **kwargs).pooler_output
        return self.multi_modal_projector(groups).squeeze(1)

    def placeholder_mask(self, input_ids: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("Kimi-VL needs input_ids with pixel_values: image features go to the positions of "
                             f"its <|media_pad|> token (id {self.config.media_placeholder_token_id})")
        mask = input_ids == self.config.media_placeholder_token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"the prompt has {int(mask.sum())} <|media_pad|> tokens but its images give "
                             f"{features.shape[0]} image tokens; let the processor expand each image's "
                             "<|media_pad|> (one per 2x2 patch group)")
        return mask

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hws: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if image_grid_hws is None:
                raise ValueError("pixel_values without image_grid_hws: the processor returns both")
            features = self.get_image_features(pixel_values, image_grid_hws, **kwargs)
            mask = self.placeholder_mask(input_ids, features)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device),
                                                         features.to(inputs_embeds.device, inputs_embeds.dtype))
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, use_cache=use_cache, labels=labels,
                                   logits_to_keep=logits_to_keep, **kwargs)

