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


FULL = {}  # everything trains, the language model's 152k-row embedding included
FROZEN_LM = {"freeze": {"language_model": True}}  # vision tower + projector train (fast steps)
ADAPTER = {"peft": LORA}


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
@pytest.mark.parametrize("setting", ["full", "lora"])
def test_two_ranks_match_one_rank(strategy, setting, one_rank, tiny_model_dir, color_data, tmp_path):
    """Same losses and gradient norms step by step; under FSDP2 the final folder (gathered layer by layer, or the
    adapter gathered from every rank's shards) equals the 1-rank one."""
    kw = FULL if setting == "full" else ADAPTER
    ref = one_rank(setting, **kw)
    # Recomputing activations must not change a thing (FSDP2 + LoRA + non-reentrant checkpointing here).
    ac = "all" if (strategy, setting) == ("fsdp2", "lora") else "none"
    t = tree(tiny_model_dir, color_data, tmp_path / "out",
             distributed={"strategy": strategy, "activation_checkpointing": ac}, **kw)
    if strategy == "ddp" and setting == "lora":
        t["checkpoint"] = {"every_steps": 2}  # a sharded checkpoint from unsharded (DDP) weights, resumed below
    out = run_2(t, tmp_path, "r")
    assert_same_losses(ref, out)
    assert (out / "final").is_dir()
    if strategy == "ddp" and setting == "lora":
        import shutil

        one = tmp_path / "one"
        shutil.copytree(out, one)
        t = tree(tiny_model_dir, color_data, one, **kw)
        t["checkpoint"], t["resume"] = {"every_steps": 2}, str(one / "checkpoints" / "step-000002")
        finetune(build_recipe(t))
        assert_same_losses(ref, one)
    if strategy == "fsdp2" and setting == "full":
        assert_same_final_model(ref / "final", out / "final", tiny_model_dir)
    if strategy == "fsdp2" and setting == "lora":
        assert_same_adapter(ref / "final", out / "final")


def assert_same_final_model(a_dir: Path, b_dir: Path, base_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    a = AutoModelForImageTextToText.from_pretrained(a_dir).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(b_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=0, msg=k)
    base = AutoModelForImageTextToText.from_pretrained(base_dir).state_dict()
    assert any(not torch.equal(base[k], b[k]) for k in b)  # trained, not the base reloaded


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    """Every rank's shard of every adapter matrix is saved (not rank 0's slice alone), in the PEFT layout."""
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert (b_dir / "adapter_config.json").is_file()
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=0, msg=k)
    assert any(".lora_B." in k and b[k].abs().sum() > 0 for k in b)  # trained: B starts at zero


def test_a_failing_rank_ends_the_others(tiny_model_dir, color_data, tmp_path):
    t = tree(tiny_model_dir, color_data, tmp_path / "out", max_steps=20, distributed={"timeout_s": 30},
             **FROZEN_LM)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(t))
    start = time.monotonic()
    proc = torchrun([str(HERE / "dist_worker.py"), str(recipe), "--fail-rank", "1", "--fail-step", "2"],
                    timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_fsdp2_resume_on_one_rank(tiny_model_dir, color_data, tmp_path):
    """A 2-rank FSDP2 LoRA run saves sharded checkpoints (DCP); one process resumes them: from step 2 it continues
    like the uninterrupted run, and from the last step every adapter weight equals the one saved."""
    import shutil

    ckpt = {"every_steps": 2, "keep": 2}
    t = tree(tiny_model_dir, color_data, tmp_path / "two", max_steps=4, **ADAPTER)
    t["checkpoint"] = ckpt
    two = run_2(t, tmp_path, "two")
    assert (two / "checkpoints" / "step-000002" / "dcp" / ".metadata").is_file()
    state = json.loads((two / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2

    for step in (2, 4):
        out = tmp_path / f"one-from-{step}"
        shutil.copytree(two, out)
        t = tree(tiny_model_dir, color_data, out, max_steps=4, **ADAPTER)
        t["checkpoint"], t["resume"] = ckpt, str(out / "checkpoints" / f"step-{step:06d}")
        finetune(build_recipe(t))
        a = load_file(two / "final" / "adapter_model.safetensors")
        b = load_file(out / "final" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        if step == 4:  # nothing left to train: the loaded adapter is the saved one, bit for bit
            assert all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert_same_losses(two, out)
            for k in a:
                torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_strategy_defaults_and_validation():
    from vlmtune.config import DistributedConfig
    from vlmtune.parallel import DistributedError, grad_scale, resolve_strategy

    assert resolve_strategy(DistributedConfig(), 1) == "none"
    assert resolve_strategy(DistributedConfig(), 2) == "fsdp2"
    assert resolve_strategy(DistributedConfig(strategy="ddp"), 4) == "ddp"
    assert resolve_strategy(DistributedConfig(dp_replicate=2, dp_shard=2), 4) == "fsdp2"
    with pytest.raises(DistributedError, match="strategy=none"):
        resolve_strategy(DistributedConfig(strategy="none"), 2)
    with pytest.raises(DistributedError, match="must equal the world size"):
        resolve_strategy(DistributedConfig(dp_replicate=2, dp_shard=4), 4)
    assert grad_scale("fsdp2", 4) == 4.0 and grad_scale("none", 1) == 1.0
    with pytest.raises(ValueError):
        build_recipe({"model": {"name_or_path": "x"}, "data": {"train": {"source": "x"}}, "train": {"max_steps": 1},
                      "distributed": {"strategy": "zero3"}})


def test_activation_checkpointing_per_part(tiny_model_dir):
    from vlmtune.config import ModelConfig
    from vlmtune.model import load_model
    from vlmtune.parallel import apply_activation_checkpointing

    model, _, family = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    assert apply_activation_checkpointing(model, family, "language") == 2  # the 2 decoder layers
    assert apply_activation_checkpointing(model, family, "vision") == 2  # the 2 vision blocks
    on = [n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False)]
    assert len(on) == 4 and all(".layers." in n or ".blocks." in n for n in on)
