"""bench/gpu_bench.py's pieces that need no GPU: the runs bench/gpu_all.sh asks for exist in the plan it builds,
the window statistics, and the mixed workload (bench/benchlib.py) has the shape issue 19 asks for."""

from __future__ import annotations

import random
import re
import shlex
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    import benchlib
    import gpu_bench

    yield gpu_bench, benchlib
    sys.path.remove(str(BENCH))


def test_gpu_all_asks_for_planned_runs(bench):
    """gpu_all.sh's --only names are runs its own options plan (a renamed run would silently not run)."""
    gpu_bench, _ = bench
    script = (BENCH / "gpu_all.sh").read_text()
    runs = re.search(r"^RUNS=(\S+)", script, re.M).group(1)
    call = script.split("bash bench/gpu.sh /tmp/vlmtune-bench", 1)[1].split('> "$OUT_DIR', 1)[0]
    words = shlex.split(call.replace("\\\n", " ").replace("$RUNS", runs))
    at = words.index("--only")
    args, only = gpu_bench.parse_args(words[:at] + words[at + 2:]), words[at + 1].split(",")
    planned = gpu_bench.plan(args)
    assert only and all(name in planned for name in only), set(only) - set(planned)
    assert planned["full-receipts-padded4-stock"]["attention"] == "stock"
    assert planned["full-receipts-packed8k"]["budget"] == 8192 and planned["full-receipts-packed8k"]["packing"]


def test_window_statistics(bench):
    gpu_bench, _ = bench
    dims = gpu_bench.SMOKE
    batch = {"tokens": 100, "padded": 120, "supervised": 20, "samples": 2, "lengths": [60, 40], "grids": [[1, 4, 4]]}
    result = {"ends": [0.0, 10.0, 12.0, 13.0, 15.0, 16.0], "per_step_batches": [1, 2, 3, 4, 5, 6],
              "batches": [batch] * 6, "waits": [0.5, 0.1, 0.1, 0.2, 0.0, 0.1], "losses": [3.0, 2.0],
              "profile_step": 2, "wall_s": 20.0}
    run = {"mode": "full", "micro_batch": 2, "budget": None}
    s = gpu_bench.summarize(result, {"dims": dims, "lora_r": 16}, run, peak=1e12)
    assert s["step_s"]["steps"] == 4 and s["step_s"]["median"] == pytest.approx(1.5)  # steps of 1, 2, 1, 2 s
    assert s["tokens_per_s_per_gpu"] == pytest.approx(400 / 6)  # the 4 window steps' tokens over their 6 s
    assert s["data_wait_share"] == pytest.approx(0.4 / 6)
    assert s["mfu_llm_6nd"] == pytest.approx(gpu_bench.llm_6nd(400, dims) / 6 / 1e12)


def test_mixed_workload_shape(bench):
    _, benchlib = bench
    rng = random.Random(0)
    rows = [benchlib.mixed_sample(rng, i) for i in range(60)]
    text_only = [r for r in rows if not r["images"]]
    assert 0.05 <= len(text_only) / len(rows) <= 0.4
    tokens = [(im.width // 28) * (im.height // 28) for r in rows for im in r["images"]]
    assert min(tokens) >= 48 and max(tokens) <= 1280 and max(tokens) > 600  # ~64-1,280 merged tokens, spread
    assert all(im.width % 28 == 0 and im.height % 28 == 0 for r in rows for im in r["images"])
    words = [len(r["messages"][1]["content"].split()) for r in rows]
    assert min(words) >= 30 and max(words) <= 400
