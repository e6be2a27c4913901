"""Vision towers that attend window by window or image by image, as one attention call per block, no host syncs.

transformers' Qwen2-VL ... Qwen3.5 and Kimi K2.5 (Kimi-VL's MoonViT) vision attentions, under any implementation
whose name lacks "flash", read the segment lengths back from the device (``lengths.tolist()``) in every block and
then run one sdpa call per window or image: a Qwen2.5-VL receipt has ~100 windows, so ~3,000 tiny calls per
forward. :func:`use_varlen_vision_attention` swaps each such module of *this model instance* (as
vlmtune/kernels.py does for norms) for :class:`VarlenVisionAttention`: the same projections (the same child
modules, so parameter names, PEFT targets, FSDP units and checkpoints are unchanged), the family's own rotary
function, and :func:`vlmtune.varlen.attend` over all segments at once.

What the towers compute from ``grid_thw`` each forward (segment boundaries, window order, rotary position ids,
position-embedding interpolation) the batcher computes on the host with transformers' own helpers
(``transformers.vision_utils``) and passes as ``image_*`` / ``video_*`` keywords, which transformers routes to the
tower (``accepts_precomputed_kwargs``) and the tower pops instead of computing: :class:`VisionInputs`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import vision_utils

from vlmtune.varlen import attend, longest_segment

# The stock vision attention classes (module.qualname) whose forward this module reproduces; tests/test_varlen.py
# compares each with the swap, logits and gradients.
VISION_ATTENTIONS = {
    "transformers.models.qwen2_vl.modeling_qwen2_vl.VisionAttention",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLVisionAttention",
    "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionAttention",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeVisionAttention",
    "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5VisionAttention",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeVisionAttention",
    "transformers.models.kimi_k25.modeling_kimi_k25.Kimi_K25VisionAttention",
}
# The towers around them, and how each one's per-forward inputs are computed (see VisionInputs.of).
QWEN_TOWERS = ("Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel",
               "Qwen3VLVisionModel", "Qwen3VLMoeVisionModel", "Qwen3_5VisionModel", "Qwen3_5MoeVisionModel")
KIMI_TOWERS = ("Kimi_K25VisionModel",)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class VarlenVisionAttention(torch.nn.Module):
    """A stock vision attention's computation with one :func:`attend` call over all its segments.

    Keeps the stock module's projections as its own children (fused ``qkv`` for Qwen, ``q_proj`` / ``k_proj`` /
    ``v_proj`` for Kimi K2.5, and ``proj``) and calls the rotary function of the stock module's own file.
    """

    def __init__(self, stock: torch.nn.Module):
        super().__init__()
        for name, child in stock.named_children():
            self.add_module(name, child)
        self.num_heads, self.head_dim, self.scaling = stock.num_heads, stock.head_dim, stock.scaling
        self.attention_dropout = stock.attention_dropout
        self.num_key_value_groups, self.is_causal = 1, False  # read by transformers' sdpa (CPU path)
        self.config = stock.config
        self.rotary = sys.modules[type(stock).__module__].apply_rotary_pos_emb_vision
        self.fused = hasattr(stock, "qkv")

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, max_seqlen: int | None = None,
                **kwargs) -> torch.Tensor:
        n = hidden_states.shape[0]
        cos, sin = position_embeddings
        if self.fused:  # Qwen: [n, 3, heads, dim], rotary over [n, heads, dim]
            q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).unbind(1)
            q, k = self.rotary(q, k, cos, sin)
        else:  # Kimi K2.5: rotary over [1, n, heads, dim]
            q, k, v = (proj(hidden_states).reshape(1, n, -1, self.head_dim) for proj in
                       (self.q_proj, self.k_proj, self.v_proj))
            q, k = self.rotary(q, k, cos, sin)
            q, k, v = q[0], k[0], v[0]
        out = attend(q, k, v, cu_seqlens, max_seqlen, module=self, scale=self.scaling, causal=False,
                     dropout=self.attention_dropout if self.training else 0.0)
        return self.proj(out.reshape(n, -1))


def use_varlen_vision_attention(model: torch.nn.Module) -> int:
    """Swap the model's stock vision attentions (VISION_ATTENTIONS, attending with sdpa) for VarlenVisionAttention;
    returns how many. Other implementations (eager, flash_attention_2) are left as chosen."""
    swaps = [(name, m) for name, m in model.named_modules() if qualname(type(m)) in VISION_ATTENTIONS
             and getattr(m.config, "_attn_implementation", None) == "sdpa"]
    for name, stock in swaps:
        model.set_submodule(name, VarlenVisionAttention(stock))
    return len(swaps)


@dataclass(frozen=True)
class VisionInputs:
    """What a model's vision tower computes from each batch's grids, computed on the host instead: the batch gets
    ``<modality>_<name>`` keywords (``image_cu_seqlens``, ``video_window_index`` ...) that the tower pops."""

    merge: int  # spatial merge size of the rotary position ids (MoonViT: 1, its positions are per patch)
    merge_temporal: bool  # one attention segment per clip, not per frame (MoonViT)
    window: tuple[int, int] | None = None  # Qwen2.5-VL: (window_size, patch_size) of its window attention
    interpolation: tuple[int, str, bool] | None = None  # Qwen3-VL+: (grid per side, mode, align_corners)
    grid_keys: tuple[tuple[str, str], ...] = (("image", "image_grid_thw"), ("video", "video_grid_thw"))

    @classmethod
    def of(cls, model: torch.nn.Module) -> VisionInputs | None:
        """The model's tower, or None if it has none of the known ones."""
        for module in model.modules():
            names = {c.__name__ for c in type(module).__mro__}
            if names & set(QWEN_TOWERS):
                window = ((module.window_size, module.patch_size) if hasattr(module, "fullatt_block_indexes")
                          else None)
                interpolation = ((module.num_grid_per_side, module.interpolation_mode,
                                  module.interpolation_align_corners) if hasattr(module, "num_grid_per_side")
                                 else None)
                return cls(module.spatial_merge_size, False, window, interpolation)
            if names & set(KIMI_TOWERS):  # Kimi-VL: (rows, columns) grids, one frame per image
                return cls(1, True, grid_keys=(("image", "image_grid_hws"),))
        return None

    def __call__(self, batch: dict) -> dict:
        """The keywords to add to `batch` (its grids on the CPU)."""
        out = {}
        for modality, key in self.grid_keys:
            grid = batch.get(key)
            if grid is None or not len(grid):
                continue
            if grid.shape[-1] == 2:  # Kimi-VL's (rows, columns) -> (frames, rows, columns)
                grid = F.pad(grid, (1, 0), value=1)
            out.update({f"{modality}_{name}": value for name, value in self.for_grid(grid).items()})
        return out

    def for_grid(self, grid: torch.Tensor) -> dict:
        out = {"position_ids": vision_utils.get_vision_position_ids(grid, self.merge)}
        cu = vision_utils.get_vision_cu_seqlens(grid, merge_temporal=self.merge_temporal)
        out.update(cu_seqlens=cu, max_seqlen=longest_segment(cu))
        if self.window is not None:
            window_index, cu_window = vision_utils.get_vision_window_index(grid, self.merge, *self.window)
            out.update(window_index=window_index, cu_window_seqlens=cu_window,
                       max_window_seqlen=longest_segment(cu_window))
        if self.interpolation is not None:
            side, mode, corners = self.interpolation
            indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
                grid, side, mode=mode, align_corners=corners, spatial_merge_size=self.merge)
            out.update(interp_indices=indices, interp_weights=weights)
        return out
