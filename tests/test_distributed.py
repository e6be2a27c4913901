"""Several processes on CPU (gloo, torchrun --nproc-per-node 2): FSDP2 and DDP against one process.

Every 2-rank run trains the same global batch (4 samples: 1 per micro-batch, 2 micro-batches per rank; the
1-rank run does 4 micro-batches), so per-step losses must agree to rounding. The runs use the tiny Qwen2.5-VL
and 12 small single-colour images with 1-2 word answers (a step is a fraction of a second); the parts that do
not matter to a test are frozen to keep the 152k-row embedding out of the optimizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import small_recipe
from vlmtune.config import build_recipe
from vlmtune.train import finetune

HERE = Path(__file__).parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "vision": True}  # no dropout: ranks draw different random streams

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    import PIL.Image

    root = tmp_path_factory.mktemp("dist-data")
    names = list(COLORS)
    rows = []
    for i in range(12):
        color = names[(i * 3) % len(names)]
        PIL.Image.new("RGB", (56, 56), COLORS[color]).save(root / f"{i}.png")
        rows.append({"prompt": "Which colour is this?", "completion": f"{color} {i % 3}", "images": [f"{i}.png"]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tree(model_dir, data_dir, out_dir, peft=None, freeze=None, distributed=None, **train) -> dict:
    train = {"max_steps": 3, "micro_batch_size": 1, "global_batch_size": 4, "lr": 2e-3, "max_length": 128,
             "warmup_steps": 0, **train}
    t = small_recipe(model_dir, data_dir, out_dir, **train)
    t["data"] = {"train": {"source": str(data_dir / "train.jsonl"), "format": "messages"}}
    if peft is not None:
        t["peft"] = peft
    if freeze:
        t["freeze"] = freeze
    if distributed:
        t["distributed"] = distributed
    return t


def torchrun(args: list[str], timeout: float = 90, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def run_2(t: dict, tmp_path: Path, name: str) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(t))
    proc = torchrun(["-m", "vlmtune", "finetune", "-c", str(recipe)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return Path(t["output_dir"])


def steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def assert_same_losses(a: Path, b: Path, tol: float = 1e-5) -> None:
    sa, sb = steps(a), steps(b)
    assert [r["step"] for r in sa] == [r["step"] for r in sb] and sa
    for ra, rb in zip(sa, sb, strict=True):
        assert ra["supervised_tokens"] == rb["supervised_tokens"]
        assert abs(ra["loss"] - rb["loss"]) <= tol, (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * max(1.0, ra["grad_norm"]), (ra, rb)


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, color_data, tmp_path_factory):
    """1-process reference runs, one per setting, built on first use."""
    cache: dict[str, Path] = {}

    def get(name: str, **kw) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"one-{name}")
            finetune(build_recipe(tree(tiny_model_dir, color_data, out, **kw)))
            cache[name] = out
        return cache[name]

    return get


FULL = {"freeze": {"language_model": True}}  # vision tower + projector train in full
LM_FULL = {"freeze": {"vision_tower": True}}  # language model (152k-row embedding) + projector
ADAPTER = {"peft": LORA}


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
@pytest.mark.parametrize("setting", ["full", "lora"])
def test_two_ranks_match_one_rank(strategy, setting, one_rank, tiny_model_dir, color_data, tmp_path):
    kw = FULL if setting == "full" else ADAPTER
    ref = one_rank(setting, **kw)
    out = run_2(tree(tiny_model_dir, color_data, tmp_path / "out", distributed={"strategy": strategy}, **kw),
                tmp_path, "r")
    assert_same_losses(ref, out)
    assert (out / "final").is_dir()


def test_fsdp2_final_model_is_whole_and_loads(one_rank, tiny_model_dir, color_data, tmp_path):
    """The language model trains too (embedding, decoder layers); the gathered folder loads like the 1-rank one."""
    from transformers import AutoModelForImageTextToText

    ref = one_rank("lm", **LM_FULL)
    out = run_2(tree(tiny_model_dir, color_data, tmp_path / "out", **LM_FULL), tmp_path, "lm")
    assert_same_losses(ref, out)
    a = AutoModelForImageTextToText.from_pretrained(ref / "final").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(out / "final").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=0, msg=k)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(base[k], b[k]) for k in b)  # trained, not the base reloaded


def test_fsdp2_lora_adapter_is_whole(one_rank, tiny_model_dir, color_data, tmp_path):
    """Every rank's shard of every adapter matrix is in the saved adapter (not rank 0's slice alone)."""
    ref = one_rank("lora", **ADAPTER)
    out = run_2(tree(tiny_model_dir, color_data, tmp_path / "out", **ADAPTER), tmp_path, "lora")
    a = load_file(ref / "final" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter_model.safetensors")
    assert (out / "final" / "adapter_config.json").is_file()
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=0, msg=k)
    assert any(".lora_B." in k and b[k].abs().sum() > 0 for k in b)  # trained: B left zero


def test_a_failing_rank_ends_the_others(tiny_model_dir, color_data, tmp_path):
    t = tree(tiny_model_dir, color_data, tmp_path / "out", max_steps=20, distributed={"timeout_s": 30}, **FULL)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(t))
    start = time.monotonic()
    proc = torchrun([str(HERE / "dist_worker.py"), str(recipe), "--fail-rank", "1", "--fail-step", "2"],
                    timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "final").exists()
