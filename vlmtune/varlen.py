"""The kernel entry of variable-length attention (used by vlmtune/attention.py for packed text rows and by
vlmtune/vision.py for vision towers): q, k, v [tokens, heads, dim] + cumulative segment lengths -> [tokens, heads,
dim_v], one call for every segment.

On CUDA with fp16 / bf16 it is ``torch.nn.attention.varlen.varlen_attn`` (torch's built-in FlashAttention-2 / cuDNN
varlen kernel, no flash-attn build); elsewhere (CPU, fp32) segments of equal length are stacked into one batch and
attended by transformers' own ``sdpa_attention_forward``, which is what the stock path computes one segment at a
time, so the result is sdpa's.
"""

from __future__ import annotations

import functools
import inspect
from itertools import pairwise

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def longest_segment(cu_seqlens: torch.Tensor) -> int:
    """The longest segment of cumulative bounds (0 for none); a read-back when they are on the GPU."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0


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
        max_seqlen = longest_segment(cu_seqlens)
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
