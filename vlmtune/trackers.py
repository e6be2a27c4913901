"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, trackio), each through its own library.

Recipe section (``logging``)::

    logging:
      backends: [tensorboard, wandb, mlflow, trackio]   # any subset; metrics.jsonl is always written
      project: vlmtune            # W&B project, MLflow experiment, trackio project
      run_name: null              # null: the output_dir's folder name
      tags: []
      on_error: raise             # raise | warn (a warning, that backend dropped, training goes on)
      wandb_mode: offline         # offline (``wandb sync`` later) | online
      mlflow_tracking_uri: null   # null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db

Where each backend writes: TensorBoard event files in ``<output_dir>/tensorboard`` (``tensorboard --logdir``),
W&B in ``<output_dir>/wandb``, MLflow in the tracking URI above (``mlflow ui --backend-store-uri ...``), trackio
in its own local store (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; ``trackio show``).

Life of a run (rank 0 only; other ranks pass ``enabled=False`` and every call is a no-op)::

    trackers = Trackers(recipe.logging, output_dir)
    trackers.check()                                   # before the model loads: packages, servers
    trackers.start(flatten(recipe_dict), run_environment(device, world_size), resume=checkpoint_state.get("trackers"))
    trackers.log(step, {"loss": ..., "lr": ...})       # every step; validation / evaluation the same way
    checkpoint_state["trackers"] = trackers.state(step)  # at each checkpoint, with the checkpoint's step
    trackers.summary(summary_dict)
    trackers.close()

Resume: ``state()`` holds each backend's run id and the last step logged; a run started with it continues the
same tracker runs. The steps after that checkpoint which a crashed run had already sent are not sent twice:
TensorBoard purges them (``purge_step``) and takes the new values; W&B, MLflow and trackio cannot delete logged
points, so the first steps the tracker already holds are kept and logging continues after the last of them
(on CPU a resumed run repeats those steps bit for bit, see vlmtune/checkpoint.py).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vlmtune.config import LoggingConfig
from vlmtune.errors import VlmtuneError


class TrackerError(VlmtuneError, RuntimeError):
    """A tracker that cannot start or log: what, which backend, how to fix."""


# backend -> (module to import, pip package, vlmtune extra)
PACKAGES: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny", "mlflow"),
    "trackio": ("trackio", "trackio", "trackio"),
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-5}}`` -> ``{"train.lr": 1e-5}``; lists and scalars are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def run_environment(device: str, world_size: int) -> dict[str, Any]:
    """What a tracker records about where a run ran: package versions, Python, device and world size.

    Usage: ``trackers.start(flatten(recipe_dict), run_environment("cuda", world_size), resume)``.
    """
    import platform
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {"python": platform.python_version(), "device": device, "world_size": world_size}
    for package in ("vlmtune", "torch", "transformers", "peft", "accelerate", "flash-attn", "liger-kernel"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return env


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (a skipped NaN step has loss None; flags and text are dropped)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value) if isinstance(value, float) else value
    return out


def _import(name: str) -> Any:
    module, package, extra = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackerError(
            f"logging.backends has {name!r}, but its package is not installed ({e}): "
            f"pip install 'vlmtune[{extra}]' (or pip install {package}), or remove {name!r} from logging.backends"
        ) from e


def _reachable(url: str, what: str, fix: str, timeout_s: float = 5.0) -> None:
    """Any HTTP answer counts (even 401/404): the server is there. No answer is a clear error."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackerError(f"{what} at {url} is unreachable ({reason}); {fix}") from e


# ---------------------------------------------------------------- W&B transaction log (offline runs, resume)

_WANDB_BLOCK = 32768  # W&B's .wandb files use the LevelDB log layout: 32 KiB blocks, 7-byte record headers


def _wandb_payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log (no ':W&B' header)")
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + size]
        if len(payload) < size:  # a run that crashed mid-write: the last record is cut
            return
        pos += 7 + size
        if kind in (1, 2):  # full, first
            parts = [payload]
        elif kind in (3, 4):  # middle, last
            parts.append(payload)
        else:
            continue
        if kind in (1, 4):
            yield b"".join(parts)


def read_wandb_run(path: str | Path) -> dict[str, Any]:
    """What one W&B run file (``run-<id>.wandb``) holds: ``{"history": [{"_step": 1, "loss": ...}, ...],
    "config": {...}, "summary": {...}, "complete": bool}`` (config and summary: the last value written for each
    key; complete: the run's exit record is there; W&B's service process writes the file after ``run.finish()``
    returns, so a reader in the same process may have to wait for it).

    Usage: ``read_wandb_run(next(Path("runs/x/wandb").glob("offline-run-*/run-*.wandb")))["history"]``. The
    records are W&B's own protobuf messages (``wandb.proto.wandb_internal_pb2.Record``); a cut final record (a
    crashed run) is ignored.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    def key(item) -> str:
        return item.key or ".".join(item.nested_key)

    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "complete": False}
    for raw in _wandb_payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind in ("config", "summary"):
            out[kind].update({key(i): json.loads(i.value_json) for i in getattr(record, kind).update})
        elif kind == "exit":
            out["complete"] = True
        elif kind == "run":  # the run's opening record carries the config given to wandb.init
            out["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
    return out


# ---------------------------------------------------------------- backends


class _Backend:
    name = ""

    def __init__(self, cfg: LoggingConfig, output_dir: Path, run_name: str):
        self.cfg, self.output_dir, self.run_name = cfg, output_dir, run_name
        self.skip_through = -1  # steps <= this are already in the tracker (a resumed run): not sent again

    def check(self) -> None:
        _import(self.name)

    def start(self, config: dict[str, Any], env: dict[str, Any], resume: dict | None) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def summary(self, summary: dict[str, Any], step: int | None) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


def _markdown_table(values: Mapping[str, Any]) -> str:
    rows = [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in values.items()]
    return "| key | value |\n|---|---|\n" + "\n".join(rows)


class _TensorBoard(_Backend):
    """torch.utils.tensorboard.SummaryWriter (tensorboard's EventFileWriter); a resume purges later steps."""

    name = "tensorboard"

    def start(self, config, env, resume):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(resume["log_dir"]) if resume else str(self.output_dir / "tensorboard")
        # purge_step: TensorBoard drops the events at steps >= this from the earlier files of this log dir,
        # so the steps a crashed run logged after its checkpoint are replaced, not doubled.
        purge = resume["step"] + 1 if resume and resume.get("step") is not None else None
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge, flush_secs=10)
        if resume is None:
            self.writer.add_text("recipe", _markdown_table(config), 0)
            self.writer.add_text("env", _markdown_table(env), 0)
            if self.cfg.tags:
                self.writer.add_text("tags", ", ".join(self.cfg.tags), 0)

    def log(self, step, metrics):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, summary, step):
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```", step or 0)
        self.writer.flush()

    def state(self):
        return {"log_dir": self.log_dir}

    def close(self, failed):
        self.writer.close()


class _WandB(_Backend):
    """wandb.init in offline (default) or online mode; the run id is kept for resume."""

    name = "wandb"

    def check(self):
        wandb = _import(self.name)
        if self.cfg.wandb_mode == "online":
            url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            _reachable(url, "the W&B server", "check the network or WANDB_BASE_URL, or set "
                       "logging.wandb_mode=offline and run `wandb sync` later")
        return wandb

    def start(self, config, env, resume):
        import wandb

        self.dir = Path(resume["dir"]) if resume else self.output_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        run_id = resume["id"] if resume else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=resume.get("project", self.cfg.project) if resume else self.cfg.project,
            name=self.run_name, id=run_id, tags=self.cfg.tags or None, dir=str(self.dir),
            mode=self.cfg.wandb_mode, resume="allow" if resume else None,
            config={**config, **{f"env.{k}": v for k, v in env.items()}}, reinit="create_new",
        )
        if resume:
            # Online, W&B itself knows the run's last step; offline each process writes its own run folder,
            # so the steps already there are read back from this run's earlier files.
            logged = [row.get("_step", -1) for f in sorted(self.dir.glob(f"wandb/*-{run_id}/run-{run_id}.wandb"))
                      if f.parent != Path(self.run.dir).parent for row in self._history(f)]
            self.skip_through = max([*logged, self.run.starting_step - 1, -1])

    @staticmethod
    def _history(path: Path) -> list[dict]:
        try:
            return read_wandb_run(path)["history"]
        except Exception as e:  # an unreadable earlier segment only costs the dedup, never the run
            warnings.warn(f"wandb: could not read {path} ({e}); steps it holds may be logged twice", stacklevel=3)
            return []

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def summary(self, summary, step):
        self.run.summary.update(flatten(summary))

    def state(self):
        return {"id": self.run.id, "project": self.run.project, "dir": str(self.dir)}

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow(_Backend):
    """MlflowClient on a local SQLite store (MLflow's default; its ./mlruns file store is frozen) or a server."""

    name = "mlflow"

    def _uri(self) -> str:
        return (self.cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}")

    def check(self):
        mlflow = _import(self.name)
        uri = self._uri()
        if uri.startswith(("http://", "https://")):
            _reachable(uri.rstrip("/") + "/health", "the MLflow tracking server",
                       "start it, or fix logging.mlflow_tracking_uri / MLFLOW_TRACKING_URI "
                       "(null: a local SQLite store in output_dir)")
        elif uri.startswith("sqlite:"):
            try:
                importlib.import_module("sqlalchemy")
                importlib.import_module("alembic")
            except ImportError as e:
                raise TrackerError(f"mlflow: the tracking URI {uri} is an SQLite store, which needs sqlalchemy and "
                                   f"alembic ({e}): pip install 'vlmtune[mlflow]'") from e
        return mlflow

    def start(self, config, env, resume):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = resume["tracking_uri"] if resume else self._uri()
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        params = {**{k: _param(v) for k, v in config.items()}, **{f"env.{k}": _param(v) for k, v in env.items()}}
        if resume:
            self.run_id = resume["run_id"]
            run = self.client.get_run(self.run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            # A param cannot change in MLflow; a resumed recipe differs at least in `resume`: keep the first.
            params = {k: v for k, v in params.items() if k not in run.data.params}
            steps = [m.step for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)]
            self.skip_through = max(steps, default=-1)
        else:
            experiment = self.client.get_experiment_by_name(self.cfg.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.cfg.project)
            tags = {"mlflow.runName": self.run_name, **{t: "true" for t in self.cfg.tags}}
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def summary(self, summary, step):
        for key, value in flatten(summary).items():
            self.client.set_tag(self.run_id, f"summary.{key}", _param(value))

    def state(self):
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def close(self, failed):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's limit on a param value


class _Trackio(_Backend):
    """trackio.init in its local store ($TRACKIO_DIR); a resume continues the run by name."""

    name = "trackio"

    def start(self, config, env, resume):
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        project = resume["project"] if resume else self.cfg.project
        name = resume["name"] if resume else self.run_name
        self.run = trackio.init(project=project, name=name, config={**config, **{f"env.{k}": v for k, v in
                                env.items()}, "tags": list(self.cfg.tags)}, resume="must" if resume else "never",
                                embed=False, auto_log_cpu=False, auto_log_gpu=False)
        if resume:
            last = SQLiteStorage.get_last_step(project, run=name, run_id=self.run.id)
            self.skip_through = -1 if last is None else int(last)

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def summary(self, summary, step):
        scalars = _scalars(flatten(summary))
        if scalars:
            self.run.log({f"summary/{k}": v for k, v in scalars.items()}, step=step or 0)

    def state(self):
        return {"project": self.run.project, "name": self.run.name, "id": self.run.id}

    def close(self, failed):
        self.run.finish()


BACKENDS: dict[str, type[_Backend]] = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow,
                                       "trackio": _Trackio}


class Trackers:
    """Every backend of ``logging.backends`` behind one object; see the module docstring for the order of calls.

    ``check()``: import each backend's package and reach its server (missing package: the pip extra to install).
    ``start(config, env, resume)``: open the runs; ``config`` is the flattened recipe (``flatten``), ``env`` the
    versions, device and world size, ``resume`` what ``state()`` returned at the checkpoint resumed from.
    ``log(step, metrics)``: numbers only (None / NaN / inf and non-numbers are left out).
    ``summary(d)``: the final run summary. ``state()``: what to store in a checkpoint. ``close(failed=False)``.
    With ``on_error: warn`` a failing backend is dropped with a warning and the others go on.
    """

    def __init__(self, cfg: LoggingConfig, output_dir: str | Path, enabled: bool = True):
        self.cfg = cfg
        self.enabled = enabled and bool(cfg.backends)
        self.output_dir = Path(output_dir)
        run_name = cfg.run_name or self.output_dir.resolve().name
        self.backends = [BACKENDS[name](cfg, self.output_dir, run_name) for name in cfg.backends] if enabled else []
        self.last_step: int | None = None

    def _guard(self, backend: _Backend, action: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:
            message = str(e) if isinstance(e, TrackerError) else f"{backend.name}: {action} failed: {e}"
            if self.cfg.on_error == "raise":
                if isinstance(e, TrackerError):
                    raise
                raise TrackerError(message + " (logging.on_error=warn drops a failing tracker instead)") from e
            warnings.warn(f"{message}; logging.on_error=warn: {backend.name} is dropped, training goes on",
                          stacklevel=3)
            self.backends.remove(backend)

    def check(self) -> None:
        """Before the model loads: every backend's package imports and its server answers."""
        for backend in list(self.backends):
            self._guard(backend, "check", backend.check)

    def start(self, config: dict[str, Any], env: dict[str, Any], resume: dict | None = None) -> None:
        """Open (or, with ``resume`` = a ``state()``, continue) the run of every backend."""
        resume = resume or {}
        self.last_step = resume.get("step")
        for backend in list(self.backends):
            saved = resume.get(backend.name)
            saved = {**saved, "step": self.last_step} if saved is not None else None
            self._guard(backend, "start", backend.start, dict(config), dict(env), saved)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One step's numbers (training, validation or evaluation metrics), to every backend."""
        values = _scalars(metrics)
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        if not values:
            return
        for backend in list(self.backends):
            if step > backend.skip_through:
                self._guard(backend, "log", backend.log, step, values)

    def summary(self, summary: Mapping[str, Any]) -> None:
        """The end-of-run summary (summary.json's content)."""
        for backend in list(self.backends):
            self._guard(backend, "summary", backend.summary, dict(summary), self.last_step)

    def state(self, step: int | None = None) -> dict[str, Any]:
        """JSON-able run ids to store in a checkpoint; ``start(resume=...)`` takes it.

        ``step``: the checkpoint's step (default: the last step logged). A resumed run re-runs the steps after it,
        so TensorBoard drops what it holds after that step.
        """
        if not self.enabled:
            return {}
        out: dict[str, Any] = {"step": self.last_step if step is None else step}
        for backend in self.backends:
            out[backend.name] = backend.state()
        return out

    def close(self, failed: bool = False) -> None:
        """Finish every run (marked failed when ``failed``); the Trackers object is done after this."""
        for backend in list(self.backends):
            self._guard(backend, "close", backend.close, failed)
        self.backends = []
