"""Trackers, each read back through its own library: TensorBoard's event reader, MLflow's client, W&B's run files
(offline), trackio's local store; a resumed run continues the same tracker runs with every step exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from vlmtune.trackers import LoggingConfig, TrackerError, Trackers, flatten, read_wandb_run, run_environment

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"output_dir": "runs/x", "model": {"name_or_path": "tiny"}, "train": {"lr": 1e-4, "max_steps": 6},
          "peft": {"target_modules": ["q_proj", "v_proj"]}, "resume": None}
ENV = {"torch": "2.14.1", "transformers": "5.24.0", "device": "cpu", "world_size": 1}
NAN_STEP = 3


def step_metrics(step: int, offset: float = 0.0) -> dict:
    """What the loop logs for one step (a NaN step: loss None and a flag, as metrics.jsonl has it)."""
    nan = step == NAN_STEP
    return {"loss": None if nan else 10.0 - step + offset, "lr": 1e-4, "grad_norm": float("nan") if nan else 1.5,
            "tokens_per_s": 1000.0 + step, "epoch": step / 6, "skipped_nonfinite": nan}


def run_six_steps(trackers: Trackers) -> dict[str, dict[int, float]]:
    """Steps 1-6 (step 3 non-finite), validation at 4 and 6, an evaluation at 6, the summary; returns what a
    tracker should hold: {key: {step: value}}."""
    trackers.start(flatten(RECIPE), ENV)
    expected: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}, "eval/cer": {}}
    for step in range(1, 7):
        metrics = step_metrics(step)
        trackers.log(step, metrics)
        if metrics["loss"] is not None:
            expected["loss"][step] = metrics["loss"]
        if step in (4, 6):
            trackers.log(step, {"val_loss": 9.5 - step})
            expected["val_loss"][step] = 9.5 - step
    trackers.log(6, {"eval/cer": 0.25})
    expected["eval/cer"][6] = 0.25
    trackers.summary({"steps": 6, "final_loss": 4.0, "skipped": {"too_long": 2}, "final_model": "runs/x/final"})
    trackers.close()
    return expected


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    # W&B keeps settings and caches in the home folder: a test's own, and never online.
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    expected = run_six_steps(Trackers(LoggingConfig(backends=["tensorboard"]), out))
    scalars = tensorboard_scalars(out / "tensorboard")
    for key, values in expected.items():
        assert [s for s, _ in scalars[key]] == sorted(values)  # every step once, NaN step absent
        assert [v for _, v in scalars[key]] == pytest.approx([values[s] for s in sorted(values)])
    assert "skipped_nonfinite" not in scalars
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    text = {tag.split("/")[0]: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert "train.lr" in text["recipe"] and "world_size" in text["env"] and '"final_loss": 4.0' in text["summary"]


def test_mlflow_local_store(tmp_path, wandb_env):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    cfg = LoggingConfig(backends=["mlflow"], project="receipts", run_name="first", tags=["smoke"])
    trackers = Trackers(cfg, out)
    trackers.check()
    expected = run_six_steps(trackers)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("receipts").experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    for key, values in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(s, pytest.approx(values[s])) for s in sorted(values)]
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["env.world_size"] == "1"
    assert json.loads(run.data.params["peft.target_modules"]) == ["q_proj", "v_proj"]
    assert run.data.tags["smoke"] == "true" and run.data.tags["summary.final_loss"] == "4.0"
    assert run.data.tags["summary.skipped.too_long"] == "2"


def wandb_runs(out: Path, count: int) -> list[dict]:
    """The ``count`` W&B run files under ``out``, oldest first, read once complete: W&B's service process writes
    them after ``run.finish()`` has returned."""
    deadline = time.monotonic() + 60
    while True:
        files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
        runs = [{"path": f, **read_wandb_run(f)} for f in files]
        if len(runs) == count and all(r["complete"] for r in runs):
            return runs
        assert time.monotonic() < deadline, f"W&B wrote {[(r['path'], r['complete']) for r in runs]}"
        time.sleep(0.2)


def test_wandb_offline_files(tmp_path, wandb_env):
    out = tmp_path / "run"
    cfg = LoggingConfig(backends=["wandb"], project="receipts", run_name="first", tags=["smoke"])
    trackers = Trackers(cfg, out)
    trackers.check()
    expected = run_six_steps(trackers)
    (logged,) = wandb_runs(out, 1)
    for key, values in expected.items():
        rows = [(row["_step"], row[key]) for row in logged["history"] if key in row]
        assert rows == [(s, pytest.approx(values[s])) for s in sorted(values)]
    assert logged["config"]["train.lr"] == 1e-4 and logged["config"]["env.device"] == "cpu"
    assert logged["summary"]["final_loss"] == 4.0 and logged["summary"]["skipped.too_long"] == 2


TRACKIO_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from tests.test_trackers import RECIPE, ENV, run_six_steps, step_metrics
    from vlmtune.trackers import LoggingConfig, Trackers, flatten
    from trackio.sqlite_storage import SQLiteStorage

    cfg = LoggingConfig(backends=["trackio"], project="receipts", run_name="first")
    expected = run_six_steps(Trackers(cfg, sys.argv[2]))
    logs = SQLiteStorage.get_logs("receipts", run="first")
    config = SQLiteStorage.get_run_config("receipts", "first")
    # resume: a checkpoint at step 3 of a second run that then crashed after step 5
    t = Trackers(LoggingConfig(backends=["trackio"], project="receipts", run_name="second"), sys.argv[2])
    t.start(flatten(RECIPE), ENV)
    for step in range(1, 6):
        t.log(step, step_metrics(step))
        if step == 3:
            state = json.loads(json.dumps(t.state()))
    t.close(failed=True)
    t = Trackers(LoggingConfig(backends=["trackio"], project="receipts", run_name="second"), sys.argv[2])
    t.start(flatten(RECIPE), ENV, resume=state)
    for step in range(4, 9):
        t.log(step, step_metrics(step, offset=100.0))
    t.close()
    resumed = SQLiteStorage.get_logs("receipts", run="second")
    runs = [r["name"] for r in SQLiteStorage.get_run_records("receipts")]
    print("RESULT" + json.dumps({"expected": expected, "logs": logs, "config": config, "state": state,
                                 "resumed": resumed, "runs": runs}, default=str))
""")


def test_trackio_local_store_and_resume(tmp_path):
    # trackio reads TRACKIO_DIR once, when imported: a process of its own with its own store.
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(ROOT), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    for key, values in result["expected"].items():
        rows = [(row["step"], row[key]) for row in result["logs"] if row.get(key) is not None]
        assert rows == [(int(s), pytest.approx(v)) for s, v in sorted(values.items(), key=lambda kv: int(kv[0]))]
    assert result["config"]["train.lr"] == 1e-4 and result["config"]["env.world_size"] == 1
    assert sorted(result["runs"]) == ["first", "second"]  # the resumed run is the same run, not a third
    steps = [row["step"] for row in result["resumed"] if row.get("lr") is not None]
    assert steps == list(range(1, 9))  # each step once: 4 and 5 are not sent again after the resume
    assert (tmp_path / "trackio" / "receipts.db").is_file()


def test_resume_continues_the_same_runs(tmp_path, wandb_env):
    """Checkpoint at step 3, crash after step 5, resume from the checkpoint and run to step 8: each tracker has
    every step once, in the same run. TensorBoard replaces 4-5 with the new values (purge_step); W&B and MLflow
    cannot delete points, so they keep the 4-5 they had and take the new values from step 6 on."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    cfg = LoggingConfig(backends=["tensorboard", "wandb", "mlflow"], project="receipts", run_name="r")
    first = Trackers(cfg, out)
    first.check()
    first.start(flatten(RECIPE), ENV)
    for step in range(1, 6):
        first.log(step, step_metrics(step))
        if step == 3:
            state = json.loads(json.dumps(first.state(step)))  # what the checkpoint stores
    first.close(failed=True)
    wandb_runs(out, 1)  # a resume is a new process, started after W&B's service wrote out the crashed run

    second = Trackers(cfg, out)
    second.check()
    second.start(flatten({**RECIPE, "resume": "auto"}), ENV, resume=state)
    for step in range(4, 9):
        second.log(step, step_metrics(step, offset=100.0))
    assert {k: v for k, v in second.state().items() if k != "step"} == {k: v for k, v in state.items()
                                                                        if k != "step"}
    second.close()

    def loss(step: int, segment: int) -> float:
        return step_metrics(step, offset=100.0 if segment == 2 else 0.0)["loss"]

    kept = {s: loss(s, 1) for s in (1, 2, 4, 5)} | {s: loss(s, 2) for s in (6, 7, 8)}
    replaced = {s: loss(s, 1) for s in (1, 2)} | {s: loss(s, 2) for s in (4, 5, 6, 7, 8)}
    # TensorBoard, by its own reader
    assert tensorboard_scalars(out / "tensorboard")["loss"] == [(s, pytest.approx(v)) for s, v in replaced.items()]
    assert [s for s, _ in tensorboard_scalars(out / "tensorboard")["lr"]] == list(range(1, 9))
    # MLflow: one run, continued
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("receipts").experiment_id])
    assert run.info.run_id == state["mlflow"]["run_id"] and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(s, pytest.approx(v)) for s, v in kept.items()]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == list(range(1, 9))
    assert run.data.params["resume"] == "null"  # a param keeps its first value (MLflow refuses a change)
    # W&B: two offline folders of the same run id, which `wandb sync` uploads in order; together, every step once
    segments = wandb_runs(out, 2)
    assert [s["path"].name for s in segments] == [f"run-{state['wandb']['id']}.wandb"] * 2
    rows = [row for s in segments for row in s["history"]]
    assert [row["_step"] for row in rows] == list(range(1, 9))
    assert {row["_step"]: row["loss"] for row in rows if "loss" in row} == pytest.approx(kept)


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    trackers = Trackers(LoggingConfig(backends=["tensorboard", "wandb"]), tmp_path / "run")
    with pytest.raises(TrackerError, match=r"pip install 'vlmtune\[wandb\]'"):
        trackers.check()

    lenient = Trackers(LoggingConfig(backends=["tensorboard", "wandb"], on_error="warn"), tmp_path / "run")
    with pytest.warns(UserWarning, match=r"wandb.*not installed.*dropped"):
        lenient.check()
    assert [b.name for b in lenient.backends] == ["tensorboard"]
    lenient.start(flatten(RECIPE), ENV)
    lenient.log(1, {"loss": 2.0})
    lenient.close()
    assert tensorboard_scalars(tmp_path / "run" / "tensorboard")["loss"] == [(1, 2.0)]


def test_unreachable_server_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a local port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = LoggingConfig(backends=["mlflow"], mlflow_tracking_uri=f"http://127.0.0.1:{port}")
    with pytest.raises(TrackerError, match=rf"MLflow tracking server at http://127.0.0.1:{port}/health is unreachable"):
        Trackers(cfg, tmp_path).check()
    lenient = Trackers(cfg.model_copy(update={"on_error": "warn"}), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lenient.check()
    assert lenient.backends == [] and "unreachable" in str(caught[0].message)


def test_other_ranks_do_nothing(tmp_path):
    trackers = Trackers(LoggingConfig(backends=["tensorboard", "mlflow"]), tmp_path / "run", enabled=False)
    trackers.check()
    trackers.start(flatten(RECIPE), ENV)
    trackers.log(1, {"loss": 1.0})
    trackers.summary({"steps": 1})
    assert trackers.state() == {}
    trackers.close()
    assert not (tmp_path / "run").exists()


def test_run_environment():
    import torch

    env = run_environment("cpu", 2)
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["world_size"] == 2 and env["device"] == "cpu" and env["python"].count(".") == 2


def test_logging_config():
    assert LoggingConfig(backends="wandb").backends == ["wandb"]
    with pytest.raises(ValueError, match="more than once"):
        LoggingConfig(backends=["wandb", "mlflow", "wandb"])
    with pytest.raises(ValueError, match="tensorboard"):
        LoggingConfig(backends=["tensorbord"])
    with pytest.raises(ValueError, match="extra"):
        LoggingConfig(backend=["wandb"])
