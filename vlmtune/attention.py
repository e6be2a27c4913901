"""Attention over variable-length segments: packed text rows and vision windows, one call per layer, no host syncs.

``train.attention: varlen`` (the default) switches two things on at model load, both exact against the stock path
(tests/test_varlen.py, tests/test_packing.py):

- **Text, packed rows** (``train.packing``): the language model's attention is registered in transformers'
  ``AttentionInterface`` as ``VARLEN`` ("vlmtune_varlen"; a name with "flash" in it would make transformers import
  flash-attn or hub kernels) and *no* mask function, so transformers builds no N x N mask and reads nothing back
  from the positions. The batcher passes each packed row's boundaries, computed on the host, as transformers' own
  varlen keywords (``cu_seq_lens_q/k``, ``max_length_q/k``, see :func:`packed_row_inputs`).
- **Vision towers** that attend window by window or image by image (Qwen2-VL ... Qwen3.5, Kimi-VL's MoonViT):
  vlmtune/vision.py swaps their attention modules for ones that call the kernel once per block.

Both go through one kernel entry, :func:`vlmtune.varlen.attend` (torch's ``varlen_attn`` on CUDA, grouped sdpa
elsewhere). This module also applies ``train.attention`` at model load and adds the host-side keywords to each
micro-batch (:func:`setup_attention`, :func:`host_inputs`).

``segment_sdpa`` (``train.attention: stock`` with packing, and families whose text attention needs more than a
causal or sliding-window mask, e.g. Llama 4's chunked layers) reads the samples back from transformers' mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmtune.varlen import attend, longest_segment
from vlmtune.vision import VarlenVisionAttention, VisionInputs, use_varlen_vision_attention

VARLEN = "vlmtune_varlen"
SEGMENT_SDPA = "vlmtune_segment_sdpa"
ROWS_PER_CHECK = 1024


# ---------------------------------------------------------------------------------------------------------
# Text: packed rows


def packed_row_inputs(position_ids: torch.Tensor) -> dict:
    """transformers' varlen keywords for a packed row (vlmtune/batching.py's layout): a sample starts where its
    text position is 0. Computed on the host, so the model reads nothing back."""
    text = position_ids[0] if position_ids.dim() == 3 else position_ids  # Qwen: row 0 holds the text positions
    if text.shape[0] != 1:
        raise ValueError(f"a packed micro-batch is one row, got position_ids of shape {tuple(position_ids.shape)}")
    starts = (text[0] == 0).nonzero().squeeze(1).tolist()
    bounds = torch.tensor([*starts, text.shape[1]], dtype=torch.int32)
    longest = longest_segment(bounds)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, sliding_window: int | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q, k, v [batch, heads, N, d] -> output [batch, N, heads, d].

    A packed row (``cu_seq_lens_q`` given) or one unpadded row: :func:`attend` over its samples. Several rows
    come with a padding mask only if a mask function is registered, which ``VARLEN`` has not: they go to sdpa
    with plain causal attention, exact for right padding (the pad positions are never read), and refused with a
    sliding window."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(f"{VARLEN} does not support attention soft-capping or sink tokens; set "
                         "train.attention=stock for this model")
    if cu_seq_lens_q is None:
        if query.shape[0] > 1 or attention_mask is not None:
            if sliding_window is not None and query.shape[2] > sliding_window:
                raise ValueError(f"{VARLEN} attends packed rows; a batch of {query.shape[0]} padded rows with a "
                                 "sliding window needs train.attention=stock")
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        n = query.shape[2]
        cu_seq_lens_q, max_length_q = torch.tensor([0, n], dtype=torch.int32, device=query.device), n
    out = attend(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_seq_lens_q,
                 max_length_q, module=module, scale=scaling, causal=causal, window=sliding_window, dropout=dropout)
    return out.unsqueeze(0), None


def text_attention_blocker(model: torch.nn.Module) -> str:
    """Why VARLEN cannot stand in for this model's text attention ("" = it can): masks beyond causal + sliding."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "attention_chunk_size", None):
        return "chunked attention layers (attention_chunk_size)"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return f"attn_implementation={model.config._attn_implementation!r} was chosen"
    return ""


def use_varlen_text_attention(model: torch.nn.Module) -> bool:
    """Switch the language model of a model that attends with sdpa to VARLEN (packed rows only); False if it
    cannot (see :func:`text_attention_blocker`), and the model is left unchanged."""
    if text_attention_blocker(model) or "text_config" not in getattr(model.config, "sub_configs", {}):
        return False
    AttentionInterface.register(VARLEN, varlen_attention)
    model.set_attn_implementation({"text_config": VARLEN})  # the language model only, not the vision tower
    return uses_varlen_text(model)


def uses_varlen_text(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) == VARLEN


# ---------------------------------------------------------------------------------------------------------
# segment_sdpa: the samples read back from transformers' block-diagonal mask (the fallback)


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


# ---------------------------------------------------------------------------------------------------------
# Set-up at model load, and the host-side inputs the batcher adds to each micro-batch


def setup_attention(model: torch.nn.Module, mode: str, packed: bool) -> dict[str, object]:
    """Apply ``train.attention`` to a loaded model (before adapters and sharding); returns what was done.

    varlen: vision towers swapped (vlmtune/vision.py); packed text through VARLEN where its masks allow, else
    segment_sdpa. stock: transformers' attention, with segment_sdpa for packed rows."""
    done: dict[str, object] = {"vision_modules": 0, "text": "stock"}
    if mode == "varlen":
        done["vision_modules"] = use_varlen_vision_attention(model)
    if packed:
        if mode == "varlen" and use_varlen_text_attention(model):
            done["text"] = VARLEN
        elif use_segment_attention(model):
            done["text"] = SEGMENT_SDPA
    return done


def host_inputs(model: torch.nn.Module, bucket: bool = False):
    """The function the batcher calls on each collated micro-batch to add the keywords this model's attention
    reads (packed-row boundaries, vision segments), or None if it reads none. ``bucket`` (``train.compile``): the
    longest-segment bounds rounded up to a power of two (they are upper bounds for the kernel), so a compiled
    region sees a few values of them, not one per batch."""
    vision = VisionInputs.of(model) if any(isinstance(m, VarlenVisionAttention) for m in model.modules()) else None
    text = uses_varlen_text(model)
    if vision is None and not text:
        return None
    return HostInputs(vision, text, bucket)


def bucketed(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class HostInputs:
    """Adds the attention keywords to a micro-batch on the host (see :func:`host_inputs`)."""

    vision: VisionInputs | None
    packed_text: bool
    bucket: bool

    def __call__(self, batch: dict) -> dict:
        out = self.vision(batch) if self.vision is not None else {}
        if self.packed_text and "attention_mask" not in batch and "position_ids" in batch:
            out.update(packed_row_inputs(batch["position_ids"]))
        if self.bucket:
            out = {k: bucketed(v) if isinstance(v, int) and "max" in k else v for k, v in out.items()}
        return out
