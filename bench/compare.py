"""vlmtune vs TRL's SFTTrainer vs a plain transformers Trainer, on CPU, same model, data, order and schedule.

    python bench/compare.py                       # hidden 256, 4 layers (~45M parameters), 20 steps
    python bench/compare.py --quick               # smoke run, tiny settings
    python bench/compare.py --only vlmtune,trl --steps 10 --out runs/bench/summary.json --packing

What is compared (docs/benchmarks.md has the long version):

* the model: Qwen2.5-VL architecture, random weights (seeded), the real Qwen processor and 152k vocabulary,
  built once (bench/benchlib.py) and loaded from disk by every run, fp32, sdpa attention;
* the data: vlmtune's synthetic cord-v2 receipts, steps x global batch of them (one epoch, no repeats), fed to
  TRL and Trainer pre-ordered as vlmtune's sampler reads them, through a sequential sampler, so every run
  sees the same micro-batches;
* the optimizer (torch AdamW, weight decay 0, not fused), the schedule (vlmtune's linear warmup + cosine),
  the clipping (1.0), the micro batch and gradient accumulation: identical; TRL and Trainer get the
  optimizer and scheduler passed in;
* the loss: all three divide the sum of token losses of an optimizer step by the number of supervised tokens
  in the whole step (not a mean of per-micro-batch means); TRL also trains the '\\n' after <|im_end|> (its
  training template puts it inside {% generation %}), one token per sample more than the other two.

Each run is its own process (bench/peers.py): peak RSS is that process's VmHWM (ru_maxrss from wait4 as a
cross-check). Throughput counts the steps after the first --exclude-steps (default 2): the clock runs from
the end of step `exclude` to the end of the last step, and the tokens are those of the steps in between.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # stdlib only at import time: this process stays small

HERE = Path(__file__).resolve().parent

PEERS = ("vlmtune", "trl", "trainer")
LABELS = {"vlmtune": "vlmtune", "vlmtune-packed": "vlmtune (packing)", "trl": "TRL SFTTrainer",
          "trainer": "transformers Trainer"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; --quick 4)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="samples per micro-batch (default 2)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 2; --quick 1)")
    p.add_argument("--hidden-size", type=int, default=None, help="text hidden size (default 256; --quick 64)")
    p.add_argument("--layers", type=int, default=None, help="text layers (default 4; --quick 2)")
    p.add_argument("--vision-hidden", type=int, default=None, help="vision tower width (default 128; --quick 32)")
    p.add_argument("--vision-depth", type=int, default=None, help="vision tower blocks (default 4; --quick 2)")
    p.add_argument("--image-size", default=None,
                   help="receipt images WxH (default 864x1296, a cord-v2 photo's size; --quick 224x224)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="the processor's max_pixels (default 802816, the cord-v2 recipes': ~1,000 image tokens per "
                        "receipt; --quick 50176: 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2, help="warmup steps of the schedule")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-steps", type=int, default=None,
                   help="first optimizer steps left out of the throughput (default 2; --quick 1)")
    p.add_argument("--workload", choices=("receipts", "mixed"), default="receipts",
                   help="receipts (cord-v2 photos, the default) or mixed: images of 64-1,280 tokens, answers of "
                        "30-400 tokens, one sample in five text-only (micro-batch 4 x 2 unless given)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--only", default=",".join(PEERS), help="comma-separated subset of vlmtune,trl,trainer")
    p.add_argument("--packing", action="store_true",
                   help="also run vlmtune with train.packing=true (reported as null if the recipe rejects it)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="model, data, runs and logs")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run before it is killed")
    args = p.parse_args(argv)
    quick = {"steps": 4, "micro_batch_size": 2, "grad_accum": 1, "hidden_size": 64, "layers": 2,
             "vision_hidden": 32, "vision_depth": 2, "exclude_steps": 1, "image_size": "224x224",
             "max_pixels": 224 * 224}
    full = {"steps": 20, "micro_batch_size": 2, "grad_accum": 2, "hidden_size": 256, "layers": 4,
            "vision_hidden": 128, "vision_depth": 4, "exclude_steps": 2, "image_size": "864x1296",
            "max_pixels": 802_816}
    if args.workload == "mixed":
        full.update(micro_batch_size=4, grad_accum=2, max_pixels=benchlib.MIXED_PIXELS["max_pixels"])
        quick.update(micro_batch_size=4, max_pixels=benchlib.MIXED_PIXELS["max_pixels"])
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in PEERS]
    if unknown or not args.only:
        p.error(f"--only: unknown {unknown}; choose from {','.join(PEERS)}")
    if args.steps <= args.exclude_steps:
        p.error(f"--steps ({args.steps}) must be larger than --exclude-steps ({args.exclude_steps})")
    if min(args.micro_batch_size, args.grad_accum, args.exclude_steps + 1) < 1:
        p.error("--micro-batch-size and --grad-accum must be >= 1, --exclude-steps >= 0")
    try:
        args.image_size = tuple(int(x) for x in args.image_size.lower().split("x"))
        assert len(args.image_size) == 2 and min(args.image_size) >= 28
    except (ValueError, AssertionError):
        p.error(f"--image-size: WxH with both at least 28, e.g. 864x1296; got {args.image_size!r}")
    return args


def make_spec(args: argparse.Namespace) -> dict:
    workdir = args.workdir.resolve()
    m = {"hidden_size": args.hidden_size, "layers": args.layers, "vision_hidden": args.vision_hidden,
         "vision_depth": args.vision_depth}
    global_batch = args.micro_batch_size * args.grad_accum
    n_train = args.steps * global_batch
    tag = f"h{m['hidden_size']}-l{m['layers']}-v{m['vision_hidden']}x{m['vision_depth']}-s{args.seed}"
    width, height = args.image_size
    data = (f"mixed-n{n_train}-s{args.seed}" if args.workload == "mixed"
            else f"cord-synthetic-{width}x{height}-n{n_train}-s{args.seed}")
    return {"model": m, "model_dir": str(workdir / "inputs" / f"model-{tag}-p{args.max_pixels}"),
            "data_dir": str(workdir / "inputs" / data), "workload": args.workload,
            "image_size": [width, height], "pixels": {"min_pixels": 56 * 56, "max_pixels": args.max_pixels},
            "rows_file": str(workdir / "rows.json"), "workdir": str(workdir / "runs"), "n_train": n_train,
            "steps": args.steps, "micro_batch": args.micro_batch_size, "global_batch": global_batch,
            "lr": args.lr, "warmup": args.warmup, "min_lr_ratio": args.min_lr_ratio, "max_grad_norm": 1.0,
            "seed": args.seed, "max_length": 2048, "exclude_steps": args.exclude_steps}


# ---------------------------------------------------------------------------------------------------------
# Running one child


def run_child(which: str, spec_file: Path, workdir: Path, timeout: int) -> dict:
    """Start bench/peers.py for `which`, wait for it (wait4: its own rusage), return its result."""
    result_file = workdir / f"result-{which}.json"
    log_file = workdir / "logs" / f"{which}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    load = os.getloadavg()
    started = time.time()
    with log_file.open("w") as log:
        pid = os.posix_spawn(sys.executable, [sys.executable, str(HERE / "peers.py"), which, str(spec_file),
                                              str(result_file)], benchlib.offline_env(),
                             file_actions=[(os.POSIX_SPAWN_DUP2, log.fileno(), 1),
                                           (os.POSIX_SPAWN_DUP2, log.fileno(), 2)])
        status, usage, killed = None, None, False
        try:
            while status is None:
                done, st, ru = os.wait4(pid, os.WNOHANG)
                if done:
                    status, usage = st, ru
                elif time.time() - started > timeout:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                    _, status, usage = os.wait4(pid, 0)
                else:
                    time.sleep(0.2)
        finally:
            if status is None:  # interrupted (Ctrl-C, SIGTERM): the run goes too (SIGKILL: vlmtune would checkpoint)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    wall = time.time() - started
    code = os.waitstatus_to_exitcode(status)
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if killed:
        result["error"] = f"killed after --timeout {timeout} s"
    elif code and "error" not in result:
        result["error"] = f"exit code {code}"
    result.update(wall_s=wall, ru_maxrss_kib=usage.ru_maxrss, loadavg_before=load, log=str(log_file))
    if "error" in result:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        print(f"[bench] {which} failed: {result['error']}\n  log {log_file}, last lines:\n    "
              + "\n    ".join(tail), file=sys.stderr, flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------
# From per-step records to the reported numbers


def per_step_tokens(batches: list[dict], accum: int, n_steps: int) -> list[dict] | None:
    if len(batches) < accum * n_steps:
        return None
    out = []
    for s in range(n_steps):
        chunk = batches[s * accum : (s + 1) * accum]
        out.append({k: sum(b[k] for b in chunk) for k in ("tokens", "padded", "supervised", "samples")})
    return out


def summarize(which: str, result: dict, spec: dict) -> dict:
    """Throughput over the steps after the excluded ones; padding over all steps; losses as reported."""
    if "error" in result or "rejected" in result:
        return {k: result.get(k) for k in ("error", "rejected", "wall_s", "log") if result.get(k) is not None}
    steps = result["steps"]
    accum = spec["global_batch"] // spec["micro_batch"]
    exclude = spec["exclude_steps"]
    n = len(steps)
    tokens = per_step_tokens(result.get("batches", []), accum, n)
    notes = []
    if tokens is None:  # the to_device hook did not fire (vlmtune changed): fall back on its own counts
        notes.append("token counts from vlmtune's metrics.jsonl (to_device hook missing); padding unknown")
        tokens = [{"tokens": s["tokens_reported"], "padded": None, "supervised": s["supervised_reported"],
                   "samples": spec["global_batch"]} for s in steps]
    if all("t_end" in s for s in steps):
        elapsed = steps[-1]["t_end"] - steps[exclude - 1]["t_end"] if exclude else steps[-1]["t_end"] - result[
            "t_start"]
        clock = "end of step to end of step"
    else:
        elapsed = sum(s["elapsed_reported"] for s in steps[exclude:])
        clock = "vlmtune's own per-step time (Metrics.step hook missing)"
        notes.append(clock)
    window = tokens[exclude:]
    sums = {k: sum(t[k] for t in window) for k in ("tokens", "supervised", "samples")}
    cpu = (steps[-1]["cpu_end"] - steps[exclude - 1]["cpu_end"]
           if exclude and all("cpu_end" in s for s in steps) else None)
    padded = [t["padded"] for t in tokens]
    padding = (1 - sum(t["tokens"] for t in tokens) / sum(padded)) if None not in padded else None
    rss_kib = result.get("vm_hwm_kib") or result["ru_maxrss_kib"]
    out = {
        "tokens_per_s": sums["tokens"] / elapsed,
        "supervised_tokens_per_s": sums["supervised"] / elapsed,
        "samples_per_s": sums["samples"] / elapsed,
        # the same window's CPU time (process_time: all threads of the run's process)
        "supervised_tokens_per_cpu_s": sums["supervised"] / cpu if cpu else None,
        "measured_cpu_seconds": cpu,
        "peak_rss_mib": rss_kib / 1024,
        "ru_maxrss_mib": result["ru_maxrss_kib"] / 1024,
        "rss_before_train_mib": (result["rss_before_train_kib"] / 1024 if result.get("rss_before_train_kib")
                                 else None),
        "rss_before_train_what": result.get("rss_before_train_what"),
        "padding_fraction": padding,
        "first_loss": steps[0].get("loss"),
        "final_loss": steps[-1].get("loss"),
        "measured_steps": n - exclude, "measured_seconds": elapsed, "clock": clock, "wall_s": result["wall_s"],
        "threads": result.get("threads"), "loadavg_before": result.get("loadavg_before"),
        "per_step": [{"step": s["step"], "loss": s.get("loss"), "lr": s.get("lr"), **t}
                     for s, t in zip(steps, tokens, strict=True)],
        "config": result.get("config", {}),
    }
    if n != spec["steps"]:
        notes.append(f"ran {n} of {spec['steps']} steps")
    if result.get("skipped"):
        notes.append(f"vlmtune skipped samples: {result['skipped']}")
    if notes:
        out["notes"] = notes
    return out


def checks(runs: dict) -> dict:
    """Did the peers train on the same batches with the same schedule, and start from the same loss?"""
    ok = {k: v for k, v in runs.items() if "per_step" in v and k != "vlmtune-packed"}
    out: dict = {}
    if len(ok) < 2:
        return out
    names = list(ok)
    ref = ok[names[0]]["per_step"]
    out["same_tokens_and_padding"] = all(
        [(s["tokens"], s["padded"]) for s in ok[k]["per_step"]] == [(s["tokens"], s["padded"]) for s in ref]
        for k in names)
    # extra supervised tokens per sample compared with the first run, at each step (TRL: its '\n' after <|im_end|>)
    out["extra_supervised_tokens_per_sample"] = {
        k: sorted({(s["supervised"] - r["supervised"]) / s["samples"] for s, r in zip(ok[k]["per_step"], ref,
                                                                                   strict=False)})
        for k in names}
    lrs = {k: [s["lr"] for s in ok[k]["per_step"]] for k in names}
    out["max_lr_difference"] = max(abs(a - b) for k in names for a, b in zip(lrs[k], lrs[names[0]], strict=False)
                                   if a is not None and b is not None)
    out["first_loss"] = {k: ok[k]["first_loss"] for k in names}
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None) if Path("/proc/meminfo").is_file() else None
    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vlmtune"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(runs: dict) -> str:
    head = ("| run | tokens/s | supervised tok/s | samples/s | supervised tok / CPU-s | peak RSS (MiB) | padding "
            "| loss step 1 | final loss | wall (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for which, r in runs.items():
        name = LABELS.get(which, which)
        if "tokens_per_s" not in r:
            why = r.get("error") or "no result"
            if "rejected" in r:
                problem = next((ln.strip(" -") for ln in r["rejected"].splitlines() if ln.strip().startswith("- ")),
                               r["rejected"])
                why = f"recipe rejected it: {problem.split(' (known here')[0]}"
            lines.append(f"| {name} — not run: {why[:120]} | — | — | — | — | — | — | — | — | — |")
            continue
        pad = None if r["padding_fraction"] is None else 100 * r["padding_fraction"]
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['supervised_tokens_per_s']:.1f} | "
                     f"{r['samples_per_s']:.3f} | {fmt(r['supervised_tokens_per_cpu_s'], '.1f')} | "
                     f"{r['peak_rss_mib']:.0f} | {fmt(pad, '.1f')}% | "
                     f"{fmt(r['first_loss'], '.4f')} | {fmt(r['final_loss'], '.4f')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    spec = make_spec(args)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "spec.json"
    benchlib.write_json(spec_file, spec)
    started = datetime.datetime.now().astimezone()
    print(f"[bench] workdir {workdir}; {spec['steps']} steps of {spec['global_batch']} samples "
          f"({args.grad_accum} x {spec['micro_batch']}), model {spec['model']}, runs: {', '.join(args.only)}",
          flush=True)

    prep = run_child("prep", spec_file, workdir, args.timeout)
    if "error" in prep:
        return 1
    benchlib.write_json(Path(spec["rows_file"]), {"order": prep["order"], "rows": prep["rows"]})
    data = (f"{spec['n_train']} mixed samples" if spec["workload"] == "mixed" else
            f"{spec['n_train']} receipts of {spec['image_size'][0]} x {spec['image_size'][1]}")
    print(f"[bench] model: {prep['model']['parameters'] / 1e6:.1f}M parameters "
          f"({prep['model']['vision_parameters'] / 1e6:.2f}M vision); {data} at max_pixels "
          f"{spec['pixels']['max_pixels']}", flush=True)

    order = [p for p in PEERS if p in args.only]
    if args.packing and "vlmtune" in args.only:
        order.append("vlmtune-packed")
    runs = {}
    for which in order:
        print(f"[bench] running {which} ...", flush=True)
        runs[which] = summarize(which, run_child(which, spec_file, workdir, args.timeout), spec)
        r = runs[which]
        if "supervised_tokens_per_s" in r:
            print(f"[bench]   {which}: {r['supervised_tokens_per_s']:.1f} supervised tok/s, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB, final loss {fmt(r['final_loss'], '.4f')} ({r['wall_s']:.0f} s)",
                  flush=True)
        elif "rejected" in r:
            print(f"[bench]   {which}: the recipe rejected train.packing=true", flush=True)

    peers = [runs[p] for p in ("trl", "trainer") if p in runs and "supervised_tokens_per_s" in runs[p]]
    fastest = max((p["supervised_tokens_per_s"] for p in peers), default=None)
    leanest = min((p["peak_rss_mib"] for p in peers), default=None)
    mine = runs.get("vlmtune", {})
    packed = runs.get("vlmtune-packed")
    if packed is None:
        packed_reason = "not run: pass --packing" if "vlmtune" in args.only else "vlmtune not in --only"
    elif "rejected" in packed:
        problems = [ln.strip(" -") for ln in packed["rejected"].splitlines() if ln.strip().startswith("- ")]
        packed_reason = "the vlmtune recipe rejects train.packing=true: " + "; ".join(problems or [packed["rejected"]])
    elif "error" in packed:
        packed_reason = "the packed run failed: " + packed["error"]
    else:
        packed_reason = None if fastest else "no peer result to compare with"
    summary = {
        "date": started.isoformat(timespec="seconds"), "machine": machine(),
        "loadavg_at_end": os.getloadavg(),
        "settings": {**{k: spec[k] for k in ("model", "steps", "micro_batch", "global_batch", "lr", "warmup",
                                              "min_lr_ratio", "max_grad_norm", "seed", "exclude_steps",
                                              "n_train", "image_size", "pixels", "max_length", "workload")},
                     "grad_accum": args.grad_accum, "parameters": prep["model"], "quick": args.quick},
        "ratio_unpacked": ratio(mine.get("supervised_tokens_per_s"), fastest),
        "ratio_packed": None if packed_reason else ratio(packed.get("supervised_tokens_per_s"), fastest),
        "ratio_packed_reason": packed_reason,
        "rss_ratio": ratio(mine.get("peak_rss_mib"), leanest),
        "checks": checks(runs),
        "runs": runs,
    }
    print()
    print(table(runs))
    print()
    print(f"ratio_unpacked (vlmtune supervised tok/s / faster peer's): {fmt(summary['ratio_unpacked'], '.2f')}; "
          f"ratio_packed: {fmt(summary['ratio_packed'], '.2f')}"
          + (f" ({packed_reason.split(' (known here')[0]})" if packed_reason else "")
          + f"; rss_ratio (vlmtune peak RSS / leaner peer's): {fmt(summary['rss_ratio'], '.2f')}")
    c = summary["checks"]
    if c:
        print(f"checks: same tokens and padding every step: {c['same_tokens_and_padding']}; "
              f"max lr difference {c['max_lr_difference']:.2e}; loss at step 1: "
              + ", ".join(f"{k} {fmt(v, '.5f')}" for k, v in c["first_loss"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        benchlib.write_json(args.out, summary)
        print(f"[bench] summary: {args.out}")
    failed = [k for k, r in runs.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
