"""Packed rows attended one sample at a time: exact, and without scoring pairs that the mask throws away.

With ``train.packing`` transformers hands ``sdpa`` a block-diagonal causal mask over the whole packed row, so the
masked kernel scores all N x N pairs (CPU) and cannot use the flash kernel (CUDA). ``segment_sdpa`` reads the
samples off that mask and runs sdpa causally on each sample alone: sum(n_i^2) scores instead of N^2, unmasked
kernels. A mask that is not exactly block-diagonal causal (padding, sliding windows, a vision tower's own mask)
goes to sdpa unchanged, so the result is always sdpa's.

It is registered in transformers' ``AttentionInterface`` (its extension point for custom attention; nothing in
transformers is replaced) under ``SEGMENT_SDPA``, with sdpa's mask function, and switched on per model.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_SDPA = "vlmtune_segment_sdpa"
ROWS_PER_CHECK = 1024


def segments(mask: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """[start, end) of each sample if `mask` ([1, 1, N, N], bool) is exactly block-diagonal causal, else None."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[:2] != (1, 1):
        return None
    m = mask[0, 0]
    n = m.shape[0]
    if m.shape[1] != n:
        return None
    starts = torch.ones(n, dtype=torch.bool, device=m.device)
    starts[1:] = ~m.diagonal(-1)  # a sample starts where a token may not see the one before it
    sample, col = starts.cumsum(0), torch.arange(n, device=m.device)
    for r in range(0, n, ROWS_PER_CHECK):  # the expected mask a slice at a time: no second N x N tensor
        row = col[r:r + ROWS_PER_CHECK, None]
        if not torch.equal(m[r:r + ROWS_PER_CHECK], (sample[row] == sample[None, :]) & (col[None, :] <= row)):
            return None
    bounds = [*starts.nonzero().squeeze(1).tolist(), n]
    return list(pairwise(bounds))


def segment_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q, k, v [batch, heads, N, d] -> output [batch, N, heads, d]."""
    bounds = segments(attention_mask)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs["is_causal"] = True
    outputs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
               for s, e in bounds]
    return torch.cat(outputs, dim=1), None


def use_segment_attention(model: torch.nn.Module) -> bool:
    """Switch a model that attends with sdpa to segment_sdpa (for packed training); False where it uses another."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(SEGMENT_SDPA, segment_sdpa)
    AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)
    model.set_attn_implementation(SEGMENT_SDPA)
    return model.config._attn_implementation == SEGMENT_SDPA
