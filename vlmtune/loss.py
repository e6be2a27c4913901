"""The training loss: next-token cross-entropy summed over the supervised tokens of a micro-batch.

Vocabularies reach 262k tokens (Gemma 3), so even the logits of the supervised tokens alone can take GBs
(tokens x vocabulary x 4 bytes, and as much again for their gradient). With ``chunk_tokens`` set, the output
head's input (the final hidden states) is taken at the supervised positions and the cross-entropy is computed
``chunk_tokens`` tokens at a time by :class:`LinearCrossEntropy`, which also computes, chunk by chunk, the
gradients w.r.t. the hidden states and the head weight: full-vocabulary logits exist for one chunk at a time and
backward only scales the stored gradients, so it costs the same matmuls as the plain path.

Precision: logits, softmax and the soft-cap are fp32; the matmuls run in the head's own dtype (autocast's when on).
In fp32 the result equals the plain path's to rounding. Under bf16 autocast on CUDA the logits come out of the
bf16 GEMM as fp32 (the plain path rounds them to bf16 first), and the weight gradient accumulates in fp32.

``train.kernels: liger`` swaps the chunk loop for Liger Kernel's Triton one (CUDA only; vlmtune/kernels.py).

How the hidden states are taken: a forward pre-hook on the head, in place for one forward, reads the head's
input (exactly what the head sees, whatever the family does before it) and computes the loss right there, while
the head weight is in its forward state (FSDP2 unshards it for the forward), then hands the head one position
per row, so the model's own logits shrink to ``rows x 1 x vocabulary``. Whatever the model does to the head's
output (Gemma 3n's final logit soft-capping) is checked once per model: the first call plants a probe row in
that input and compares the model's logits for it with :func:`head_logits`; a model that does anything else
takes the plain path from then on.
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtune.encode import IGNORE
from vlmtune.errors import TrainingError

PROBE_MAGNITUDE = 100.0  # largest probe logit: far into any soft-cap's flat part, so a cap shows at once
PROBE_TOLERANCE = 0.02  # of the probe magnitude: bf16 rounding of logits near 100 is 0.5, a missed cap is > 50

# Output head -> whether the model's logits for a probe row matched head_logits (the fused path is then safe).
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model gets from a micro-batch (vlmtune/batching.py): every tensor but the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def targets_of(labels: torch.Tensor) -> torch.Tensor:
    """The next-token targets: position t predicts labels[t + 1]; -100 (IGNORE) where nothing is trained."""
    return labels[:, 1:]


def supervised_count(labels: torch.Tensor) -> int:
    """The number of supervised tokens (targets that are trained) in a micro-batch's labels."""
    return int((targets_of(labels) != IGNORE).sum())


def loss_sum(model: torch.nn.Module, batch: dict, chunk_tokens: int | None = 1024, kernel: str = "torch",
             token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of next-token CE over the supervised tokens of one micro-batch.

    ``chunk_tokens=None``: one logits tensor for every supervised position (``logits_to_keep``). Otherwise the
    fused, chunked path (same value and gradients); it falls back to the plain path where it cannot be exact.
    ``kernel="liger"``: the fused path runs Liger Kernel's fused linear cross-entropy (CUDA; its own chunks).
    ``token_weights``: a weight per vocabulary id (``train.token_weights``, see :func:`token_weight_table`): each
    token's loss counts times the weight of its target; the step still divides by the number of supervised tokens.
    """
    if chunk_tokens is None:
        return plain_loss_sum(model, batch, token_weights)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1 (or None), got {chunk_tokens}")
    head = fusable_head(model)
    if head is None or _CHECKED.get(head) is False:
        return plain_loss_sum(model, batch, token_weights)
    return _fused_loss_sum(model, head, batch, chunk_tokens, kernel, token_weights)


def plain_loss_sum(model: torch.nn.Module, batch: dict, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of next-token losses over the supervised tokens of one micro-batch.

    Only positions that predict a supervised token get logits (``logits_to_keep``), so the full
    sequence x vocabulary logits are never built.
    """
    targets = targets_of(batch["labels"])
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    logits = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits
    return _ce_sum(logits, targets[:, keep], token_weights)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """Summed CE of [rows, positions, vocab] logits against targets (-100 ignored), each weighted by its target."""
    if token_weights is None:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return (ce * token_weights[targets.flatten().clamp(min=0)]).sum()


def token_weight_table(tokenizer, patterns: dict[str, float], model: torch.nn.Module) -> torch.Tensor | None:
    """A weight per id of the model's output vocabulary (1 unless a pattern says otherwise), on the head's device,
    from ``train.token_weights``: token strings or globs (``<x_*>``) -> weight. None without patterns (the
    unweighted loss, unchanged)."""
    if not patterns:
        return None
    head = unwrap(model).get_output_embeddings()
    size = head.weight.shape[0]
    table = torch.ones(size, dtype=torch.float32)
    vocab = tokenizer.get_vocab()
    for pattern, weight in patterns.items():
        ids = [i for tok, i in vocab.items() if fnmatch.fnmatchcase(tok, pattern) and i < size]
        if not ids:
            raise TrainingError(f"train.token_weights: {pattern!r} matches no token of the tokenizer; give token "
                                "strings or globs as the tokenizer writes them (e.g. '<x_*>')")
        table[ids] = weight
    return table.to(head.weight.device)


# ---------------------------------------------------------------------------------------------------------
# The model side: which head, which soft-cap, the hook


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel (a PeftModel and an FSDP2 model answer for themselves)."""
    while isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def fusable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output head if the fused path can stand in for it: a plain ``nn.Linear`` (also inside a PeftModel)."""
    inner = unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    # A LoRA-wrapped or modules_to_save head, a quantized head (Linear4bit) or one whose forward was replaced
    # (accelerate's offload hooks) computes something other than input @ weight.T + bias.
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return None
    if "forward" in vars(head):
        return None
    return head


def final_softcap(model: torch.nn.Module) -> float | None:
    """The config's final logit soft-cap (Gemma 3n: 30); whether the model applies it, the probe checks."""
    config = getattr(unwrap(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the head's own forward would use: autocast's if on, else the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _expected_input(hidden: torch.Tensor | None, shape: torch.Size, weight: torch.Tensor) -> bool:
    """The head input logits_to_keep gives ([rows, kept positions, d]) and a weight the fused path can read:
    materialised, local (not a DTensor shard), on the hidden states' device."""
    if hidden is None or hidden.dim() != 3 or hidden.shape[:2] != shape:
        return False
    if weight.is_meta or weight.device != hidden.device:
        return False
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        return not isinstance(weight, DTensor)
    return True


@dataclass
class _Capture:
    """What the head pre-hook saw and did during one forward."""

    calls: int = 0
    loss: torch.Tensor | None = None
    expected: torch.Tensor | None = None  # head_logits of the planted probe row, to compare with the model's


def _fused_loss_sum(model: torch.nn.Module, head: torch.nn.Linear, batch: dict, chunk_tokens: int,
                    kernel: str, token_weights: torch.Tensor | None) -> torch.Tensor:
    targets = targets_of(batch["labels"])
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:  # nothing supervised: the plain path's empty logits are free
        return plain_loss_sum(model, batch, token_weights)
    kept = targets[:, keep]
    mask = kept != IGNORE
    softcap, probe = final_softcap(model), head not in _CHECKED
    seen = _Capture()

    def hook(module: torch.nn.Linear, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        seen.calls += 1
        hidden = args[0] if len(args) == 1 and not kwargs else None
        # Only the one call we expect, with the [rows, kept positions, hidden] input logits_to_keep gives.
        if seen.calls > 1 or not _expected_input(hidden, mask.shape, module.weight):
            return None
        dtype = compute_dtype(module.weight)
        rows = None if token_weights is None else token_weights[kept[mask]]
        seen.loss = linear_cross_entropy(hidden[mask], module.weight, module.bias, kept[mask], chunk_tokens,
                                         softcap, dtype, kernel, rows)
        small = hidden[:, :1]  # still attached, so DDP's unused-parameter search sees the whole graph
        if probe:
            planted, seen.expected = _probe(hidden, module.weight, module.bias, softcap, dtype)
            small = small + (planted - small).detach()
        return (small,), {}

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    if seen.loss is None and seen.calls <= 1:  # the head ran untouched: out.logits are the plain path's
        return _ce_sum(out.logits, kept, token_weights)
    if seen.calls == 1 and (not probe or _probe_matches(out.logits, seen.expected)):
        _CHECKED[head] = True
        # The model's (now tiny) output stays in the graph: FSDP2 / DDP run their backward hooks from it, and
        # every rank must run the same ones, also where another rank took the plain path.
        return seen.loss + 0 * out.logits.sum()
    # The head ran twice, or the model changes its output in a way head_logits does not: plain from now on.
    _CHECKED[head] = False
    seen.loss = out = None  # drop this forward's graph before the plain one
    return plain_loss_sum(model, batch, token_weights)


@torch.no_grad()
def _probe(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A head input ([rows, 1, hidden]) whose first row has logits up to PROBE_MAGNITUDE, and its head_logits."""
    first = hidden[0, 0]
    peak = head_logits(first[None], weight, None, None, dtype).abs().max()
    if not (torch.isfinite(peak) and peak > 1e-6):  # a zero or non-finite hidden state: any direction will do
        first = torch.ones_like(first)
        peak = head_logits(first[None], weight, None, None, dtype).abs().max()
    planted = hidden[:, :1].detach().clone()
    planted[0, 0] = first * (_probe_magnitude(softcap) / peak.clamp_min(1e-6)).to(first.dtype)
    return planted, head_logits(planted[0], weight, bias, softcap, dtype)[0]


def _probe_magnitude(softcap: float | None) -> float:
    return max(PROBE_MAGNITUDE, 4 * softcap) if softcap else PROBE_MAGNITUDE


def _probe_matches(logits: torch.Tensor, expected: torch.Tensor) -> bool:
    """The model's logits for the planted row equal head_logits' (one small device sync, once per model)."""
    if logits.dim() != 3 or logits.shape[1] != 1 or logits.shape[-1] != expected.shape[-1]:
        return False
    got = logits[0, 0].detach().float()
    scale = expected.abs().max()
    return bool(torch.isfinite(scale) and scale > 1 and (got - expected).abs().max() <= PROBE_TOLERANCE * scale)


# ---------------------------------------------------------------------------------------------------------
# The fused head + cross-entropy


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                dtype: torch.dtype) -> torch.Tensor:
    """fp32 logits as the fused path computes them: matmul in `dtype`, bias and soft-cap in fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = (hidden.to(dtype) @ weight.to(dtype).T).float()
    if bias is not None:
        logits += bias.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_tokens: int, softcap: float | None = None,
                         dtype: torch.dtype | None = None, kernel: str = "torch",
                         row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i CE(softcap(hidden_i @ weight.T + bias), targets_i), fp32, ``chunk_tokens`` rows of logits at a time.

    `hidden` [tokens, d]; `targets` [tokens], all supervised; `row_weights` [tokens] (default 1).
    `dtype`: the matmul dtype (default: the weight's).
    ``kernel="liger"``: Liger Kernel's Triton implementation (CUDA), which picks its own chunk size and runs the
    matmuls under the caller's autocast; its weight gradient accumulates in fp32, as here.
    """
    if kernel == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        if row_weights is not None:
            raise ValueError("train.token_weights is not supported with train.kernels=liger")

        if not torch.is_autocast_enabled(hidden.device.type) and hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return liger_fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="sum", softcap=softcap,
                                                accum_dtype=torch.float32).float()
    if kernel != "torch":
        raise ValueError(f"unknown loss kernel {kernel!r} (torch or liger)")
    dtype = dtype or weight.dtype
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not grads:  # validation: the loss alone, no gradient work
        return LinearCrossEntropy.run(hidden, weight, bias, targets, chunk_tokens, softcap, dtype, (False,) * 3,
                                      row_weights)[0]
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens, softcap, dtype, row_weights)


class LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and the gradients (w.r.t. the inputs that need one), chunk by chunk; backward
    scales them by grad_output. No recomputation: the matmuls of a plain forward + backward, no more."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, softcap, dtype, row_weights=None):
        loss, *ctx.grads = LinearCrossEntropy.run(hidden, weight, bias, targets, chunk_tokens, softcap, dtype,
                                                  ctx.needs_input_grad[:3], row_weights)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("vlmtune.loss: a second backward through the fused loss (retain_graph) is not "
                               "supported; use chunk_tokens=None")
        grads, ctx.grads = ctx.grads, None  # handed over (and scaled in place): autograd can keep them as .grad
        scaled = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        return *scaled, None, None, None, None, None

    @staticmethod
    def run(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            chunk_tokens: int, softcap: float | None, dtype: torch.dtype, need: tuple[bool, ...],
            row_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                              torch.Tensor | None, torch.Tensor | None]:
        """(loss, d loss/d hidden, d loss/d weight, d loss/d bias); a gradient is None where `need` says so."""
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype)  # one cast for all chunks (autocast caches the same one on the plain path)
            b = None if bias is None else bias.detach().float()
            grad_h = torch.empty_like(hidden) if need[0] else None
            grad_w = torch.zeros_like(weight) if need[1] else None
            grad_b = torch.zeros_like(b) if need[2] else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start:start + chunk_tokens].detach().to(dtype)
                rw = None if row_weights is None else row_weights[start:start + chunk_tokens].float()
                chunk_loss, g = _chunk(h, w, b, targets[start:start + chunk_tokens], softcap, any(need), rw)
                loss += chunk_loss
                if g is None:
                    continue
                if grad_b is not None:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[start:start + chunk_tokens] = g @ w
                if grad_w is not None:
                    _accumulate(grad_w, g, h)
            if grad_b is not None:
                grad_b = grad_b.to(bias.dtype)
        return loss, grad_h, grad_w, grad_b


def _chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, softcap: float | None,
           need: bool, rw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss sum of one chunk (rows weighted by `rw`) and d loss / d (pre-cap) logits, fp32, in at most two
    [chunk, vocab] buffers."""
    z = _mm_fp32(h, w.T)
    if b is not None:
        z += b
    if softcap:
        t = z.div_(softcap).tanh_()  # z is now tanh(z / cap); logits = cap * t, d logits / d z = 1 - t^2
        logits = t * softcap
    else:
        t, logits = None, z
    rows = torch.arange(y.shape[0], device=y.device)
    target_logit = logits[rows, y]
    peak = logits.amax(dim=1, keepdim=True)
    probs = logits.sub_(peak).exp_()  # in place: logits are not needed past this point
    total = probs.sum(dim=1, keepdim=True)
    row_loss = peak.squeeze(1) + total.squeeze(1).log() - target_logit
    loss = (row_loss if rw is None else row_loss * rw).sum()
    if not need:
        return loss, None
    g = probs.div_(total)  # softmax
    g[rows, y] -= 1
    if rw is not None:
        g.mul_(rw[:, None])
    if t is not None:
        g.mul_(t.square_().neg_().add_(1))
    return loss, g


def _fp32_out_gemm(a: torch.Tensor) -> bool:
    """CUDA GEMMs of bf16 / fp16 operands can write fp32 straight away (torch >= 2.8: ``out_dtype``)."""
    return a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and hasattr(torch.ops.aten.mm, "dtype")


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in a's dtype, as fp32; on CUDA without a low-precision [chunk, vocab] copy in between."""
    if _fp32_out_gemm(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _accumulate(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w += g.T @ h, in place: in the weight's dtype, or (autocast) from a low-precision GEMM into fp32."""
    if grad_w.dtype == g.dtype:
        grad_w.addmm_(g.T, h)
    elif grad_w.dtype == torch.float32 and _fp32_out_gemm(g):  # no [vocab, d] temporary
        torch.addmm(grad_w, g.T, h, out_dtype=torch.float32, out=grad_w)
    else:
        grad_w += g.T @ h
