"""GPU check of train.kernels=liger: Liger's kernels compute what vlmtune's torch path computes.

    python bench/gpu_kernels.py            # on a CUDA machine with liger-kernel (bench/gpu_wheels.sh carries it)

1. RMSNorm: for every (offset, casting mode) in vlmtune.kernels.LIGER_NORMS, Liger's module against
   rms_norm_reference (output and gradients), fp32 and bf16. (tests/test_families.py checks, on CPU, that the
   reference equals each family's HF module.)
2. Fused linear cross-entropy: vlmtune.loss.linear_cross_entropy with kernel=liger against kernel=torch: loss and
   gradients of hidden states and head weight, fp32, bf16 autocast over fp32 weights, and with a soft-cap of 30.
3. The tiny Qwen2.5-VL end to end: a copy with use_liger_norms keeps every parameter object and state_dict key,
   and loss_sum(kernel=liger) equals loss_sum(kernel=torch) with the same gradients (fp32, and bf16 autocast).
Prints each comparison; exits 1 if any is outside its tolerance.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

FAILED: list[str] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to b's largest magnitude."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def report(what: str, error: float, tolerance: float) -> None:
    ok = error <= tolerance
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {error:.2e} (tolerance {tolerance:.0e})", flush=True)
    if not ok:
        FAILED.append(what)


def check_norms() -> None:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    from vlmtune.kernels import LIGER_NORMS, rms_norm_reference

    print("RMSNorm: Liger vs rms_norm_reference", flush=True)
    for offset, mode in sorted(set(LIGER_NORMS.values())):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            torch.manual_seed(0)
            x = torch.randn(3, 77, 320, device="cuda", dtype=dtype)
            w = (torch.randn(320, device="cuda") * 0.2).to(dtype)
            xs = [x.clone().requires_grad_() for _ in range(2)]
            ws = [torch.nn.Parameter(w.clone()) for _ in range(2)]
            norm = LigerRMSNorm(320, eps=1e-6, offset=offset, casting_mode=mode, in_place=False).cuda()
            norm.weight = ws[0]
            outs = [norm(xs[0]), rms_norm_reference(xs[1], ws[1], 1e-6, offset, mode)]
            grad = torch.randn_like(outs[1])
            for o in outs:
                o.backward(grad)
            tag = f"offset {offset}, {mode}, {str(dtype).split('.')[-1]}"
            report(f"{tag}: output", rel(outs[0], outs[1]), tol)
            report(f"{tag}: d input", rel(xs[0].grad, xs[1].grad), tol)
            report(f"{tag}: d weight", rel(ws[0].grad, ws[1].grad), tol)


def check_loss() -> None:
    from vlmtune.loss import linear_cross_entropy

    print("fused linear cross-entropy: kernel=liger vs kernel=torch", flush=True)
    cases = (("fp32", torch.float32, False, None, 1e-4),
             ("bf16 autocast, fp32 weights", torch.float32, True, None, 2e-2),
             ("fp32, soft-cap 30", torch.float32, False, 30.0, 1e-4))
    for name, wdtype, autocast, softcap, tol in cases:
        torch.manual_seed(0)
        hidden = torch.randn(1500, 512, device="cuda", dtype=wdtype)
        weight = torch.randn(151_936, 512, device="cuda", dtype=wdtype) * 0.02
        targets = torch.randint(0, 151_936, (1500,), device="cuda")
        results = []
        for kernel in ("torch", "liger"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                dtype = torch.bfloat16 if autocast else wdtype
                loss = linear_cross_entropy(h, w, None, targets, 1024, softcap, dtype, kernel)
            loss.backward()
            results.append((loss, h.grad, w.grad))
        (lt, ht, wt), (ll, hl, wl) = results
        report(f"{name}: loss", rel(ll, lt), tol)
        report(f"{name}: d hidden", rel(hl, ht), tol)
        report(f"{name}: d weight", rel(wl, wt), tol)


def check_model() -> None:
    from vlmtune.batching import collate
    from vlmtune.config import DataSource, ModelConfig
    from vlmtune.data.synthetic import write_synthetic_cord
    from vlmtune.demo import build_tiny_qwen2_5_vl
    from vlmtune.encode import EncodedDataset, SampleEncoder
    from vlmtune.families import family_for
    from vlmtune.kernels import use_liger_norms
    from vlmtune.loss import loss_sum
    from vlmtune.model import load_model
    from vlmtune.train import to_device

    print("tiny Qwen2.5-VL: use_liger_norms + loss_sum(kernel=liger) vs the unchanged model", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vlmtune-kernels-"))
    model_dir = build_tiny_qwen2_5_vl(work / "model")
    data_dir = write_synthetic_cord(work / "data", n_train=4, n_validation=2)
    device = torch.device("cuda")
    base, processor, family = load_model(ModelConfig(name_or_path=str(model_dir)), device)
    encoder = SampleEncoder(processor, family_for("qwen2_5_vl"), max_length=1024)
    ds = EncodedDataset.of(DataSource(source=str(data_dir), format="cord_v2", split="validation"), encoder, "v")
    batch = to_device(collate([ds[0], ds[1]], pad_id=processor.tokenizer.pad_token_id), device, torch.float32,
                      family.cast_to_model_dtype)

    liger = copy.deepcopy(base)
    params_before = {name: id(p) for name, p in liger.named_parameters()}
    keys_before = list(liger.state_dict())
    swapped = use_liger_norms(liger)
    print(f"  {swapped} RMSNorm modules replaced", flush=True)
    if swapped == 0:
        FAILED.append("no RMSNorm replaced")
    params_after = {name: id(p) for name, p in liger.named_parameters()}
    if params_after != params_before or list(liger.state_dict()) != keys_before:
        FAILED.append("parameters or state_dict keys changed by use_liger_norms")
        print("  FAIL parameters or state_dict keys changed", flush=True)
    else:
        print("  ok   same parameter objects and state_dict keys", flush=True)
    for autocast, tol in ((False, 1e-4), (True, 3e-2)):
        grads = []
        for model, kernel in ((base, "torch"), (liger, "liger")):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_sum(model, batch, 1024, kernel)
            loss.backward()
            grads.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (lt, gt), (ll, gl) = grads
        tag = "bf16 autocast" if autocast else "fp32"
        report(f"{tag}: loss", rel(ll, lt), tol)
        if gt.keys() != gl.keys():
            FAILED.append(f"{tag}: different parameters got gradients")
        worst = max(gl, key=lambda n: rel(gl[n], gt[n]))
        report(f"{tag}: gradients (worst: {worst})", rel(gl[worst], gt[worst]), tol * 10 if autocast else tol)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device; nothing to check", flush=True)
        return 1
    try:
        import liger_kernel  # noqa: F401
    except ImportError as e:
        print(f"gpu_kernels: liger-kernel cannot be imported ({e}); carry it (bench/gpu_wheels.sh)", flush=True)
        return 1
    check_norms()
    check_loss()
    check_model()
    print(f"gpu_kernels: {'OK' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
