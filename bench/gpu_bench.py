"""GPU benchmark of vlmtune (issue 19, "Measure it honestly"): a Qwen2.5-VL-3B-sized model (random weights),
full fine-tune and LoRA at bf16, on the recipes' receipts and on a mixed workload.

    bash bench/gpu.sh [OUT_DIR] [options]  # what to run on a lent H100 / H200 (checks, wheels, then this)
    python bench/gpu_bench.py --out DIR    # this script directly
    python bench/gpu_bench.py --smoke      # tiny model on CPU: exercises every code path, numbers meaningless

Needs nothing from the network: the model is built here from Qwen2.5-VL-3B-Instruct's dimensions with random
weights and the Qwen processor shipped in vlmtune/assets; the data are synthetic.

Workloads: ``receipts`` (vlmtune's synthetic cord-v2 receipts at 864 x 1296, read at the recipes' max_pixels
802,816: 1,014 image tokens, ~1,176 tokens per sample) and ``mixed`` (bench/benchlib.py: images of 64-1,280 tokens,
answers of 30-400 tokens, one sample in five text-only). Runs: mode (full / LoRA) x workload x batching (packed
with a token budget, ``micro_batch_tokens`` 4k / 8k / 16k, or padded micro-batches of a fixed count) x
``train.attention`` (varlen / stock) x ``train.compile`` x ``train.kernels``; each one ``finetune(build_recipe(tree))``
in its own process (so peak GPU memory is its own), retried with half the budget / micro-batch on out-of-memory.

Per run, over a timed window (>= --window-s seconds and >= --min-window-steps steps) after --warmup-steps steps and
one profiled step: median, p10 and p90 step time; tokens/s/GPU (non-pad, image tokens included); supervised
tokens/s; samples/s; time blocked on data per step (the loop's ``next_samples``); MFU with the vision tower counted
(``model_flops``) and LLM-only 6 N D (N: the text decoder's and LM head's matmul weights, D: all tokens; what
LMMs-Engine reports); peak memory; and from the profiled step the GPU-busy fraction and the split of kernel time
into GEMM, attention, other kernels and idle, with the top kernels in profile-<run>.txt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # bench/ is not a package: found through sys.path

HERE = Path(__file__).resolve().parent

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (text and vision dimensions); the weights here are random.
QWEN2_5_VL_3B = {
    "text": {"hidden_size": 2048, "layers": 36, "heads": 16, "kv_heads": 2, "intermediate_size": 11008,
             "vocab_size": 151936},
    "vision": {"hidden_size": 1280, "depth": 32, "heads": 16, "intermediate_size": 3420, "out_hidden_size": 2048,
               "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
}
SMOKE = {
    "text": {"hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 128,
             "vocab_size": 151936},
    "vision": {"hidden_size": 32, "depth": 2, "heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
               "window_size": 112, "fullatt_block_indexes": [1]},
}
# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
             ("H800", 989.4e12), ("GH200", 989.4e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))


def model_config(dims: dict):
    t, v = dims["text"], dims["vision"]
    text = benchlib.text_config(t["hidden_size"], t["layers"], heads=t["heads"], kv_heads=t["kv_heads"],
                                intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"])
    text["max_position_embeddings"] = 128000
    vision = benchlib.vision_config(v["hidden_size"], v["depth"], out_hidden_size=v["out_hidden_size"],
                                    heads=v["heads"], intermediate_size=v["intermediate_size"],
                                    window_size=v["window_size"], fullatt_block_indexes=v["fullatt_block_indexes"])
    vision["tokens_per_second"] = 2
    return benchlib.qwen2_5_vl_config(text, vision)


# ---------------------------------------------------------------------------------------------------------
# FLOPs


def window_sizes(t: int, h: int, w: int, merge: int, window_merged: int) -> list[int]:
    """Patches per attention window of one image or video (t, h, w in patches), as Qwen2.5-VL tiles it:
    windows of window_merged x window_merged merged tokens (merge x merge patches each), per frame."""
    mh, mw = h // merge, w // merge
    sizes = []
    for _ in range(t):
        for i in range(0, mh, window_merged):
            for j in range(0, mw, window_merged):
                sizes.append(min(window_merged, mh - i) * min(window_merged, mw - j) * merge * merge)
    return sizes


def matmul_sizes(dims: dict, patch: int = 14, merge: int = 2, temporal_patch: int = 2) -> dict:
    """Weights that multiply each token / patch / merged token (biases, norms and embeddings left out)."""
    t, v = dims["text"], dims["vision"]
    d, ff = t["hidden_size"], t["intermediate_size"]
    dq, dkv = d, t["kv_heads"] * (d // t["heads"])
    dv, vff = v["hidden_size"], v["intermediate_size"]
    return {"text_layers": t["layers"] * (d * dq + 2 * d * dkv + dq * d + 3 * d * ff),  # q, k, v, o, gate/up/down
            "lm_head": d * t["vocab_size"],
            "vision_block": 4 * dv * dv + 3 * dv * vff,  # qkv, proj, gate/up/down
            "vision_blocks": v["depth"] * (4 * dv * dv + 3 * dv * vff),
            "patch_embed": 3 * temporal_patch * patch * patch * dv,
            "merger": (merge * merge * dv) ** 2 + merge * merge * dv * v["out_hidden_size"]}


def measured_matmul_sizes(model) -> dict:
    """The same sizes read off the built model's nn.Linear / nn.Conv3d weights, to check matmul_sizes."""
    import torch

    out = {"text_layers": 0, "lm_head": 0, "vision_blocks": 0, "patch_embed": 0, "merger": 0}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv3d):
            continue
        n = module.weight.numel()
        if ".language_model.layers." in f".{name}":
            out["text_layers"] += n
        elif name.endswith("lm_head"):
            out["lm_head"] += n
        elif ".visual.blocks." in f".{name}":
            out["vision_blocks"] += n
        elif ".visual.patch_embed." in f".{name}":
            out["patch_embed"] += n
        elif ".visual.merger." in f".{name}":
            out["merger"] += n
    return out


def model_flops(batch: dict, dims: dict, mode: str, lora_r: int = 16, patch: int = 14, merge: int = 2,
                temporal_patch: int = 2) -> dict:
    """Training FLOPs of one micro-batch (a matmul of m x k by k x n = 2mkn FLOPs), split by part.

    Text decoder, per non-pad token: 2 x (its matmul weights) forward; causal attention 2 x d_q x s per token
    (QK^T and AV over the s/2 earlier tokens on average) forward; the LM head 2 x d x V forward, counted only at
    supervised positions (vlmtune computes logits only there). Vision tower, per patch: the patch embedding
    (3 x temporal_patch x patch^2 -> d_v) and each block's matmuls; attention 4 x d_v x (patches in its window,
    or in its image for the full-attention blocks); the merger per merged token. Training = forward x 3 for
    what trains (backward: activation grads + weight grads); LoRA: frozen base matmuls forward x 2 (activation
    grads only, weight grads not needed), attention x 3, adapters 6 x r x (in + out) per adapted linear per
    token, and the frozen vision tower (no adapters there by default) forward only.
    """
    t, v = dims["text"], dims["vision"]
    d, layers, ff, vocab = t["hidden_size"], t["layers"], t["intermediate_size"], t["vocab_size"]
    dq, dkv = t["hidden_size"], t["kv_heads"] * (d // t["heads"])
    sizes = matmul_sizes(dims, patch, merge, temporal_patch)
    text_matmul, block_matmul = sizes["text_layers"], sizes["vision_block"]
    embed_matmul, merger_matmul = sizes["patch_embed"], sizes["merger"]
    dv, depth = v["hidden_size"], v["depth"]
    window_merged = v["window_size"] // merge // patch
    full_blocks = len(v["fullatt_block_indexes"])

    lengths, supervised = batch["lengths"], batch["supervised"]
    tokens = sum(lengths)
    text_w = 3 if mode == "full" else 2
    vision_w = 3 if mode == "full" else 1
    text = text_w * 2 * text_matmul * tokens
    # causal: s^2 / 2 (query, key) pairs per sequence, 2 FLOPs x d_q each for QK^T and again for AV
    text_attn = 3 * layers * sum(2 * dq * s * s for s in lengths)
    head = text_w * 2 * d * vocab * supervised
    adapters = 0
    if mode == "lora":
        in_out = dq + d + 2 * (dkv + d) + dq + d + 2 * (d + ff) + ff + d
        adapters = 6 * lora_r * in_out * layers * tokens
    patches = sum(tt * hh * ww for tt, hh, ww in batch["grids"])
    vision = vision_w * 2 * (embed_matmul + depth * block_matmul) * patches
    vision += vision_w * 2 * merger_matmul * patches // (merge * merge)
    vision_attn = 0
    for tt, hh, ww in batch["grids"]:
        win = sum(n * n for n in window_sizes(tt, hh, ww, merge, window_merged))
        full = tt * (hh * ww) ** 2
        vision_attn += 4 * dv * ((depth - full_blocks) * win + full_blocks * full)
    vision_attn *= 3 if mode == "full" else 1
    parts = {"text_matmul": text, "text_attention": text_attn, "lm_head": head, "lora_adapters": adapters,
             "vision_matmul": vision, "vision_attention": vision_attn}
    parts["total"] = sum(parts.values())
    return parts


def peak_flops(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, value in PEAK_BF16:
        if key in device_name:
            return value, f"dense bf16 peak of {key}"
    return None, f"unknown peak for {device_name!r}: pass --peak-tflops"


# ---------------------------------------------------------------------------------------------------------
# Children: prep (model + data) and one vlmtune run

# workload -> how its data are written and read
RECEIPT_PIXELS = {"min_pixels": 3136, "max_pixels": 802_816}  # recipes/qwen2_5_vl/cord_v2_*.yaml


def workload_spec(name: str, workdir: Path, n: int, smoke: bool) -> dict:
    if name == "receipts":
        size = [224, 224] if smoke else [864, 1296]
        return {"data_dir": str(workdir / f"cord-synthetic-{size[0]}x{size[1]}-n{n}"), "format": "cord_v2",
                "pixels": RECEIPT_PIXELS, "image_size": size, "n": n}
    if name == "mixed":
        return {"data_dir": str(workdir / f"mixed-n{n}"), "format": "messages", "pixels": benchlib.MIXED_PIXELS,
                "n": n}
    raise ValueError(f"unknown workload {name!r} (receipts or mixed)")


def child_prep(spec: dict) -> dict:
    import torch
    from transformers import AutoProcessor, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from vlmtune.demo import ASSETS

    out = Path(spec["model_dir"])
    info = None
    stamp = out / "bench_stamp.json"
    want = {"dims": spec["dims"], "dtype": spec["dtype"], "seed": spec["seed"]}
    if stamp.is_file() and (out / "config.json").is_file():
        have = json.loads(stamp.read_text())
        if have.get("stamp") == want:
            info = have["info"]
    t0 = time.time()
    if info is None:
        config = model_config(spec["dims"])
        torch.manual_seed(spec["seed"])
        device = "cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu"
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, spec["dtype"]))
        model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                                   pad_token_id=151643, max_new_tokens=64)
        info = benchlib.parameter_counts(model)
        want_sizes = {k: v for k, v in matmul_sizes(spec["dims"]).items() if k != "vision_block"}
        got_sizes = measured_matmul_sizes(model)
        info["flop_count_check"] = "ok" if got_sizes == want_sizes else {"formula": want_sizes, "model": got_sizes}
        model.save_pretrained(out, max_shard_size="4GB")
        AutoProcessor.from_pretrained(ASSETS).save_pretrained(out)
        stamp.write_text(json.dumps({"stamp": want, "info": info}))
        del model
    info["build_s"] = time.time() - t0
    t1 = time.time()
    from vlmtune.data.synthetic import write_synthetic_cord

    for name, w in spec["workloads"].items():
        if name == "receipts":
            write_synthetic_cord(Path(w["data_dir"]), n_train=w["n"], n_validation=0, seed=spec["seed"],
                                 image_size=tuple(w["image_size"]))
        else:
            benchlib.write_mixed_data(Path(w["data_dir"]), w["n"], seed=spec["seed"])
    info["data_s"] = time.time() - t1
    return {"model": info}


def recipe_tree(spec: dict, run: dict) -> dict:
    work = spec["workloads"][run["workload"]]
    train = {"max_steps": 100_000, "micro_batch_size": run["micro_batch"],  # the window ends the run, not max_steps
             "global_batch_size": spec["global_batch"], "lr": spec["lr_full"] if run["mode"] == "full"
             else spec["lr_lora"], "warmup_steps": 2, "schedule": "constant", "seed": spec["seed"],
             "max_length": 4096, "log_every_steps": 1, "device": "cpu" if spec["smoke"] else "cuda",
             "attention": run["attention"], "compile": run["compile"], "packing": run["packing"]}
    if run.get("budget"):
        train["micro_batch_tokens"] = run["budget"]
    if run.get("kernels", "torch") != "torch":
        train["kernels"] = run["kernels"]
    tree = {"output_dir": str(Path(spec["workdir"]) / "runs" / run["name"]),
            "model": {"name_or_path": spec["model_dir"], "dtype": spec["recipe_dtype"],
                      "processor_kwargs": dict(work["pixels"])},
            "data": {"train": {"source": work["data_dir"], "format": work["format"], "split": "train"},
                     "num_workers": spec["num_workers"]},
            "train": train}
    if spec.get("attn"):
        tree["model"]["attn_implementation"] = spec["attn"]
    if run["mode"] == "lora":
        tree["peft"] = {"method": "lora", "r": spec["lora_r"], "alpha": 2 * spec["lora_r"],
                        "dropout": spec["lora_dropout"]}
    return tree


class WindowDone(Exception):
    """Raised from the step hook when the timed window is complete: it ends the run (no final save)."""


KERNEL_KINDS = (("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_.*(?:tn|nt|nn|tt)_|matmul", re.I)),
                ("attention", re.compile(r"flash|fmha|attention|sdpa|softmax", re.I)),
                ("memcpy", re.compile(r"memcpy|memset", re.I)))


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def profile_summary(prof, wall_s: float, out_file: Path | None) -> dict:
    """GPU time of one profiled step by kernel kind, and the busy fraction (kernel time / wall time)."""
    kinds: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        device_type = getattr(event, "device_type", None)
        if device_type is None or "CUDA" not in str(device_type):
            continue
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        kinds[kernel_kind(event.key)] = kinds.get(kernel_kind(event.key), 0.0) + us / 1e6
        top.append((us / 1e6, event.count, event.key))
    busy = sum(kinds.values())
    if out_file is not None:
        lines = [f"{sec * 1e3:10.2f} ms  {n:6d} x  {kernel_kind(k):9s} {k[:150]}" for sec, n, k in sorted(top)[::-1]]
        out_file.write_text(f"one step: {wall_s:.3f} s wall, {busy:.3f} s of kernels\n" + "\n".join(lines[:40]) + "\n")
    if not kinds:  # no device kernels recorded (CPU)
        return {"wall_s": wall_s, "kernel_s": None, "gpu_busy": None, "share_of_wall": {}}
    return {"wall_s": wall_s, "kernel_s": busy, "gpu_busy": busy / wall_s if wall_s else None,
            "share_of_wall": {**{k: v / wall_s for k, v in kinds.items()}, "idle": max(0.0, 1 - busy / wall_s)}
            if wall_s else {}}


def child_run(spec: dict, run: dict) -> dict:
    import torch

    import vlmtune.batching
    import vlmtune.metrics
    import vlmtune.train
    from vlmtune.config import build_recipe

    recipe = build_recipe(recipe_tree(spec, run))
    shutil.rmtree(recipe.output_dir, ignore_errors=True)  # a fresh run: vlmtune refuses one with checkpoints
    cuda = torch.cuda.is_available() and not spec["smoke"]
    batches: list[dict] = []
    ends: list[float] = []  # end of each optimizer step (after a device sync)
    per_step_batches: list[int] = []  # micro-batches recorded when each step ended
    waits: list[float] = []  # seconds the loop waited for each step's samples and its collated micro-batches
    losses: list[float] = []
    profiled: dict = {}
    warmup, window_s, min_steps = spec["warmup_steps"], spec["window_s"], spec["min_window_steps"]
    profile_at = warmup + 1  # this step runs under the profiler; the window starts after it
    stop_by = run.get("stop_by", float("inf"))

    # Observation hooks (this process only; vlmtune itself is unchanged): each micro-batch as the loop moves it to
    # the device, the time the loop waits for a step's samples and for the collation thread, one profiled step, and a
    # clock at each step's end.
    def to_device(batch, *args, **kwargs):
        if "labels" in batch:
            stats = benchlib.batch_stats(batch)
            stats["lengths"] = benchlib.sample_lengths(batch)
            grid = batch.get("image_grid_thw")
            stats["grids"] = grid.tolist() if grid is not None else []
            batches.append(stats)
        return original_to_device(batch, *args, **kwargs)

    def next_samples(*args, **kwargs):
        t0 = benchlib.now()
        out = original_next_samples(*args, **kwargs)
        waits.append(benchlib.now() - t0)
        return out

    def stream(*args, **kwargs):
        inner = original_stream(*args, **kwargs)
        while True:
            t0 = benchlib.now()
            b = next(inner, None)
            waits[-1] += benchlib.now() - t0
            if b is None:
                return
            yield b

    def train_step(*args, **kwargs):
        if len(ends) + 1 != profile_at:
            return original_train_step(*args, **kwargs)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = benchlib.now()
            out = original_train_step(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            wall = benchlib.now() - t0
        try:
            profiled.update(profile_summary(prof, wall, Path(spec["out"]) / f"profile-{run['name']}.txt"))
        except Exception as e:  # the profile is a bonus: never the reason a run fails
            profiled["error"] = f"{type(e).__name__}: {e}"[:300]
        return out

    def timed_step(self, record, *args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        ends.append(benchlib.now())
        per_step_batches.append(len(batches))
        losses.append(record.get("loss"))
        out = original_step(self, record, *args, **kwargs)
        window = len(ends) - profile_at
        if window >= 1:
            elapsed = ends[-1] - ends[profile_at - 1]
            if (elapsed >= window_s and window >= min_steps) or (time.time() > stop_by and window >= 2):
                raise WindowDone
        return out

    original_to_device, vlmtune.train.to_device = vlmtune.train.to_device, to_device
    original_next_samples, vlmtune.train.next_samples = vlmtune.train.next_samples, next_samples
    original_stream, vlmtune.batching.Batcher.stream = vlmtune.batching.Batcher.stream, stream
    original_train_step, vlmtune.train.train_step = vlmtune.train.train_step, train_step
    original_step, vlmtune.metrics.Metrics.step = vlmtune.metrics.Metrics.step, timed_step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = benchlib.now()
    try:
        vlmtune.train.finetune(recipe)
    except WindowDone:
        pass
    except torch.cuda.OutOfMemoryError as e:
        out = {"oom": True, "error": f"CUDA out of memory: {str(e).splitlines()[0][:300]}"}
        if cuda:
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out
    result = {"ends": ends, "per_step_batches": per_step_batches, "batches": batches, "waits": waits,
              "losses": losses, "t_start": t0, "profile": profiled, "profile_step": profile_at}
    if cuda:
        result.update(device=torch.cuda.get_device_name(), peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    else:
        result.update(device=f"cpu ({platform.processor() or platform.machine()})")
    result["peak_rss_gib"] = (benchlib.vm_hwm_kib() or 0) / 2**20
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    return result


def child_main(which: str, spec_file: Path, result_file: Path) -> int:
    spec = json.loads(spec_file.read_text())
    try:
        result = child_prep(spec) if which == "prep" else child_run(spec, spec["runs"][which])
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    benchlib.write_json(result_file, result)
    return 1 if "error" in result else 0


# ---------------------------------------------------------------------------------------------------------
# The parent: plan, run each child under the time budget, summarise


def spawn(which: str, spec_file: Path, workdir: Path, timeout: float) -> dict:
    result_file = workdir / f"result-{which}.json"
    result_file.unlink(missing_ok=True)
    log = workdir / "logs" / f"{which}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w") as f:
        # Its own process group (with its DataLoader workers), so a stop takes all of it: SIGKILL, since
        # vlmtune answers SIGTERM by writing a checkpoint.
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", which, str(spec_file),
                                 str(result_file)], stdout=f, stderr=subprocess.STDOUT,
                                env=benchlib.offline_env({"PYTHONUNBUFFERED": "1"}), start_new_session=True)
        code = None
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:  # past its time, or this process is being stopped (SIGTERM, Ctrl-C)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if code is None:
        result["error"] = f"stopped after {timeout:.0f} s (time budget)"
    elif code and "error" not in result:
        result["error"] = f"exit code {code}"
    result["wall_s"] = time.time() - started
    result["log"] = str(log)
    if "error" in result and not result.get("oom"):
        tail = log.read_text(errors="replace").splitlines()[-20:]
        print(f"[gpu-bench] {which} failed: {result['error']}\n    " + "\n    ".join(tail), flush=True)
    return result


def llm_6nd(tokens: int, dims: dict) -> float:
    """6 N D: N the text decoder's and LM head's matmul weights, D the tokens (image tokens included)."""
    sizes = matmul_sizes(dims)
    return 6 * (sizes["text_layers"] + sizes["lm_head"]) * tokens


def quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summarize(result: dict, spec: dict, run: dict, peak: float | None) -> dict:
    ends, counts, batches = result["ends"], result["per_step_batches"], result["batches"]
    first = result["profile_step"]  # the window: the steps after the profiled one
    if len(ends) < first + 1:
        return {"error": f"only {len(ends)} steps recorded (the window starts after step {first})"}
    durations = [b - a for a, b in zip(ends[first - 1:], ends[first:], strict=False)]
    window = batches[counts[first - 1]:counts[-1]]
    elapsed = ends[-1] - ends[first - 1]
    flops: dict[str, float] = {}
    for b in window:
        for k, val in model_flops(b, spec["dims"], run["mode"], spec["lora_r"]).items():
            flops[k] = flops.get(k, 0) + val
    tokens = sum(b["tokens"] for b in window)
    waits = result["waits"][first:len(ends)]
    achieved = flops["total"] / elapsed
    llm = llm_6nd(tokens, spec["dims"]) / elapsed
    return {
        "step_s": {"median": statistics.median(durations), "p10": quantile(durations, 0.1),
                   "p90": quantile(durations, 0.9), "steps": len(durations)},
        "tokens_per_s_per_gpu": tokens / elapsed,
        "supervised_tokens_per_s": sum(b["supervised"] for b in window) / elapsed,
        "samples_per_s": sum(b["samples"] for b in window) / elapsed,
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "mfu_llm_6nd": llm / peak if peak else None,
        "data_wait_s_per_step": statistics.mean(waits) if waits else None,
        "data_wait_share": sum(waits) / elapsed if waits else None,
        "micro_batches_per_step": len(window) / len(durations),
        "tokens_per_micro_batch": tokens / max(1, len(window)),
        "flops_share": {k: v / flops["total"] for k, v in flops.items() if k != "total"},
        "profile": result.get("profile"),
        "peak_allocated_gib": result.get("peak_allocated_gib"), "peak_reserved_gib": result.get("peak_reserved_gib"),
        "peak_rss_gib": result.get("peak_rss_gib"),
        "padding_fraction": 1 - sum(b["tokens"] for b in batches) / sum(b["padded"] for b in batches),
        "mean_tokens_per_sample": sum(b["tokens"] for b in batches) / sum(b["samples"] for b in batches),
        "image_patches_per_sample": sum(t * h * w for b in batches for t, h, w in b["grids"])
        / sum(b["samples"] for b in batches),
        "first_loss": result["losses"][0] if result["losses"] else None,
        "final_loss": result["losses"][-1] if result["losses"] else None,
        "micro_batch": run["micro_batch"], "budget": run.get("budget"), "measured_s": elapsed,
        "wall_s": result["wall_s"], "device": result.get("device"),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-gpu"), help="folder for summary.json and logs")
    p.add_argument("--workdir", type=Path, default=None, help="model, data and runs (default /tmp/vlmtune-gpu-bench)")
    p.add_argument("--modes", default="full,lora", help="full and/or lora")
    p.add_argument("--workloads", default="receipts", help="receipts and/or mixed")
    p.add_argument("--packing", default="on", help="on (packed rows, token budgets) and/or off (padded, by count)")
    p.add_argument("--budgets", default="8192", help="micro_batch_tokens of the packed runs: 4096,8192,16384")
    p.add_argument("--attention", default="varlen", help="train.attention: varlen and/or stock")
    p.add_argument("--compile", default="off", help="train.compile: off and/or on")
    p.add_argument("--kernels", default="torch", help="torch and/or liger (train.kernels; liger needs liger-kernel)")
    p.add_argument("--only", default=None,
                   help="only these planned runs, in this order (names as printed, e.g. full-receipts-packed8k)")
    p.add_argument("--global-batch", type=int, default=64, help="samples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per padded micro-batch (packing off); "
                   "with a budget, samples per loader batch")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps before the profiled one (compile, allocator)")
    p.add_argument("--window-s", type=float, default=30, help="the timed window: at least this many seconds ...")
    p.add_argument("--min-window-steps", type=int, default=5, help="... and at least this many steps")
    p.add_argument("--n-samples", type=int, default=256, help="samples per workload (epochs repeat)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "auto"],
                   help="model.dtype: bfloat16 weights, or auto (fp32 master weights + bf16 autocast)")
    p.add_argument("--attn", default=None, help="model.attn_implementation (default: vlmtune's, sdpa)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--num-workers", type=int, default=6)
    p.add_argument("--budget-s", type=float, default=450, help="stop starting runs past this many seconds")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s if not detected")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds per run: checks the script only")
    p.add_argument("--check", action="store_true", help="only check the environment")
    p.add_argument("--child", nargs=3, metavar=("WHICH", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.global_batch, args.micro_batch_size, args.warmup_steps = 4, 2, 1
        args.window_s, args.min_window_steps, args.n_samples, args.num_workers = 2.0, 2, 16, 1
        args.budget_s = max(args.budget_s, 3600.0)  # a CPU check: no device time to save
        args.dtype = "auto"  # fp32 on CPU (bf16 matmuls are slow there)
    return args


REQUIRED = {"torch": "2.6", "transformers": "5.20", "datasets": "4.0", "pydantic": "2.7", "peft": None,
            "pyarrow": "15", "yaml": None, "PIL": None, "torchvision": None}


def check_environment(need_cuda: bool, kernels: list[str]) -> list[str]:
    """Problems that would stop the benchmark, each with what to do."""
    import importlib

    problems = []
    for name, minimum in {**REQUIRED, **({"liger_kernel": "0.8"} if "liger" in kernels else {})}.items():
        try:
            module = importlib.import_module(name)
        except Exception as e:
            problems.append(f"cannot import {name} ({type(e).__name__}: {str(e)[:120]})")
            continue
        version = getattr(module, "__version__", None)
        if minimum and version and _version_tuple(version) < _version_tuple(minimum):
            problems.append(f"{name} {version} is older than {minimum}")
    if not problems:
        try:
            import vlmtune.train  # noqa: F401
        except Exception as e:
            problems.append(f"cannot import vlmtune.train ({type(e).__name__}: {str(e)[:200]})")
    if need_cuda and not problems:
        import torch

        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device (use --smoke for a CPU check of the script)")
    return problems


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for piece in v.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def table(rows: dict) -> str:
    lines = ["| run | step s median (p10-p90) | tokens/s/GPU | MFU (ViT counted) | MFU LLM 6ND | data wait | GPU busy "
             "| peak alloc GiB | tokens / micro-batch | loss first → last |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if "tokens_per_s_per_gpu" not in r:
            lines.append(f"| {name} | not run: {r.get('reason', '?')[:140]} | | | | | | | | |")
            continue
        st = r["step_s"]
        busy = (r.get("profile") or {}).get("gpu_busy")
        alloc = "—" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.1f}"
        lines.append(f"| {name} | {st['median']:.2f} ({st['p10']:.2f}-{st['p90']:.2f}), {st['steps']} steps | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {pct(r['mfu'])} | {pct(r['mfu_llm_6nd'])} | "
                     f"{pct(r['data_wait_share'])} | {pct(busy)} | {alloc} | {r['tokens_per_micro_batch']:.0f} | "
                     f"{r['first_loss']:.3f} → {r['final_loss']:.3f} |")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through spawn(), which kills the running child's group


def plan(args) -> dict[str, dict]:
    """Every run the options ask for, in order: workload, kernels, mode, batching, attention, compile."""
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    runs = {}
    for workload in split(args.workloads):
        for kernel in split(args.kernels):
            for mode in split(args.modes):
                for packing in split(args.packing):
                    budgets = [int(b) for b in split(args.budgets)] if packing == "on" else [None]
                    for budget in budgets:
                        for attention in split(args.attention):
                            for comp in split(args.compile):
                                batching = (f"packed{budget // 1024}k" if budget else "packed") if packing == "on" \
                                    else f"padded{args.micro_batch_size}"
                                name = "-".join([mode, workload, batching] + (["stock"] if attention == "stock" else [])
                                                + (["compile"] if comp == "on" else [])
                                                + ([kernel] if kernel != "torch" else []))
                                runs[name] = {"name": name, "mode": mode, "workload": workload,
                                              "packing": packing == "on", "budget": budget, "attention": attention,
                                              "compile": comp == "on", "kernels": kernel,
                                              "micro_batch": min(8, args.global_batch) if budget
                                              else args.micro_batch_size}
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child[:1], Path(args.child[1]), Path(args.child[2]))
    signal.signal(signal.SIGTERM, _terminate)
    started = time.time()
    problems = check_environment(need_cuda=not args.smoke, kernels=args.kernels.split(","))
    if problems or args.check:
        for line in problems:
            print(f"[gpu-bench] {line}", flush=True)
        if problems:
            print("[gpu-bench] on a lent GPU machine: run bash bench/gpu_wheels.sh here first, carry .whl, and "
                  "start with bash bench/gpu.sh (it installs .whl/*.whl into /tmp before running this)", flush=True)
        return 3 if problems else 0

    from vlmtune.config import RecipeError, build_recipe

    dims = SMOKE if args.smoke else QWEN2_5_VL_3B
    workdir = (args.workdir or Path("/tmp/vlmtune-gpu-bench-smoke" if args.smoke else "/tmp/vlmtune-gpu-bench")
               ).resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else "qwen2_5_vl_3b"
    runs = plan(args)
    if args.only:
        wanted = [n for n in args.only.split(",") if n]
        if unknown := [n for n in wanted if n not in runs]:
            print(f"[gpu-bench] --only: no planned run named {unknown}; planned: {', '.join(runs)}", flush=True)
            return 2
        runs = {n: runs[n] for n in wanted}
    workloads = {w: workload_spec(w, workdir, args.n_samples, args.smoke)
                 for w in dict.fromkeys(r["workload"] for r in runs.values())}
    spec = {"dims": dims, "dtype": args.dtype if args.dtype != "auto" else "float32", "seed": 0,
            "smoke": args.smoke, "model_dir": str(workdir / f"model-{tag}-{args.dtype}"), "workloads": workloads,
            "workdir": str(workdir), "out": str(out), "global_batch": args.global_batch,
            "warmup_steps": args.warmup_steps, "window_s": args.window_s, "min_window_steps": args.min_window_steps,
            "lr_full": 1e-5, "lr_lora": 2e-4, "lora_r": args.lora_r, "lora_dropout": args.lora_dropout,
            "num_workers": args.num_workers, "attn": args.attn, "runs": runs,
            # model.dtype in the recipes; auto: fp32 weights in the folder (spec dtype) and bf16 autocast on CUDA
            "recipe_dtype": args.dtype}
    spec_file = workdir / "spec.json"

    def save_spec():
        for r in runs.values():
            r["recipe"] = recipe_tree(spec, r)  # for the record
        benchlib.write_json(spec_file, spec)

    rows: dict[str, dict] = {}
    for name, r in runs.items():  # recipes are checked before anything heavy
        try:
            build_recipe(recipe_tree(spec, r))
        except RecipeError as e:
            rows[name] = {"reason": "the recipe rejects it: " + " ".join(str(e).split())[:240]}
    todo = [n for n in runs if n not in rows]
    save_spec()
    print(f"[gpu-bench] {len(todo)} run(s): {', '.join(todo) or 'none'}; workdir {workdir}", flush=True)
    prep = spawn("prep", spec_file, workdir, args.budget_s - (time.time() - started))
    if "error" in prep:
        benchlib.write_json(out / "summary.json", {"error": f"prep failed: {prep['error']}", "log": prep["log"]})
        return 1
    pm = prep["model"]
    print(f"[gpu-bench] model {pm['parameters'] / 1e9:.3f}B parameters ({pm['vision_parameters'] / 1e6:.0f}M "
          f"vision), built/reused in {pm['build_s']:.0f} s (FLOP count check: {pm.get('flop_count_check')}); "
          f"data in {pm['data_s']:.0f} s", flush=True)
    device, peak, peak_source = None, None, None
    last_wall = 0.0
    for name in todo:
        r = runs[name]
        while True:
            left = args.budget_s - (time.time() - started)
            if left < max(60.0, 0.8 * last_wall):
                rows[name] = {"reason": f"skipped: {left:.0f} s left of --budget-s {args.budget_s:.0f}"}
                break
            r["stop_by"] = time.time() + left - 20  # the child ends its window early rather than be killed
            save_spec()
            print(f"[gpu-bench] {name}: " + (f"budget {r['budget']} tokens" if r["budget"] else
                                              f"micro-batch {r['micro_batch']}") + " ...", flush=True)
            result = spawn(name, spec_file, workdir, left)
            last_wall = result["wall_s"]
            if result.get("oom") and ((r["budget"] or 0) > 1024 or (not r["budget"] and r["micro_batch"] > 1)):
                if r["budget"]:
                    r["budget"] //= 2
                else:
                    r["micro_batch"] //= 2
                print(f"[gpu-bench]   out of memory; halving to {r['budget'] or r['micro_batch']}", flush=True)
                continue
            if "error" in result:
                rows[name] = {"reason": result["error"], "log": result["log"]}
                break
            if device is None:
                device = result.get("device")
                peak, peak_source = peak_flops(device or "", args.peak_tflops)
            rows[name] = summarize(result, spec, r, peak)
            s = rows[name]
            if "tokens_per_s_per_gpu" in s:
                print(f"[gpu-bench]   {s['tokens_per_s_per_gpu']:.0f} tokens/s, MFU {pct(s['mfu'])} (LLM 6ND "
                      f"{pct(s['mfu_llm_6nd'])}), step {s['step_s']['median']:.2f} s, data wait "
                      f"{pct(s['data_wait_share'])}, GPU busy {pct((s['profile'] or {}).get('gpu_busy'))} "
                      f"({result['wall_s']:.0f} s)", flush=True)
            break
    rows = {name: rows[name] for name in runs}
    summary = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device, "peak_flops": peak, "peak_source": peak_source, "smoke": args.smoke,
        "model": {"dims": dims, "parameters": prep["model"], "dtype": args.dtype,
                  "attn_implementation": args.attn or "vlmtune default (sdpa)"},
        "settings": {k: getattr(args, k) for k in ("global_batch", "micro_batch_size", "warmup_steps", "window_s",
                                                   "min_window_steps", "n_samples", "lora_r", "lora_dropout",
                                                   "num_workers")},
        "workloads": workloads,
        "mfu_formula": model_flops.__doc__.strip(), "mfu_llm_6nd_formula": llm_6nd.__doc__.strip(),
        "runs": rows, "total_wall_s": time.time() - started, "versions": _versions(),
    }
    benchlib.write_json(out / "summary.json", summary)
    print()
    print(f"device: {device}; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s ({peak_source}); model "
          f"{prep['model']['parameters'] / 1e9:.2f}B, {args.dtype}; global batch {args.global_batch} samples; "
          f"window >= {args.window_s:.0f} s and >= {args.min_window_steps} steps after {args.warmup_steps} + 1 "
          "profiled")
    print(table(rows))
    (out / "table.md").write_text(table(rows) + "\n")
    print(f"[gpu-bench] summary: {out / 'summary.json'} ({time.time() - started:.0f} s)")
    ok = [("tokens_per_s_per_gpu" in r or any(w in r.get("reason", "") for w in ("rejects", "skipped:")))
          for r in rows.values()]
    return 0 if all(ok) else 1


def _versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "datasets", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
