"""Attention over variable-length segments: packed text rows and vision windows, one call per layer, no host syncs.

``train.attention: varlen`` (the default) switches two things on at model load, both exact against the stock path
(tests/test_varlen.py, tests/test_packing.py):

- **Text, packed rows** (``train.packing``): the language model's attention is registered in transformers'
  ``AttentionInterface`` as ``VARLEN`` ("vlmtune_varlen"; a name with "flash" in it would make transformers import
  flash-attn or hub kernels) and *no* mask function, so transformers builds no N x N mask and reads nothing back
  from the positions. The batcher passes each packed row's boundaries, computed on the host, as transformers' own
  varlen keywords (``cu_seq_lens_q/k``, ``max_length_q/k``, see :func:`packed_row_inputs`).
- **Vision towers** that attend window by window or image by image (Qwen2-VL ... Qwen3.5, Kimi-VL's MoonViT):
  vlmtune/vision.py swaps their attention modules for ones that call :func:`attend` once per block.

:func:`attend` is the one kernel entry: on CUDA with fp16 / bf16 it is ``torch.nn.attention.varlen.varlen_attn``
(torch's built-in FlashAttention-2 / cuDNN varlen kernel: one launch for every segment, no flash-attn build);
elsewhere (CPU, fp32) segments of equal length are gathered into one batch and attended by transformers' own
``sdpa_attention_forward``, which is what the stock path computes one segment at a time, so the result is sdpa's.

``segment_sdpa`` (``train.attention: stock`` with packing, and families whose text attention needs more than a
causal or sliding-window mask, e.g. Llama 4's chunked layers) reads the samples back from transformers' mask.
"""

from __future__ import annotations

import functools
import inspect
from itertools import pairwise

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "vlmtune_varlen"
SEGMENT_SDPA = "vlmtune_segment_sdpa"
ROWS_PER_CHECK = 1024
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # transformers' varlen keywords


# ---------------------------------------------------------------------------------------------------------
# The kernel entry: q, k, v [tokens, heads, dim] + cumulative segment lengths -> [tokens, heads, dim_v]


@functools.cache
def varlen_parameters() -> frozenset[str]:
    """The keyword parameters of this torch's ``varlen_attn`` (torch 2.10 takes ``is_causal``, 2.11+ ``window_size``,
    ``scale`` and ``enable_gqa``), or none if it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_kernel_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                         window: int | None = None) -> bool:
    """Whether torch's varlen kernel runs this call: CUDA, fp16 / bf16, head dims FlashAttention takes, no dropout,
    and a torch whose varlen_attn has what the call needs."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or dropout > 0:
        return False
    if not (k.dtype == v.dtype == q.dtype) or q.shape[-1] != k.shape[-1] or v.shape[-1] > q.shape[-1]:
        return False
    if q.shape[-1] % 8 or q.shape[-1] > 256 or q.shape[1] % k.shape[1]:
        return False
    have = varlen_parameters()
    return bool(have) and (window is None or "window_size" in have)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None, *,
           module: torch.nn.Module, scale: float | None, causal: bool, window: int | None = None,
           dropout: float = 0.0) -> torch.Tensor:
    """Attention within each segment ``[cu_seqlens[i], cu_seqlens[i+1])`` of the token axis.

    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] -> [T, Hq, Dv]. ``window``: a token sees the ``window`` last tokens
    of its segment, itself included (transformers' ``sliding_window``). ``max_seqlen``: the longest segment (or any
    larger bound), given by the caller so that CUDA needs no read-back; computed (one sync) when None.
    """
    if varlen_kernel_usable(q, k, v, dropout, window):
        return _cuda_varlen(q, k, v, cu_seqlens, max_seqlen, scale, causal, window)
    return _grouped_sdpa(q, k, v, cu_seqlens, module, scale, causal, window, dropout)


def _cuda_varlen(q, k, v, cu_seqlens, max_seqlen, scale, causal, window) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    have = varlen_parameters()
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    dv = v.shape[-1]
    if dv < q.shape[-1]:  # MLA (DeepSeek-V3 / Mistral 4): value heads narrower than query / key heads
        v = F.pad(v, (0, q.shape[-1] - dv))
    kwargs = {}
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        if "enable_gqa" in have:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if scale is not None:
        if "scale" in have:
            kwargs["scale"] = scale
        else:  # the kernel's own scale is 1/sqrt(D)
            q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in have:
        kwargs["window_size"] = (window - 1 if window is not None else -1, 0 if causal else -1)
    else:
        kwargs["is_causal"] = causal
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)[..., :dv]


@torch.compiler.disable  # host-side grouping by length: run eagerly inside a compiled region (train.compile)
def _grouped_sdpa(q, k, v, cu_seqlens, module, scale, causal, window, dropout) -> torch.Tensor:
    """Segments of equal length as one batch through transformers' sdpa: what sdpa per segment computes.

    The segments are split off as views and stacked per length, and the outputs concatenated back in order: the
    backward of split / stack / cat moves each gradient once (gathering by index would scatter into a zeroed
    full-size tensor for every group)."""
    bounds = cu_seqlens.tolist()  # CPU here (or the CUDA fallback: one read-back)
    lengths = [e - s for s, e in pairwise(bounds)]
    if len(set(lengths)) == 1 and lengths[0] and bounds[-1] == q.shape[0]:  # windows of one size: a view, no copy
        out, _ = _sdpa(*(t.reshape(len(lengths), lengths[0], *t.shape[1:]) for t in (q, k, v)), module, scale,
                       causal, window, dropout)
        return out.reshape(-1, *out.shape[2:])
    pieces = [torch.split(t[:bounds[-1]], lengths) for t in (q, k, v)]
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        if length:
            groups.setdefault(length, []).append(i)
    outputs: list[torch.Tensor | None] = [None] * len(lengths)
    for members in groups.values():
        out, _ = _sdpa(*(torch.stack([p[i] for i in members]) for p in pieces), module, scale, causal, window,
                       dropout)
        for i, o in zip(members, out.unbind(0), strict=True):
            outputs[i] = o
    return torch.cat([o for o in outputs if o is not None])


def _sdpa(q, k, v, module, scale, causal, window, dropout):
    """sdpa over [segments, length, heads, dim] -> [segments, length, heads, dim_v], by transformers' own."""
    length = q.shape[1]
    mask = None
    if causal and window is not None and length > window:
        i = torch.arange(length, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return sdpa_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                  dropout=dropout, scaling=scale, is_causal=causal and mask is None)


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
    longest = int((bounds[1:] - bounds[:-1]).max())
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


def text_configs(model: torch.nn.Module) -> list[str]:
    """The sub-config keys of the model's language model (``text_config`` in every supported family)."""
    return [key for key in getattr(model.config, "sub_configs", {}) if key == "text_config"]


def use_varlen_text_attention(model: torch.nn.Module) -> bool:
    """Switch the language model of a model that attends with sdpa to VARLEN (packed rows only); False if it
    cannot (see :func:`text_attention_blocker`), and the model is left unchanged."""
    if text_attention_blocker(model) or not text_configs(model):
        return False
    AttentionInterface.register(VARLEN, varlen_attention)
    model.set_attn_implementation({key: VARLEN for key in text_configs(model)})
    return model.config.get_text_config()._attn_implementation == VARLEN


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
    from vlmtune.vision import use_varlen_vision_attention

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
    from vlmtune.vision import VarlenVisionAttention, VisionInputs

    vision = VisionInputs.of(model) if any(isinstance(m, VarlenVisionAttention) for m in model.modules()) else None
    text = uses_varlen_text(model)
    if vision is None and not text:
        return None
    return HostInputs(vision, text, bucket)


def bucketed(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class HostInputs:
    """Adds the attention keywords to a micro-batch on the host (see :func:`host_inputs`)."""

    def __init__(self, vision, packed_text: bool, bucket: bool):
        self.vision, self.packed_text, self.bucket = vision, packed_text, bucket

    def __call__(self, batch: dict) -> dict:
        out = self.vision(batch) if self.vision is not None else {}
        if self.packed_text and "attention_mask" not in batch and "position_ids" in batch:
            out.update(packed_row_inputs(batch["position_ids"]))
        if self.bucket:
            out = {k: bucketed(v) if isinstance(v, int) and "max" in k else v for k, v in out.items()}
        return out
