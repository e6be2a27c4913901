"""GPU check of train.attention=varlen and train.compile (issue 19, levers 1, 2 and 5): what CPU CI cannot run.

    python bench/gpu_varlen.py [--out FILE.json]     # on a CUDA machine; ~1-2 minutes, tiny models, offline

1. The kernel: vlmtune.varlen.attend through torch's varlen_attn against the exact path (transformers' sdpa per
   segment length, the same device and dtype) and both against an fp32 reference: vision-like windows (head dim
   80, non-causal), packed text (causal, GQA 16/2, head dim 128), a sliding window, MLA (192 / 128); output and
   gradients. Passes if the varlen error is at most 2x the sdpa path's error (+ 2e-3).
2. Tiny models end to end (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Kimi-VL) in bf16: the loss and gradients of the stock
   model on a padded batch and of the varlen model (vision swap + packed text + host inputs) on the same samples
   packed, each against the stock fp32 model; the same 2x rule.
3. Host syncs: forward + backward of the packed Qwen2.5-VL under torch.cuda.set_sync_debug_mode("warn"), stock
   (segment_sdpa, transformers' vision tower) against varlen; counts and the places they come from.
4. Regional compile (inductor) of the tiny Qwen2.5-VL, 5 micro-batches of changing length: loss against eager,
   compile time, graphs after the first micro-batch (must not grow).
5. The loop's micro-batches from Batcher.stream (the collation thread): every tensor page-locked, and the loss
   of each equal to that of the same micro-batch collated eagerly into pageable memory.
Exits 1 if a check fails; writes every number to --out.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/tiny: the tiny models of every family (offline)

FAILED: list[str] = []
RESULTS: dict = {}
DEVICE = torch.device("cuda")  # --cpu-dry: the script's own code paths on CPU (kernel and sync checks skipped)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def judge(what: str, varlen_err: float, stock_err: float, slack: float = 2e-3) -> None:
    ok = varlen_err <= 2 * stock_err + slack
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: varlen {varlen_err:.2e}, stock {stock_err:.2e}", flush=True)
    RESULTS[what] = {"varlen": varlen_err, "stock": stock_err, "ok": ok}
    if not ok:
        FAILED.append(what)


class Heads(torch.nn.Module):
    def __init__(self, groups: int, causal: bool):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def check_kernel() -> None:
    from vlmtune.varlen import varlen_parameters

    print(f"1. kernel (varlen_attn parameters: {sorted(varlen_parameters())})", flush=True)
    cases = {  # name: (segment lengths, Hq, Hkv, D, Dv, causal, window)
        "vision windows + full images, D=80": ([64] * 40 + [32, 16, 8] * 4 + [1014, 512], 16, 16, 80, 80, False, None),
        "packed text, GQA 16/2, D=128": ([1176, 430, 90, 2048, 7], 16, 2, 128, 128, True, None),
        "sliding window 256, D=64": ([700, 300, 40], 8, 4, 64, 64, True, 256),
        "MLA 192/128": ([600, 150, 33], 8, 8, 192, 128, True, None),
    }
    torch.manual_seed(0)
    for name, case in cases.items():
        kernel_case(name, *case)


def kernel_case(name, lengths, hq, hkv, d, dv, causal, window) -> None:
    from vlmtune.varlen import _grouped_sdpa, attend, varlen_kernel_usable

    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    base = [torch.randn(t, h, dim, device="cuda") for h, dim in ((hq, d), (hkv, d), (hkv, dv))]
    grad = torch.randn(t, hq, dv, device="cuda")
    module, scale = Heads(hq // hkv, causal), d ** -0.5

    def run(varlen: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        xs = [x.to(dtype).requires_grad_() for x in base]
        if varlen:
            assert varlen_kernel_usable(*xs, window=window), name
            out = attend(*xs, cu, max(lengths), module=module, scale=scale, causal=causal, window=window)
        else:
            out = _grouped_sdpa(*xs, cu, module, scale, causal, window, 0.0)
        out.backward(grad.to(dtype))
        return [out] + [x.grad for x in xs]

    ref = run(False, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        var, std = run(True, dtype), run(False, dtype)
        for i, part in enumerate(("output", "dq", "dk", "dv")):
            judge(f"kernel {name} {str(dtype)[6:]} {part}", rel(var[i], ref[i]), rel(std[i], ref[i]))


def conversation(i: int, family: str) -> list[dict]:
    from PIL import Image

    image = Image.new("RGB", (28 * (3 + i % 4), 28 * (3 + (3 * i) % 5)), (40 * i % 255, 90, 160))
    content = [{"type": "image", "image": image}] if i % 3 != 2 else []  # every third sample text-only
    return [{"role": "user", "content": [*content, {"type": "text", "text": "What is this? " * (1 + i)}]},
            {"role": "assistant", "content": [{"type": "text", "text": "It is a picture " * (2 + 3 * i)}]}]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_loss(model, batch):
    from vlmtune.loss import loss_sum

    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach().float(), grads(model)


def tiny(name: str):
    from tiny import build

    from vlmtune.config import ModelConfig
    from vlmtune.model import load_model

    path = build(name, Path("/tmp/vlmtune-gpu-varlen/tiny"))
    return lambda dtype="float32": load_model(ModelConfig(name_or_path=str(path), dtype=dtype), DEVICE)


def batches(model, processor, family, packed: bool, extras=None, n: int = 4, first: int = 0):
    from vlmtune.batching import micro_batch, rope_index_module
    from vlmtune.encode import SampleEncoder
    from vlmtune.train import to_device

    encoder = SampleEncoder(processor, family, max_length=4096)
    samples = [encoder(conversation(first + i, family.name), i) for i in range(n)]
    pad = processor.tokenizer.pad_token_id
    pad = processor.tokenizer.eos_token_id if pad is None else pad
    dtype = next(model.parameters()).dtype
    batch = micro_batch(samples, pad, packed=packed, rope=rope_index_module(model) if packed else None,
                        extras=extras)
    return to_device(batch, DEVICE, dtype, family.cast_to_model_dtype)


def check_models() -> None:
    from vlmtune.attention import host_inputs, setup_attention

    print("2. tiny models end to end, bf16 (errors against the fp32 stock model)", flush=True)
    for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "kimi_vl"):
        load = tiny(name)
        model, processor, family = load("float32")
        ref_loss, ref_grads = run_loss(model, batches(model, processor, family, packed=False))
        model, _, _ = load("bfloat16")
        std_loss, std_grads = run_loss(model, batches(model, processor, family, packed=False))
        model, _, _ = load("bfloat16")
        done = setup_attention(model, "varlen", packed=True)
        batch = batches(model, processor, family, packed=True, extras=host_inputs(model))
        var_loss, var_grads = run_loss(model, batch)
        RESULTS[f"{name} setup"] = {k: str(v) for k, v in done.items()}
        judge(f"{name} loss", rel(var_loss, ref_loss), rel(std_loss, ref_loss))
        worst_var = max(rel(var_grads[k], g) for k, g in ref_grads.items())
        worst_std = max(rel(std_grads[k], g) for k, g in ref_grads.items())
        judge(f"{name} gradients (worst parameter)", worst_var, worst_std, slack=5e-3)


def count_syncs(model, batch) -> tuple[int, list[str]]:
    from vlmtune.loss import loss_sum

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss_sum(model, batch).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    places = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs), [f"{k} x{v}" for k, v in places.most_common(8)]


def check_syncs() -> None:
    from vlmtune.attention import host_inputs, setup_attention

    print("3. host syncs in one forward + backward (packed Qwen2.5-VL, bf16)", flush=True)
    load = tiny("qwen2_5_vl")
    counts = {}
    for mode in ("stock", "varlen"):
        model, processor, family = load("bfloat16")
        setup_attention(model, mode, packed=True)
        batch = batches(model, processor, family, packed=True, extras=host_inputs(model))
        count_syncs(model, batch)  # warm-up (the loss's one-time probe)
        counts[mode], places = count_syncs(model, batch)
        print(f"  {mode}: {counts[mode]} syncs; {', '.join(places)}", flush=True)
        RESULTS[f"syncs {mode}"] = {"count": counts[mode], "places": places}
    if not counts["varlen"] < counts["stock"]:
        FAILED.append("syncs")
        print("  FAIL varlen does not sync less than stock", flush=True)


def check_compile() -> None:
    import torch._dynamo
    import torch._dynamo.utils

    from vlmtune.attention import host_inputs, setup_attention
    from vlmtune.compile import compile_regions

    print("4. regional compile (inductor), tiny Qwen2.5-VL bf16, changing lengths", flush=True)
    torch._dynamo.reset()
    load = tiny("qwen2_5_vl")
    model, processor, family = load("bfloat16")
    setup_attention(model, "varlen", packed=True)
    eager = copy.deepcopy(model)
    compile_regions(model, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    extras = host_inputs(model, bucket=True)
    graphs, times, errors = [], [], []
    for step in range(5):
        batch = batches(model, processor, family, packed=True, extras=extras, n=3, first=3 * step)
        t0 = time.perf_counter()
        got, _ = run_loss(model, batch)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        exact = batches(eager, processor, family, packed=True, extras=host_inputs(eager), n=3, first=3 * step)
        want, _ = run_loss(eager, exact)  # eager with the exact bounds: bucketing them must not change a thing
        errors.append(rel(got, want))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    print(f"  first micro-batch (compile) {times[0]:.1f} s, then {', '.join(f'{t * 1e3:.0f}' for t in times[1:])} "
          f"ms; graphs {graphs}; loss vs eager {max(errors):.2e}", flush=True)
    RESULTS["compile"] = {"seconds": times, "graphs": graphs, "loss_rel_error": errors}
    if graphs[1:] != [graphs[0]] * (len(graphs) - 1) or max(errors) > 2e-2:
        FAILED.append("compile")
        print("  FAIL recompiles or a loss off eager's", flush=True)


def check_pinned() -> None:
    """5. The loop's micro-batches: collated on the helper thread into page-locked memory (CUDA), copied to the
    device without blocking, and the loss the same as from the eagerly collated, pageable batches."""
    from vlmtune.attention import host_inputs, setup_attention
    from vlmtune.batching import Batcher, rope_index_module
    from vlmtune.encode import SampleEncoder
    from vlmtune.loss import loss_sum
    from vlmtune.train import to_device

    print("5. pinned micro-batches from the collation thread (packed Qwen2.5-VL, bf16)", flush=True)
    model, processor, family = tiny("qwen2_5_vl")("bfloat16")
    setup_attention(model, "varlen", packed=True)
    samples = [SampleEncoder(processor, family, max_length=4096)(conversation(i, family.name), i) for i in range(6)]
    pin = DEVICE.type == "cuda"

    def batcher(pinned: bool) -> Batcher:
        return Batcher(processor.tokenizer.pad_token_id, 2, None, True, rope_index_module(model), None,
                       family.uniform_media, host_inputs(model), pin=pinned)

    streamed = batcher(pin)
    got = list(streamed.stream(streamed.plan(samples)))
    want = batcher(False)(samples)
    tensors = [v for b in got for v in b.tensors.values() if isinstance(v, torch.Tensor)]
    pinned = all(v.is_pinned() for v in tensors) if pin else None
    def loss(b) -> torch.Tensor:
        return loss_sum(model, to_device(b.tensors, DEVICE, torch.bfloat16, family.cast_to_model_dtype))

    with torch.no_grad():
        same = all(torch.equal(loss(a), loss(b)) for a, b in zip(got, want, strict=True))
    print(f"  {len(got)} micro-batches; all tensors pinned: {pinned}; losses equal to the eager batches': {same}",
          flush=True)
    RESULTS["pinned"] = {"micro_batches": len(got), "pinned": pinned, "same_loss": same}
    if pinned is False or not same:
        FAILED.append("pinned")
        print("  FAIL a tensor not pinned, or a loss off the eager batches'", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cpu-dry", action="store_true", help="run the script's code paths on CPU (numbers meaningless)")
    args = p.parse_args()
    global DEVICE
    checks = [check_kernel, check_models, check_syncs, check_compile, check_pinned]
    if args.cpu_dry:
        DEVICE, checks = torch.device("cpu"), [check_models, check_compile, check_pinned]
    elif not torch.cuda.is_available():
        print("[gpu_varlen] no CUDA device (--cpu-dry checks the script on CPU)")
        return 2
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU dry run"
    print(f"[gpu_varlen] {name}, torch {torch.__version__}", flush=True)
    for check in checks:
        try:
            check()
        except Exception as e:  # one failing part does not hide the others' results
            traceback.print_exc()
            FAILED.append(f"{check.__name__}: {type(e).__name__}: {e}"[:300])
    RESULTS["failed"] = FAILED
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"[gpu_varlen] {'OK' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
