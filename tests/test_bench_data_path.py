"""bench/data_path.py on a tiny setting: every (workers, micro-batch) run sees the same samples, at a positive rate."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_path.py"


@pytest.fixture(scope="module")
def data_path() -> ModuleType:
    """bench/ is not a package: load the script as a module (registered, so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location("bench_data_path", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_data_path_bench_tiny(data_path: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    data_path.main(["--samples", "6", "--image-size", "160x240", "--workers", "0,1", "--batch-sizes", "2",
                    "--breakdown-samples", "2", "--device", "cpu", "--workdir", str(tmp_path / "data"),
                    "--out", str(out)])
    result = json.loads(out.read_text())
    runs = result["loader_runs"]
    assert [(r["num_workers"], r["micro_batch_size"]) for r in runs] == [(0, 2), (1, 2)]
    for r in runs:
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["startup_s"] > 0, r
        assert r["skipped"] == 0 and r["cpu_ms_per_sample"] > 0, r
    assert {r["samples"] for r in runs} == {6}
    assert {r["measured_samples"] for r in runs} == {4}  # 3 batches of 2, the first is the warm-up
    stages = result["breakdown"]["ms_per_sample"]
    assert all(ms >= 0 for ms in stages.values()), stages
    assert result["breakdown"]["image_tokens_per_sample"] > 0


def test_data_path_bench_video_tiny(data_path: ModuleType, tmp_path: Path) -> None:
    """--video: clips decoded in the workers and processed by the video processor, timed as a stage of its own."""
    out = tmp_path / "result.json"
    data_path.main(["--video", "--samples", "6", "--video-size", "64x48", "--video-seconds", "2",
                    "--video-source-fps", "6", "--video-config", '{"num_frames": 4}', "--workers", "0,1",
                    "--batch-sizes", "2", "--breakdown-samples", "2", "--device", "cpu", "--workdir",
                    str(tmp_path / "data"), "--out", str(out)])
    result = json.loads(out.read_text())
    for r in result["loader_runs"]:
        assert r["samples_per_s"] > 0 and r["skipped"] == 0 and r["samples"] == 6, r
    stages = result["breakdown"]["ms_per_sample"]
    assert stages["processor: video processor"] > 0 and stages["processor: image processor"] == 0
    assert result["breakdown"]["image_tokens_per_sample"] > 0 and "64x48" in result["inputs"]["video"]
