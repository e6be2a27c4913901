"""What a training run leaves for people to watch and show: trackers fed by the loop (resumed runs included), the
live progress line in a terminal, and the run report written at the end (the report itself: test_report.py; each
tracker read back on its own: test_trackers.py)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import yaml

from conftest import small_recipe
from vlmtune.cli import main
from vlmtune.config import build_recipe
from vlmtune.train import finetune


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """The tiny model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


def tree(tiny_model_dir, cord_dir, out, max_steps: int = 4, **over) -> dict:
    t = small_recipe(tiny_model_dir, cord_dir, out, max_steps=max_steps, val_every_steps=2)
    t["freeze"] = {"language_model": True}  # fast steps
    t.update(over)
    return t


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_loop_feeds_tensorboard_and_a_resumed_run_continues_it(tiny_model_dir, cord_dir, tmp_path,
                                                                     monkeypatch):
    """Every step's loss, the validation loss and the evaluation reach TensorBoard (its own reader); a run killed
    after step 3 and resumed from its step-2 checkpoint leaves steps 1..4 once each, with metrics.jsonl's values."""
    import vlmtune.train as train_mod

    out = tmp_path / "run"
    t = tree(tiny_model_dir, cord_dir, out, logging={"backends": ["tensorboard"]},
             checkpoint={"every_steps": 2}, eval={"every_steps": 2, "max_samples": 2, "max_new_tokens": 3})
    real = train_mod.train_step

    def dies_in_step_4(state, engine, plan, batches):
        if state.run.step == 3:
            raise KeyboardInterrupt("killed")
        return real(state, engine, plan, batches)

    monkeypatch.setattr(train_mod, "train_step", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(build_recipe(t))
    monkeypatch.undo()
    finetune(build_recipe({**t, "resume": "auto"}))
    scalars = tensorboard_scalars(out / "tensorboard")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in lines if "loss" in r]
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["val_loss"]] == [2, 4]
    assert [s for s, _ in scalars["eval/cord_ted"]] == [2, 4]


def test_a_missing_tracker_package_stops_before_the_model_loads(tiny_model_dir, cord_dir, tmp_path, monkeypatch,
                                                                  capsys):
    import vlmtune.train as train_mod

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setattr(train_mod, "build_model", lambda *a: pytest.fail("the model loaded first"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree(tiny_model_dir, cord_dir, tmp_path / "out",
                                          logging={"backends": ["wandb"]})))
    assert main(["finetune", "-c", str(recipe)]) == 2
    assert "pip install 'vlmtune[wandb]'" in capsys.readouterr().err


def test_every_run_writes_its_report(tiny_model_dir, cord_dir, tmp_path):
    out = tmp_path / "run"
    finetune(build_recipe(tree(tiny_model_dir, cord_dir, out, max_steps=2)))
    page = (out / "report.html").read_text()
    samples = [json.loads(x) for x in (out / "label_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(any(trained for _, trained in s["runs"]) for s in samples)
    assert samples[0]["images"][0]["thumbnail"].startswith("data:image/png;base64,")
    assert page.count('<article class="sample">') == 3 and '<mark class="trained">' in page
    assert main(["report", str(out), "--out", str(tmp_path / "again.html"), "--png"]) == 0
    assert (tmp_path / "again.html").is_file() and list(tmp_path.glob("again-*.png"))


def test_progress_line_in_a_terminal(tmp_path):
    """In a terminal: one live line with step / total, ETA, loss, lr, tokens/s and the samples skipped so far."""
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200"}
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # a 200-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "vlmtune", "finetune", f"output_dir={out}", "train.max_steps=2",
                             "eval.every_steps=null", "eval.max_samples=1", "eval.max_new_tokens=1"],
                            stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env, close_fds=True)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(main_fd)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen[-3000:]
    assert "2/2 [" in screen and "loss=" in screen and "tok_s=" in screen and "skipped=0" in screen
    assert "<00:00" in screen or "?it/s" in screen or "s/it" in screen  # tqdm's ETA / rate field
