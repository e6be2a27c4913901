"""Peak memory and time of one forward + backward of the loss, three ways, on a model with a 262k vocabulary.

    python bench/loss_memory.py [--tokens 2048] [--rows 2] [--supervised 0.3] [--chunks 1024 256] [--out r.json]

- ``full``: logits at every position, then cross-entropy over the supervised ones (what the peers do: the
  model's logits, then transformers' ForCausalLMLoss: ``logits.float()``, labels shifted, sum).
- ``supervised``: ``vlmtune.loss.loss_sum(..., chunk_tokens=None)``: logits only where a token is supervised.
- ``chunked-N``: ``vlmtune.loss.loss_sum(..., chunk_tokens=N)``: full-vocabulary logits for N tokens at a time.

The model is Gemma 3 (``Gemma3ForConditionalGeneration``: its 262,208-token vocabulary, tied head) made small
everywhere else, with random weights; the batch is random text, ``--supervised`` of it in answer-like spans.
Every config runs in its own process. CPU: peak RSS (``getrusage`` ``ru_maxrss``, its high-water mark reset
through ``/proc/self/clear_refs`` once the model and inputs are built) minus the RSS at that point. CUDA:
``torch.cuda.max_memory_allocated`` minus the memory allocated at that point (fp32 weights, bf16 autocast, as
the training loop runs). Gradients (``.grad``) are counted: they are part of a training step's peak. The
"grads vs first" column: the largest difference of any parameter's gradient from the first config's (norm and a
random projection, relative to that gradient's norm), so the configs are seen to train alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

GEMMA3_VOCAB = 262_208
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (rows x sequence length)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--supervised", type=float, default=0.3, help="share of the tokens that are trained")
    p.add_argument("--vocab", type=int, default=GEMMA3_VOCAB)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 256], help="chunk_tokens values to run")
    p.add_argument("--modes", nargs="+", default=None, help="default: full supervised chunked-<each chunk>")
    p.add_argument("--iters", type=int, default=3, help="timed forward + backward passes (after one warm-up)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (as the training loop runs fp32 weights there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one mode, in this process
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# The child: one mode, one process


def build_model(args: argparse.Namespace, device):
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    heads = max(4, args.hidden // 64)
    text = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=args.hidden // heads,
                query_pre_attn_scalar=args.hidden // heads, vocab_size=args.vocab, sliding_window=512,
                layer_types=["sliding_attention", "full_attention"] * (args.layers // 2)
                + ["sliding_attention"] * (args.layers % 2), max_position_embeddings=32768)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                  patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                          image_token_index=args.vocab - 64, boi_token_index=args.vocab - 63,
                          eoi_token_index=args.vocab - 62)
    torch.manual_seed(args.seed)
    with torch.device(device):  # built in place: a 262k x 2560 head initialises in seconds on a GPU
        return Gemma3ForConditionalGeneration(config).train()


def build_batch(args: argparse.Namespace, device) -> dict:
    """Random text ids; per row three answer spans that together cover ``--supervised`` of it."""
    import torch

    from vlmtune.encode import IGNORE

    g = torch.Generator().manual_seed(args.seed)
    length = args.tokens // args.rows
    ids = torch.randint(10, args.vocab - 100, (args.rows, length), generator=g)  # no image / special ids
    labels = torch.full_like(ids, IGNORE)
    span = round(length * args.supervised / 3)
    for start in (length // 6, length // 2, length - span - 1):
        labels[:, start:start + span] = ids[:, start:start + span]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "token_type_ids": torch.zeros_like(ids, device=device), "labels": labels.to(device)}


def full_logits_loss(model, batch: dict):
    """What the peers do: logits at every position, then transformers' ForCausalLMLoss (sum)."""
    import torch.nn.functional as F

    from vlmtune.encode import IGNORE
    from vlmtune.loss import model_inputs

    logits = model(**model_inputs(batch), use_cache=False).logits.float()
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def loss_fn(mode: str):
    from functools import partial

    from vlmtune.loss import loss_sum

    if mode == "full":
        return full_logits_loss
    if mode == "supervised":
        return partial(loss_sum, chunk_tokens=None)
    return partial(loss_sum, chunk_tokens=int(mode.removeprefix("chunked-")))


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark that ru_maxrss reports (Linux >= 4.0), so model building does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def grad_fingerprint(model) -> dict[str, list[float]]:
    """Per parameter: the gradient's norm and its dot product with a fixed random tensor (the configs must agree)."""
    import torch

    out = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.grad is not None:
            g = p.grad.float()
            r = torch.randn(g.shape, generator=torch.Generator(g.device).manual_seed(i), device=g.device)
            out[name] = [float(g.norm()), float((g * r).sum())]
    return out


def run_child(args: argparse.Namespace) -> dict:
    import gc

    import torch

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    model, batch = build_model(args, device), build_batch(args, device)
    step = loss_fn(args.child)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and args.amp)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_ok, base = reset_peak_rss(), current_rss()
    times, loss = [], None
    for i in range(args.iters + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with amp:
            loss = step(model, batch)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first pass is a warm-up (allocator, kernels); its memory still counts
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated - allocated after build"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        how = "ru_maxrss - RSS after build" + ("" if reset_ok else " (high-water mark not reset: includes build)")
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    return {"mode": args.child, "peak_mb": peak / MB, "base_mb": base / MB, "memory": how,
            "s_per_iter": sorted(times)[len(times) // 2], "times_s": times, "loss": float(loss.detach()),
            "supervised_tokens": n_sup, "logits_mb_if_full": args.tokens * args.vocab * 4 / MB,
            "grads": grad_fingerprint(model)}


def grad_difference(result: dict, reference: dict) -> float:
    """Largest difference of the gradient fingerprints, relative to each gradient's norm in `reference`."""
    diffs = [max(abs(a - b) for a, b in zip(result["grads"][n], ref, strict=True)) / max(ref[0], 1e-30)
             for n, ref in reference["grads"].items()]
    return max(diffs) if result["grads"].keys() == reference["grads"].keys() else float("inf")


# ---------------------------------------------------------------------------------------------------------
# The parent: one child per mode, a table, JSON


def child_argv(args: argparse.Namespace, mode: str, device: str) -> list[str]:
    return [sys.executable, __file__, "--tokens", str(args.tokens), "--rows", str(args.rows), "--supervised",
            str(args.supervised), "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers",
            str(args.layers), "--iters", str(args.iters), "--device", device, "--seed", str(args.seed), "--child", mode,
            "--amp" if args.amp else "--no-amp"]


def run_mode(args: argparse.Namespace, mode: str, device: str) -> dict:
    proc = subprocess.run(child_argv(args, mode, device), capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"mode": mode, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    rows = ["| config | peak memory (MB) | vs full | time / iter (s) | loss | grads vs first |",
            "|---|---:|---:|---:|---:|---:|"]
    ok = [r for r in results if "error" not in r]
    full = next((r["peak_mb"] for r in ok if r["mode"] == "full"), None)
    for r in results:
        if "error" in r:
            rows.append(f"| {r['mode']} | error: {r['error']} | | | | |")
            continue
        ratio = f"{r['peak_mb'] / full:.2f}x" if full else "-"
        rows.append(f"| {r['mode']} | {r['peak_mb']:,.0f} | {ratio} | {r['s_per_iter']:.2f} | {r['loss']:.4f} | "
                    f"{grad_difference(r, ok[0]):.1e} |")
    return "\n".join(rows)


def machine(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_avg_1_5_15": os.getloadavg(), "platform": platform.platform()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return 0
    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    modes = args.modes or ["full", "supervised", *(f"chunked-{c}" for c in args.chunks)]
    before = machine(device)
    results = []
    for mode in modes:
        results.append(run_mode(args, mode, device))
        print(f"{mode}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "child", "modes")}
    report = {"setup": setup, "machine_before": before, "load_avg_after": os.getloadavg(), "results": results}
    precision = "fp32 weights, bf16 autocast" if device == "cuda" and args.amp else "fp32"
    print(f"{args.tokens} tokens ({args.rows} rows), {results[0].get('supervised_tokens', '?')} supervised, vocab "
          f"{args.vocab:,}, hidden {args.hidden}, {args.layers} layers, {device} ({precision}); peak memory of one "
          f"forward + backward above the built model and inputs\n")
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # vlmtune from this checkout
    raise SystemExit(main())
