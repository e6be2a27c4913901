"""Several processes on CPU (gloo, torchrun): FSDP2, DDP and HSDP against one process.

Every 2-rank run trains the same global batch (4 samples: 1 per micro-batch, 2 micro-batches per rank; the
1-rank run does 4 micro-batches), so per-step losses must agree to rounding. The runs use the tiny Qwen2.5-VL
and 12 small single-colour images with 1-2 word answers (a step is a fraction of a second); the parts that do
not matter to a test are frozen to keep the 152k-row embedding out of the optimizer.

Starting torchrun and importing torch / transformers in every rank costs more than a run, so runs share launches
(tests/dist_worker.py runs a launch's recipes in turn in one process group): one 2-rank launch holds every parity
run and ends with the failing-rank run, one 1-rank launch the one-process FSDP2 runs, one 2-rank launch the
desync runs. Each launch runs once per test run, also under xdist (the first worker to need it runs it, the
others read its record); each test checks its runs. The 1-rank references and the resumes from 2-rank
checkpoints run in the test's process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from safetensors.torch import load_file

from conftest import shared_dir, small_recipe
from vlmtune.config import DistributedConfig, build_recipe
from vlmtune.train import finetune

HERE = Path(__file__).parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "vision": True}  # no dropout: ranks draw different random streams

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable"),
              pytest.mark.xdist_group("test_distributed")]  # one worker for the module, where loadgroup works


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    """12 small single-colour images with 1-2 word answers (train.jsonl), and the desync layouts
    (write_desync_data), written once per test run in a folder every xdist worker sees."""
    import PIL.Image

    root = shared_dir(tmp_path_factory, "dist-data")
    with FileLock(str(root) + ".lock"):
        if not (root / "train.jsonl").is_file():
            names = list(COLORS)
            rows = []
            for i in range(12):
                color = names[(i * 3) % len(names)]
                PIL.Image.new("RGB", (56, 56), COLORS[color]).save(root / f"{i}.png")
                rows.append({"prompt": "Which colour is this?", "completion": f"{color} {i % 3}",
                             "images": [f"{i}.png"]})
            write_desync_data(root)
            (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # last: the marker
    return root


def tree(model_dir, data_dir, out_dir, peft=None, freeze=None, distributed=None, data_file="train.jsonl",
         eval=None, **train) -> dict:
    train = {"max_steps": 3, "micro_batch_size": 1, "global_batch_size": 4, "lr": 2e-3, "max_length": 128,
             "warmup_steps": 0, **train}
    t = small_recipe(model_dir, data_dir, out_dir, **train)
    t["data"] = {"train": {"source": str(data_dir / data_file), "format": "messages"}}
    if peft is not None:
        t["peft"] = peft
    if freeze:
        t["freeze"] = freeze
    if distributed:
        t["distributed"] = distributed
    if eval:
        t["eval"] = eval
    return t


def torchrun(args: list[str], timeout: float, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run torchrun in its own session, so that a hang kills the ranks too, not only the launcher."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[test] torchrun killed after {timeout} s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@dataclass
class Launch:
    """What one torchrun launch of tests/dist_worker.py left: its recipes by name (run in this order), their output
    folders, its exit code and output, and when it ended."""

    recipes: dict[str, str]
    outs: dict[str, str]
    returncode: int
    stdout: str
    stderr: str
    ended: float

    @classmethod
    def run(cls, root: Path, runs: dict[str, dict], nproc: int = 2, timeout: float = 900,
            fail: tuple[str, ...] = ()) -> Launch:
        recipes = {}
        for name, t in runs.items():
            recipes[name] = str(root / f"{name}.yaml")
            Path(recipes[name]).write_text(yaml.safe_dump(t))
        proc = torchrun([str(HERE / "dist_worker.py"), *recipes.values(), *fail], timeout, nproc)
        return cls(recipes, {name: t["output_dir"] for name, t in runs.items()}, proc.returncode, proc.stdout,
                   proc.stderr, time.time())

    @property
    def log(self) -> str:
        return self.stdout + self.stderr

    def done(self, name: str) -> bool:
        return f"dist_worker: done {self.recipes[name]}\n" in self.stdout

    def started(self, name: str) -> float | None:
        m = re.search(f"dist_worker: start {re.escape(self.recipes[name])} ([0-9.]+)", self.stdout)
        return float(m.group(1)) if m else None

    def out(self, name: str) -> Path:
        """The output folder of run `name`, which must have finished."""
        if not self.done(name):
            failed = next((n for n in self.recipes if self.started(n) and not self.done(n)), None)
            what = "failed" if failed in (name, None) else f"never started: run {failed!r} of its launch failed"
            pytest.fail(f"run {name!r} {what} (the launch exited with {self.returncode}):\n"
                        + self.stdout[-3000:] + self.stderr[-6000:])
        return Path(self.outs[name])


def shared_launch(tmp_path_factory, name: str, runs: Callable[[Path], dict[str, dict]], **kw) -> Launch:
    """A launch of `runs(folder)`, once per test run: under xdist the first worker to ask runs it and the others
    wait for its record (pytest-xdist's loadgroup does not keep this module on one worker on every pytest)."""
    root = shared_dir(tmp_path_factory, f"launch-{name}")
    with FileLock(str(root) + ".lock"):
        record = root / "launch.json"
        if not record.is_file():
            record.write_text(json.dumps(asdict(Launch.run(root, runs(root), **kw))))
        return Launch(**json.loads(record.read_text()))


def steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def assert_same_losses(a: Path, b: Path, tol: float = 1e-5, first_step: int = 1) -> None:
    sa, sb = [[r for r in steps(x) if r["step"] >= first_step] for x in (a, b)]
    assert [r["step"] for r in sa] == [r["step"] for r in sb] and sa
    for ra, rb in zip(sa, sb, strict=True):
        assert ra["supervised_tokens"] == rb["supervised_tokens"]
        assert abs(ra["loss"] - rb["loss"]) <= tol, (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * max(1.0, ra["grad_norm"]), (ra, rb)


FULL = {}  # everything trains, the language model's 152k-row embedding included
FROZEN_LM = {"freeze": {"language_model": True}}  # vision tower + projector train (fast steps)
ADAPTER = {"peft": LORA, "max_steps": 4}  # 4 steps: checkpoints at 2 and 4 resume on one process
SETTINGS = {"full": FULL, "lora": ADAPTER}
EVAL = {"split": "train", "max_samples": 5, "batch_size": 2, "max_new_tokens": 4}
CKPT = {"every_steps": 2, "keep": 2}


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, color_data, tmp_path_factory):
    """1-process reference runs (in this process), one per setting of SETTINGS, built on first use."""
    cache: dict[str, Path] = {}

    def get(setting: str) -> Path:
        if setting not in cache:
            out = tmp_path_factory.mktemp(f"one-{setting}")
            finetune(build_recipe(tree(tiny_model_dir, color_data, out, **SETTINGS[setting])))
            cache[setting] = out
        return cache[setting]

    return get


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tiny_model, color_data, page_data, tmp_path_factory) -> Launch:
    """Every 2-rank parity run (FSDP2 / DDP x full / LoRA, FSDP2 packed, HSDP; Kimi-VL FSDP2 full / LoRA) in one
    launch, then a run whose rank 1 fails."""

    def runs(root: Path) -> dict[str, dict]:
        runs = {}
        for strategy in ("fsdp2", "ddp"):
            for setting in ("full", "lora"):
                # Recomputing activations must not change a thing (FSDP2 + LoRA + non-reentrant checkpointing).
                ac = "all" if (strategy, setting) == ("fsdp2", "lora") else "none"
                t = tree(tiny_model_dir, color_data, root / f"{strategy}-{setting}",
                         distributed={"strategy": strategy, "activation_checkpointing": ac}, **SETTINGS[setting])
                if setting == "lora":  # sharded checkpoints (DCP; from unsharded weights under DDP), resumed below
                    t["checkpoint"] = CKPT
                runs[f"{strategy}-{setting}"] = t
        # Packing under FSDP2: two samples per row, attended sample by sample (vlmtune/attention.py).
        runs["fsdp2-packed"] = tree(tiny_model_dir, color_data, root / "fsdp2-packed", micro_batch_size=2,
                                    packing=True, distributed={"strategy": "fsdp2"}, **FULL)
        # HSDP on a 2-D mesh: 2 replicas of a 1-rank shard group.
        runs["hsdp-full"] = tree(tiny_model_dir, color_data, root / "hsdp-full",
                                 distributed={"strategy": "fsdp2", "dp_replicate": 2, "dp_shard": 1}, **FULL)
        # Kimi-VL (vlmtune's native MoE family): FSDP2 units over its DeepSeek-V3 layers and MoonViT; LoRA (no
        # dropout) includes the fused routed experts' parameter adapters.
        for setting in ("full", "lora"):
            runs[f"kimi_vl-{setting}"] = tree(tiny_model("kimi_vl"), color_data, root / f"kimi_vl-{setting}",
                                              distributed={"strategy": "fsdp2"}, **SETTINGS[setting])
        # Evaluation during training under FSDP2: each rank generates for its share (5 samples over 2 ranks).
        runs["fsdp2-eval"] = tree(tiny_model_dir, color_data, root / "fsdp2-eval", max_steps=2, eval=EVAL,
                                  distributed={"strategy": "fsdp2"}, **FROZEN_LM)
        # Nemotron-Parse (the encoder-decoder family): FSDP2 units over its decoder layers and the RADIO encoder.
        runs["nemotron_parse-full"] = nemotron_tree(tiny_model("nemotron_parse"), page_data,
                                                    root / "nemotron_parse-full", distributed={"strategy": "fsdp2"})
        runs["failing"] = tree(tiny_model_dir, color_data, root / "failing", max_steps=20,
                               distributed={"timeout_s": 60}, **FROZEN_LM)
        return runs

    return shared_launch(tmp_path_factory, "two-ranks", runs, fail=("--fail-rank", "1", "--fail-step", "2"))


def nemotron_tree(model_dir, page_data, out_dir, **kw) -> dict:
    t = tree(model_dir, page_data, out_dir, max_length=512, **kw)
    t["data"] = {"train": {"source": str(page_data / "train.jsonl"), "format": "nemotron_parse"}}
    return t


def resume_on_one_process(run: Path, step: int, out: Path, model_dir, data_dir, **kw) -> Path:
    """A copy of `run` resumed in this process from its checkpoint of `step`."""
    shutil.copytree(run, out)
    t = tree(model_dir, data_dir, out, **kw)
    t["checkpoint"], t["resume"] = CKPT, str(out / "checkpoints" / f"step-{step:06d}")
    finetune(build_recipe(t))
    return out


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
@pytest.mark.parametrize("setting", ["full", "lora"])
def test_two_ranks_match_one_rank(strategy, setting, two_ranks, one_rank, tiny_model_dir, color_data, tmp_path):
    """Same losses and gradient norms step by step; under FSDP2 the final folder (gathered layer by layer, or the
    adapter gathered from every rank's shards) equals the 1-rank one."""
    ref = one_rank(setting)
    out = two_ranks.out(f"{strategy}-{setting}")
    assert_same_losses(ref, out)
    assert (out / "final").is_dir()
    if strategy == "ddp" and setting == "lora":  # a sharded checkpoint of unsharded weights, on one process
        one = resume_on_one_process(out, 2, tmp_path / "one", tiny_model_dir, color_data, **ADAPTER)
        assert_same_losses(ref, one)
    if strategy == "fsdp2" and setting == "full":
        assert_same_final_model(ref / "final", out / "final", tiny_model_dir)
    if strategy == "fsdp2" and setting == "lora":
        assert_same_adapter(ref / "final", out / "final")


def test_two_ranks_packed_match_one_rank_padded(two_ranks, one_rank):
    """FSDP2 on 2 ranks with packed rows of two samples: the 1-rank padded run's losses, step by step."""
    assert_same_losses(one_rank("full"), two_ranks.out("fsdp2-packed"))


def test_hsdp_matches_one_rank(two_ranks, one_rank, tiny_model_dir):
    """dp_replicate=2 x dp_shard=1 on 2 ranks: same losses; the gradient norm counts each replica once."""
    ref, out = one_rank("full"), two_ranks.out("hsdp-full")
    assert_same_losses(ref, out)
    for ra, rb in zip(steps(ref), steps(out), strict=True):
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-5 * ra["grad_norm"], (ra, rb)
    assert_same_final_model(ref / "final", out / "final", tiny_model_dir)


@pytest.mark.parametrize("setting", ["full", "lora"])
def test_kimi_vl_fsdp2_two_ranks_match_one_rank(setting, two_ranks, tiny_model, color_data, tmp_path):
    """Kimi-VL under FSDP2 on 2 ranks: the 1-rank losses step by step, and the same final weights / adapter (the
    adapter includes the routed experts' parameter adapters)."""
    model_dir = tiny_model("kimi_vl")
    finetune(build_recipe(tree(model_dir, color_data, tmp_path / "one", **SETTINGS[setting])))
    out = two_ranks.out(f"kimi_vl-{setting}")
    assert_same_losses(tmp_path / "one", out)
    if setting == "full":
        assert_same_final_model(tmp_path / "one" / "final", out / "final", model_dir)
        # Gathered layer by layer, still the official names (fused q|k|v, per-expert weights) save_pretrained writes.
        assert sorted(load_file(out / "final" / "model.safetensors")) == \
            sorted(load_file(tmp_path / "one" / "final" / "model.safetensors"))
    else:
        assert_same_adapter(tmp_path / "one" / "final", out / "final")
        assert any(".mlp.experts.lora_B." in k for k in load_file(out / "final" / "adapter_model.safetensors"))


def test_evaluation_on_two_ranks_equals_one_rank(two_ranks, tiny_model_dir, color_data, tmp_path):
    """Each rank generates for its share of the samples, rank 0 scores the gathered rows: every sample once, and
    the same predictions and metrics as one process."""
    one = tmp_path / "one"
    finetune(build_recipe(tree(tiny_model_dir, color_data, one, max_steps=2, eval=EVAL, **FROZEN_LM)))
    two = two_ranks.out("fsdp2-eval")
    assert_same_losses(one, two)
    rows = {}
    for out in (one, two):
        lines = (out / "eval" / "step-000002" / "predictions.jsonl").read_text().splitlines()
        rows[out] = [json.loads(x) for x in lines]
    assert [r["index"] for r in rows[two]] == [0, 1, 2, 3, 4]
    assert [r["prediction"] for r in rows[two]] == [r["prediction"] for r in rows[one]]
    metrics = [json.loads((out / "eval" / "step-000002" / "metrics.json").read_text()) for out in (one, two)]
    assert metrics[0]["metrics"] == metrics[1]["metrics"] and metrics[1]["samples"] == 5


def test_nemotron_parse_fsdp2_two_ranks_match_one_rank(two_ranks, tiny_model, page_data, tmp_path):
    """The encoder-decoder under FSDP2 on 2 ranks: the 1-rank losses step by step and the same final weights,
    gathered layer by layer (the RADIO encoder's `layer.N` blocks too) under the official names."""
    model_dir = tiny_model("nemotron_parse")
    finetune(build_recipe(nemotron_tree(model_dir, page_data, tmp_path / "one")))
    out = two_ranks.out("nemotron_parse-full")
    assert_same_losses(tmp_path / "one", out)
    assert_same_final_model(tmp_path / "one" / "final", out / "final", model_dir)


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


def test_a_failing_rank_ends_the_others(two_ranks):
    """The last run of the launch: rank 1 raises in its 2nd forward; rank 0 must exit with an error, soon."""
    assert two_ranks.started("failing"), two_ranks.stdout[-3000:] + two_ranks.stderr[-6000:]
    assert two_ranks.returncode != 0
    assert two_ranks.ended - two_ranks.started("failing") < 90
    assert "injected failure on rank 1" in two_ranks.log
    assert not (Path(two_ranks.outs["failing"]) / "final").exists()


def test_fsdp2_resume_on_one_rank(two_ranks, tiny_model_dir, color_data, tmp_path):
    """A 2-rank FSDP2 LoRA run saves sharded checkpoints (DCP); one process resumes them: from step 2 it continues
    like the uninterrupted run, and from the last step every adapter weight equals the one saved."""
    two = two_ranks.out("fsdp2-lora")
    assert (two / "checkpoints" / "step-000002" / "dcp" / ".metadata").is_file()
    state = json.loads((two / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["sharded"] and state["world_size"] == 2

    for step in (2, 4):
        out = resume_on_one_process(two, step, tmp_path / f"one-from-{step}", tiny_model_dir, color_data, **ADAPTER)
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
    from vlmtune.errors import DistributedError
    from vlmtune.parallel import grad_scale, resolve_strategy

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


# ---------------------------------------------------------------------------------------------------------
# One process under torchrun with an explicit strategy (FSDP2 on one GPU)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, color_data, tmp_path_factory) -> Launch:
    """torchrun --nproc-per-node 1 with distributed.strategy=fsdp2: a run (with cpu_offload), a run with
    checkpoints, its resume."""

    def runs(root: Path) -> dict[str, dict]:
        fsdp2 = {"strategy": "fsdp2"}
        runs = {"fsdp2": tree(tiny_model_dir, color_data, root / "fsdp2", distributed={**fsdp2, "cpu_offload": True},
                              **ADAPTER),
                "ckpt": tree(tiny_model_dir, color_data, root / "ckpt", distributed=fsdp2, **ADAPTER),
                "resumed": tree(tiny_model_dir, color_data, root / "resumed", distributed=fsdp2, **ADAPTER)}
        runs["ckpt"]["checkpoint"] = CKPT
        runs["resumed"]["resume"] = str(root / "ckpt" / "checkpoints" / "step-000002")
        # Last (it ends the launch): the second sharded checkpoint meets a full disk midway.
        runs["nospace"] = tree(tiny_model_dir, color_data, root / "nospace", distributed=fsdp2, **ADAPTER)
        runs["nospace"]["checkpoint"] = CKPT
        return runs

    return shared_launch(tmp_path_factory, "one-process", runs, nproc=1, fail=("--no-space-at-save", "2"))


def test_fsdp2_on_one_process_matches_a_plain_run(one_process, one_rank):
    """FSDP2 (with cpu_offload) in a process group of one: the plain run's losses and adapter."""
    ref, out = one_rank("lora"), one_process.out("fsdp2")
    assert_same_losses(ref, out)
    assert_same_adapter(ref / "final", out / "final")


def test_a_full_disk_during_a_sharded_save_leaves_the_last_checkpoint(one_process):
    """A sharded (DCP) save that fails midway for want of space: one clear line, what it wrote removed, the
    previous checkpoint intact and the run stopped without a final folder."""
    assert one_process.started("nospace") and not one_process.done("nospace")
    assert one_process.returncode != 0
    assert "no space left on" in one_process.log and "MB needed" in one_process.log
    checkpoints = Path(one_process.outs["nospace"]) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # no step-000004, no .tmp-* left
    assert (checkpoints / "step-000002" / "COMPLETE").is_file()
    assert not (Path(one_process.outs["nospace"]) / "final").exists()


def test_fsdp2_on_one_process_resumes(one_process):
    """Its weights are DTensors, so its checkpoints are sharded (DCP) even on one rank; a resume continues."""
    ckpt = one_process.out("ckpt")
    state = json.loads((ckpt / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["sharded"] and state["world_size"] == 1
    resumed = one_process.out("resumed")
    assert [r["step"] for r in steps(resumed)] == [3, 4]
    assert_same_losses(ckpt, resumed, first_step=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_starts_a_group_only_for_an_explicit_strategy_under_torchrun(monkeypatch):
    from vlmtune.parallel import process_group, resolve_strategy

    dist = torch.distributed
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with process_group(60, "cpu", "fsdp2"):  # plain `python -m vlmtune`: as before, no group
        assert not dist.is_initialized()
    torchrun_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port())}
    for key, value in torchrun_env.items():
        monkeypatch.setenv(key, value)
    with process_group(60, "cpu", None):  # no strategy named: as before
        assert not dist.is_initialized()
    with process_group(60, "cpu", "fsdp2"):
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert resolve_strategy(DistributedConfig(strategy="fsdp2"), 1) == "fsdp2"
        assert resolve_strategy(DistributedConfig(strategy="ddp"), 1) == "ddp"
        assert resolve_strategy(DistributedConfig(), 1) == "none"
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------------------
# Ranks that would run different numbers of forwards (vision tower included) without the loop's help


def write_desync_data(root: Path) -> None:
    """32 samples of 0.png in two layouts, placed by the sampler's order (micro-batches of 2, rank r takes every
    other index): corrupt.jsonl makes rank 0's first 4 samples (all of its step 1) unreadable images;
    text_only.jsonl gives rank 0 a text-only 2nd micro-batch while rank 1's holds images."""
    from vlmtune.data.dataset import EpochSampler

    order = EpochSampler(32, seed=0).order(0)
    (root / "corrupt.png").write_bytes(b"not a png")
    image = [{"prompt": "Which colour is this?", "completion": "red 1", "images": ["0.png"]}] * 32
    corrupt, text_only = list(image), list(image)
    for i in order[0:8:2]:
        corrupt[i] = {**image[i], "images": ["corrupt.png"]}
    for i in order[4:8:2]:
        text_only[i] = {"prompt": "Name a colour.", "completion": "blue 2", "images": []}
    for name, rows in (("corrupt", corrupt), ("text_only", text_only)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def desync_tree(model_dir, data_dir, out_dir, case: str, distributed=None) -> dict:
    return tree(model_dir, data_dir, out_dir, peft=LORA, data_file=f"{case}.jsonl", max_steps=2,
                micro_batch_size=2, global_batch_size=8, distributed=distributed)


@pytest.fixture(scope="module")
def desync(tiny_model_dir, color_data, tmp_path_factory) -> Launch:
    """2-rank FSDP2 and DDP LoRA runs (adapters in the vision tower, find_unused_parameters false) on both
    layouts of write_desync_data; a small timeout_s, so that ranks out of step fail in a minute, not hang."""

    def runs(root: Path) -> dict[str, dict]:
        return {f"{strategy}-{case}": desync_tree(tiny_model_dir, color_data, root / f"{strategy}-{case}", case,
                                                  {"strategy": strategy, "timeout_s": 60})
                for strategy in ("fsdp2", "ddp") for case in ("corrupt", "text_only")}

    return shared_launch(tmp_path_factory, "desync", runs, timeout=600)


def assert_finished_finite(out: Path) -> dict:
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows), rows  # null = NaN / inf
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_all_skipped_micro_batches_keep_ranks_in_step(strategy, desync):
    """Rank 0's step-1 micro-batches are all unreadable images; both ranks still run as many forwards."""
    summary = assert_finished_finite(desync.out(f"{strategy}-corrupt"))
    assert summary["skipped"] == {"unreadable_image": 4}


@pytest.fixture(scope="module")
def text_only_ref(tiny_model_dir, color_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-text_only")
    finetune(build_recipe(desync_tree(tiny_model_dir, color_data, out, "text_only")))
    return out


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_text_only_micro_batch_still_runs_the_vision_tower(strategy, desync, text_only_ref):
    """Rank 0's 2nd micro-batch has no image while rank 1's has: a filler row keeps the vision tower (its own
    FSDP2 unit; DDP buckets with vision adapters) in step on both ranks, and changes no loss."""
    out = desync.out(f"{strategy}-text_only")
    assert assert_finished_finite(out)["skipped"] == {}
    assert_same_losses(text_only_ref, out)
