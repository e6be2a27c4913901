"""Checkpoints: exact resume (full fine-tune and LoRA), atomic saves, SIGTERM, NaN steps, retention.

The runs use the tiny Qwen2.5-VL with attention dropout switched on (so the RNG streams matter) and a small
image + short-answer dataset, so a step costs a fraction of a second on CPU. "Identical" means bitwise:
every metrics.jsonl record (timings aside) compares equal with ``==`` and every saved tensor with
``torch.equal``. The full fine-tune and LoRA runs train everything / the adapter; the tests about saving
and signals freeze the language model (its 152k-row embedding dominates a full step on CPU) and train
the vision tower and projector, which still sit behind the dropout of the language model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vlmtune.checkpoint as ckpt_mod
import vlmtune.train as train_mod
from conftest import small_recipe
from vlmtune.checkpoint import (
    COMPLETE,
    CheckpointError,
    Checkpoints,
    StopSignals,
    preserve_rng,
    rng_state,
    truncate_metrics,
)
from vlmtune.config import build_recipe
from vlmtune.errors import TrainingError
from vlmtune.train import finetune

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """Each in-process run would re-parse the same tokenizer (1-2 s): load it once (tests/conftest.py)."""


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with attention dropout, so that a wrong RNG state after resume changes the losses."""
    out = tmp_path_factory.mktemp("tiny-dropout")
    for f in Path(tiny_model_dir).iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    config["text_config"]["attention_dropout"] = 0.2
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def color_data(tmp_path_factory):
    """12 train / 2 validation rows: a 56x56 single-colour image and a 1-2 word answer (few tokens per step)."""
    import PIL.Image

    root = tmp_path_factory.mktemp("color-data")
    names = list(COLORS)
    for split, n in (("train", 12), ("validation", 2)):
        rows = []
        for i in range(n):
            color = names[(i * 3 + (split == "validation")) % len(names)]
            image = f"{split}-{i}.png"
            PIL.Image.new("RGB", (56, 56), COLORS[color]).save(root / image)
            rows.append({"prompt": "Which colour is this?", "completion": f"{color} {i % 3}", "images": [image]})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def recipe_tree(model_dir, data_dir, out_dir, checkpoint=None, resume=None, peft=None, freeze_lm=False,
                **train) -> dict:
    train = {"max_steps": 8, "micro_batch_size": 2, "global_batch_size": 4, "val_every_steps": 3,
             "warmup_steps": 2, "lr": 2e-3, "max_length": 128, **train}
    tree = small_recipe(model_dir, data_dir, out_dir, **train)
    tree["data"] = {"train": {"source": str(data_dir / "train.jsonl"), "format": "messages"},
                    "validation": {"source": str(data_dir / "validation.jsonl"), "format": "messages"}}
    tree["checkpoint"] = checkpoint or {}
    tree["resume"] = resume
    if peft is not None:
        tree["peft"] = peft
    if freeze_lm:
        tree["freeze"] = {"language_model": True}
    return tree


def lines_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses_of(out: Path) -> list[tuple]:
    """Everything in metrics.jsonl that must not depend on interruptions (timings aside)."""
    return [tuple((k, v) for k, v in sorted(r.items()) if k != "tokens_per_s") for r in lines_of(out)]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted((out / "final").glob("*.safetensors"))
    assert files, f"no safetensors in {out / 'final'}"
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = losses_of(straight), losses_of(resumed)
    assert [dict(r).get("step") for r in a] == [dict(r).get("step") for r in b]
    assert a == b  # bitwise: floats compared with ==
    wa, wb = final_weights(straight), final_weights(resumed)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, resumed))
    for key in ("steps", "final_loss", "final_val_loss", "samples_seen", "skipped", "nonfinite_steps"):
        assert sa[key] == sb[key], key


class Killed(BaseException):
    """Stands in for the process dying: no ``except Exception`` (a failed save's clean-up) catches it."""


def die_at_step(monkeypatch, step: int) -> None:
    """Make the loop 'die' in the middle of optimizer step `step` (its first training forward)."""
    real = train_mod.loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch, *rest):
        if model.training:
            calls["n"] += 1
        if model.training and calls["n"] == (step - 1) * 2 + 1:  # 2 micro-batches per step
            raise Killed(f"killed during step {step}")
        return real(model, batch, *rest)

    monkeypatch.setattr(train_mod, "loss_sum", loss_sum)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, dropout_model_dir, color_data):
    """The uninterrupted 8-step full fine-tune every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    finetune(build_recipe(recipe_tree(dropout_model_dir, color_data, out)))
    return out


@pytest.fixture(scope="module")
def straight_vision(tmp_path_factory, dropout_model_dir, color_data):
    """The same with the language model frozen: the reference of the save / signal tests."""
    out = tmp_path_factory.mktemp("straight-vision")
    finetune(build_recipe(recipe_tree(dropout_model_dir, color_data, out, freeze_lm=True)))
    return out


def test_exact_resume_full_finetune(tmp_path, monkeypatch, straight, dropout_model_dir, color_data):
    """4 steps, checkpoint, 'killed' during step 6 (metrics of step 5 already written), resume=auto: identical."""
    out = tmp_path / "run"
    die_at_step(monkeypatch, 6)
    with pytest.raises(Killed):
        finetune(build_recipe(recipe_tree(dropout_model_dir, color_data, out, checkpoint={"every_steps": 4})))
    monkeypatch.undo()
    assert [r["step"] for r in lines_of(out) if "loss" in r] == [1, 2, 3, 4, 5]  # step 5 is past the checkpoint
    ck = out / "checkpoints" / "step-000004"
    assert sorted(p.name for p in ck.iterdir()) == sorted(
        [COMPLETE, "trainable.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "recipe.yaml"])
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data"] == {"epoch": 1, "offset": 4, "size": 12}  # 16 of 12 samples seen
    assert state["metrics"]["seen"] == 16
    saved = load_file(ck / "trainable.safetensors")
    assert len(saved) == state["trainable_tensors"] > 50  # every parameter of the full fine-tune

    finetune(build_recipe(recipe_tree(dropout_model_dir, color_data, out, checkpoint={"every_steps": 4},
                                      resume="auto")))
    assert_same_run(straight, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000008"]


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, straight_vision, dropout_model_dir,
                                                    color_data):
    """A save that dies half-way leaves a .tmp- folder; keep=1 still has the older checkpoint; auto skips it."""
    out = tmp_path / "run"
    real = ckpt_mod._write_torch
    calls = {"n": 0}

    def dying_write(path, obj):
        calls["n"] += 1
        if calls["n"] == 4:  # 2 torch files per save: the 2nd file of the 2nd save (step 4)
            raise Killed("killed while writing " + path.name)
        return real(path, obj)

    monkeypatch.setattr(ckpt_mod, "_write_torch", dying_write)
    tree = recipe_tree(dropout_model_dir, color_data, out, checkpoint={"every_steps": 2, "keep": 1}, freeze_lm=True)
    with pytest.raises(Killed):
        finetune(build_recipe(tree))
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000002", f"step-000004.tmp-{os.getpid()}"], names
    assert not (out / "checkpoints" / names[1] / COMPLETE).exists()

    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        finetune(build_recipe({**tree, "resume": str(out / "checkpoints" / names[1])}))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        finetune(build_recipe(tree))  # resume=null over existing checkpoints: refused, nothing touched
    finetune(build_recipe({**tree, "resume": "auto"}))
    assert_same_run(straight_vision, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000008"]  # keep=1, partial gone


def test_sigterm_in_a_separate_process_saves_and_resumes(tmp_path, straight_vision, dropout_model_dir, color_data):
    """`python -m vlmtune finetune` gets a real SIGTERM: it finishes the step, saves, exits 0; auto resumes."""
    out = tmp_path / "run"
    tree = recipe_tree(dropout_model_dir, color_data, out, freeze_lm=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune", "finetune", "-c", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any('"loss"' in x for x in metrics.read_text().splitlines()):
            break  # step 1 is done: the loop (and its signal handler) is running
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled:\n" + proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "got SIGTERM" in output and "resume=auto" in output, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["final_model"] is None
    stopped_at = summary["steps"]
    assert 1 <= stopped_at < 8, output  # the loop stopped early, at a step boundary
    assert Path(summary["checkpoint"]).name == f"step-{stopped_at:06d}"
    assert not (out / "final").exists()

    finetune(build_recipe({**tree, "resume": "auto"}))
    assert_same_run(straight_vision, out)


def test_signal_handler_saves_at_step_boundary_and_restores_handlers(tmp_path, monkeypatch, straight_vision,
                                                                     dropout_model_dir, color_data):
    """SIGINT mid-step (in-process): the step finishes, its validation is deferred to the resumed run."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real = train_mod.loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch, *rest):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 5:  # the first micro-batch of step 3, whose validation is due (val_every_steps=3)
                signal.raise_signal(signal.SIGINT)
        return real(model, batch, *rest)

    monkeypatch.setattr(train_mod, "loss_sum", loss_sum)
    out = tmp_path / "run"
    tree = recipe_tree(dropout_model_dir, color_data, out, freeze_lm=True)
    path = finetune(build_recipe(tree))
    monkeypatch.undo()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert path == out / "checkpoints" / "step-000003"
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["pending_validation"] is True
    assert [r["step"] for r in lines_of(out)] == [1, 2, 3]  # no val line yet: the resumed run writes it
    finetune(build_recipe({**tree, "resume": str(path)}))
    assert_same_run(straight_vision, out)


LORA = {"method": "lora", "r": 4, "dropout": 0.1, "modules_to_save": ["merger"]}


def test_exact_resume_lora(tmp_path, monkeypatch, dropout_model_dir, color_data):
    """The same for LoRA (adapter + a module trained in full): only the trainable tensors are in the checkpoint."""
    straight_out, out = tmp_path / "straight", tmp_path / "run"
    finetune(build_recipe(recipe_tree(dropout_model_dir, color_data, straight_out, peft=LORA)))
    die_at_step(monkeypatch, 5)
    tree = recipe_tree(dropout_model_dir, color_data, out, peft=LORA, checkpoint={"every_steps": 4})
    with pytest.raises(Killed):
        finetune(build_recipe(tree))
    monkeypatch.undo()
    saved = load_file(out / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert saved and all(k.startswith("base_model.model.") for k in saved)
    assert all(".lora_" in k or ".modules_to_save." in k for k in saved), sorted(saved)[:5]
    assert any(".modules_to_save." in k for k in saved)
    finetune(build_recipe({**tree, "resume": "auto"}))
    assert_same_run(straight_out, out)


def test_nonfinite_steps_are_skipped_counted_and_abort(tmp_path, monkeypatch, dropout_model_dir, color_data):
    """NaN on steps 2, 4, 5 with max_bad_steps=2: 2 is skipped and counted; 4+5 in a row stop the run."""
    real = train_mod.loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch, *rest):
        if not model.training:
            return real(model, batch, *rest)
        calls["n"] += 1
        step = (calls["n"] + 1) // 2
        loss = real(model, batch, *rest)
        return loss * float("nan") if step in (2, 4, 5) else loss

    monkeypatch.setattr(train_mod, "loss_sum", loss_sum)
    out = tmp_path / "run"
    tree = recipe_tree(dropout_model_dir, color_data, out, max_bad_steps=2, val_every_steps=None, warmup_steps=0,
                       freeze_lm=True)
    with pytest.raises(TrainingError, match=r"2 optimizer steps in a row \(steps 4-5\).*max_bad_steps=2"):
        finetune(build_recipe(tree))
    steps = lines_of(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r.get("skipped_nonfinite", False) for r in steps] == [False, True, False, True, True]
    assert [r.get("nonfinite_steps") for r in steps] == [None, 1, None, 2, 3]
    # A skipped step moves neither the optimizer nor the LR schedule: step 3 runs at step 2's learning rate.
    assert steps[2]["lr"] == steps[1]["lr"] != steps[0]["lr"]
    assert all(r["loss"] == r["loss"] for r in steps if not r.get("skipped_nonfinite"))  # finite ones stay
    assert all(r["loss"] is None for r in steps if r.get("skipped_nonfinite"))  # strict JSON: NaN -> null


def test_keep_retention_and_partial_cleanup(tmp_path):
    """keep=K leaves the newest K complete checkpoints; partial folders are never loaded and are removed."""
    d = tmp_path / "checkpoints"
    for step in (1, 2, 3, 10):
        (d / f"step-{step:06d}").mkdir(parents=True)
        (d / f"step-{step:06d}" / COMPLETE).write_text("ok")
    (d / "step-000011.tmp-123").mkdir()  # a save that died
    (d / "step-000012").mkdir()  # no COMPLETE marker: not a checkpoint (and not ours to delete)
    c = Checkpoints(d, keep=2)
    assert [p.name for p in c.complete()] == ["step-000001", "step-000002", "step-000003", "step-000010"]
    assert c.find("auto") == d / "step-000010"  # numeric order, not the partial 11 or the unmarked 12
    assert not (d / "step-000011.tmp-123").exists()
    c.prune()
    assert sorted(p.name for p in d.iterdir()) == ["step-000003", "step-000010", "step-000012"]
    Checkpoints(d, keep=1).prune()
    assert [p.name for p in c.complete()] == ["step-000010"]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        c.find(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        c.find(str(d / "step-000012"))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        c.find(None)
    assert Checkpoints(tmp_path / "empty").find("auto") is None
    assert Checkpoints(tmp_path / "empty").find(None) is None


def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 2, "val_loss": 0.7},
             {"step": 3, "loss": 0.4}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
    assert truncate_metrics(path, 0) == 3 and path.read_text() == ""


def test_rng_helpers_round_trip():
    import random

    import numpy as np

    before = rng_state()
    with preserve_rng():
        random.random(), np.random.rand(), torch.rand(3)
    after = rng_state()
    assert before["python"] == after["python"] and torch.equal(before["torch"], after["torch"])
    assert torch.equal(before["numpy"]["keys"], after["numpy"]["keys"])


def test_stop_signals_only_in_main_thread():
    import threading

    seen = {}

    def worker():
        with StopSignals() as stop:
            seen["installed"] = bool(stop._previous)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"installed": False}


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_resume_errors_are_user_errors_in_the_cli(tmp_path, capsys):
    """A bad resume path fails before any model is loaded, as a one-line error with exit code 2."""
    from vlmtune.cli import main

    tree = recipe_tree(tmp_path / "no-model", tmp_path, tmp_path / "run", resume=str(tmp_path / "missing"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert main(["finetune", "-c", str(recipe)]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


def test_recipe_changes_ignore_bookkeeping(tmp_path):
    from vlmtune.checkpoint import recipe_changes
    from vlmtune.config import recipe_to_yaml

    tree = recipe_tree(tmp_path / "m", tmp_path, tmp_path / "run")
    saved = recipe_to_yaml(build_recipe(tree))
    later = {**tree, "resume": "auto", "checkpoint": {"every_steps": 5}, "output_dir": str(tmp_path / "moved")}
    assert recipe_changes(saved, build_recipe(later)) == []
    later["train"] = {**tree["train"], "lr": 1e-4}
    assert recipe_changes(saved, build_recipe(later)) == ["train.lr: 0.002 -> 0.0001"]
