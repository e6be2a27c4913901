"""Checkpoints that resume exactly, written atomically; graceful stop on SIGTERM / SIGINT.

Recipe keys
-----------
``checkpoint.every_steps`` (int or null, default null)
    Save ``output_dir/checkpoints/step-NNNNNN/`` every N optimizer steps. A checkpoint is also saved when
    the run is stopped by SIGTERM or SIGINT, whatever this says.
``checkpoint.keep`` (int >= 1, default 2)
    Keep the newest K complete checkpoints; older ones are deleted only once a newer one is complete.
``resume`` (``null`` | ``auto`` | PATH, default null)
    ``null``: start fresh (refused when output_dir already holds complete checkpoints, so a run is never
    silently restarted over its own checkpoints). ``auto``: continue from the newest complete checkpoint in
    ``output_dir/checkpoints`` (partial ones are ignored and removed); start fresh, saying so, when there is
    none. PATH: continue from that checkpoint folder (an error if it is missing or incomplete); checkpoints
    of this output_dir newer than it are deleted, as they belong to the run being rewound.
``train.max_bad_steps`` (int >= 1, default 5)
    An optimizer step whose loss or gradient norm is NaN/inf is skipped (no optimizer or LR-scheduler step,
    gradients dropped) and marked ``"skipped_nonfinite": true`` in metrics.jsonl with the running count
    ``nonfinite_steps``; this many skipped steps in a row stop the run with an error.

SIGTERM / SIGINT: the loop finishes the current optimizer step, saves a checkpoint (a validation due at that
step is left to the resumed run), writes summary.json with ``stopped_by``, prints how to resume and returns
normally (the CLI exits 0). A second Ctrl-C aborts at once, without saving. A fresh run (nothing resumed)
starts metrics.jsonl empty.

What a checkpoint folder holds
------------------------------
``trainable.safetensors``   every parameter with ``requires_grad``, by its ``named_parameters()`` name: the
                            whole model for a full fine-tune, only the adapter for LoRA (names then start with
                            ``base_model.model.``). Frozen weights come back from ``model.name_or_path``.
``optimizer.pt``            ``{"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}``
``rng.pt``                  the states of Python ``random``, NumPy, torch CPU and (when in use) every CUDA device
``trainer_state.json``      the step, the data position (EpochSampler ``epoch`` + ``offset``: the next unseen
                            sample), the Metrics skip counters, the non-finite step counters, the last train and
                            validation losses, and whether that step's validation is still to run
``recipe.yaml``             the recipe of the run that wrote it
``COMPLETE``                written last: a folder without it is partial and is never loaded

It is written under ``step-NNNNNN.tmp-<pid>``, every file fsynced, then renamed into place with
``os.replace``, so a crash mid-save leaves the previous checkpoints untouched and only a ``.tmp-`` folder.
On resume, ``metrics.jsonl`` loses the lines of steps after the checkpoint, so it reads as one clean run.

Resuming reproduces the uninterrupted run bit for bit on CPU: the checkpoint is taken at an optimizer-step
boundary, where the sampler position is exact; validation runs with the training RNG state saved and
restored around it; and each DataLoader has its own generator, so starting one mid-epoch on resume does not
shift the global (dropout) RNG stream. Not saved: buffers (a model whose buffers change while training,
e.g. BatchNorm statistics, would get them back from ``model.name_or_path``). A multi-process run writes a
sharded checkpoint instead (torch.distributed.checkpoint, every rank; see vlmtune/parallel.py and
docs/distributed.md), which resumes on any number of ranks, one included.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from vlmtune.config import Recipe, recipe_to_yaml

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
RECIPE = "recipe.yaml"
_NAME = re.compile(r"step-(\d+)")
_PARTIAL = re.compile(r"step-\d+\.tmp-\d+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, or a resume setting that cannot be honoured."""


@dataclass
class RunState:
    """What the loop carries from step to step besides model, optimizer, scheduler, sampler and Metrics."""

    step: int = 0
    last_loss: float = math.nan
    last_val: float | None = None
    nonfinite_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient norm, in all
    bad_in_row: int = 0  # ... and in a row, up to now
    pending_validation: bool = False  # stopped by a signal before the validation due at `step`


# ---------------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    """Every generator the loop may draw from, as plain lists and tensors (loadable with weights_only)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(), "cuda": list(cuda)}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            print(f"vlmtune: warning: the checkpoint has CUDA RNG states for {len(state['cuda'])} device(s), "
                  f"this machine has {torch.cuda.device_count()}; CUDA random streams are not restored",
                  file=sys.stderr, flush=True)
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block (validation) without moving any training RNG stream."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# ---------------------------------------------------------------------------------------------------------
# Durable writes. Each file is fsynced before the folder is renamed into place.


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_trainable(path: Path, model: torch.nn.Module) -> int:
    from safetensors.torch import save_file

    tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path), metadata={"format": "pt", "vlmtune": "trainable parameters"})
    _fsync_path(path)
    return len(tensors)


def _complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def _step_of(path: Path) -> int | None:
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl


def truncate_metrics(path: Path, step: int) -> int:
    """Drop every line of a step after `step` (and any torn last line); returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        _write_text(tmp, "".join(x + "\n" for x in kept))
        os.replace(tmp, path)
    return dropped


# ---------------------------------------------------------------------------------------------------------
# The checkpoint folder of a run


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


# Recipe keys that may change between a run and its resumption without changing what is trained.
_BOOKKEEPING = ("resume", "output_dir", "checkpoint.", "train.log_every_steps", "train.max_bad_steps",
                "train.check_gradients", "data.num_workers", "distributed.")


def recipe_changes(saved_yaml: str, recipe: Recipe) -> list[str]:
    """``key: old -> new`` for every recipe value that differs from the checkpoint's (bookkeeping keys aside)."""
    old = _flat(yaml.safe_load(saved_yaml) or {})
    new = _flat(recipe.model_dump(mode="json"))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if not k.startswith(_BOOKKEEPING) and old.get(k) != new.get(k)]


@dataclass
class Checkpoints:
    """``output_dir/checkpoints``: find one to resume from, save, load, and keep the newest ``keep``."""

    directory: Path
    keep: int = 2
    writer: bool = True  # only the writing rank touches the folder

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _step_of(p) is not None and _complete(p)]
        return sorted(found, key=_step_of)

    def partial(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.is_dir() and _PARTIAL.fullmatch(p.name))

    def remove_partial(self) -> None:
        if not self.writer:
            return
        for p in self.partial():
            print(f"vlmtune: removing the incomplete checkpoint {p} (a save that did not finish)", flush=True)
            shutil.rmtree(p, ignore_errors=True)

    def find(self, resume: str | None) -> Path | None:
        """The checkpoint that `resume` names, or None to start fresh. Raises CheckpointError."""
        if resume is None:
            existing = self.complete()
            if existing:
                raise CheckpointError(
                    f"output_dir already holds checkpoints (newest: {existing[-1]}); set resume=auto to continue "
                    f"that run, or choose another output_dir (or delete {self.directory}) to start over")
            self.remove_partial()
            return None
        if resume == "auto":
            self.remove_partial()
            existing = self.complete()
            if not existing:
                print(f"vlmtune: resume=auto: no complete checkpoint in {self.directory}; starting fresh",
                      flush=True)
                return None
            return existing[-1]
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"resume={resume!r}: no such checkpoint folder; use resume=auto or the path of "
                                  f"a folder like {self.directory / 'step-000100'}")
        if not _complete(path):
            hint = ""
            if (path / "checkpoints").is_dir():
                hint = "; it looks like a run's output_dir: name one of its checkpoints/step-* folders"
            raise CheckpointError(f"resume={resume!r} is not a complete checkpoint (it has no {COMPLETE} marker, "
                                  f"so its save did not finish){hint}; use an older checkpoint or resume=auto")
        self.remove_partial()
        return path

    def save(self, recipe: Recipe, run: RunState, model, optimizer, scheduler, sampler, metrics) -> Path:
        """Write the checkpoint of step `run.step` atomically, then apply ``keep``. Returns its folder."""
        if torch.distributed.is_initialized():
            from vlmtune.parallel import save_sharded, sharded_weights

            # Every rank writes its shards (torch.distributed.checkpoint); FSDP2 on one GPU holds DTensors too.
            if torch.distributed.get_world_size() > 1 or sharded_weights(model):
                return save_sharded(self, recipe, run, model, optimizer, scheduler, sampler, metrics)
        final = self.directory / f"step-{run.step:06d}"
        if not self.writer:
            return final
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        n = _write_trainable(tmp / TRAINABLE, model)
        _write_torch(tmp / OPTIMIZER, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        _write_torch(tmp / RNG, rng_state())
        state = {"format": FORMAT_VERSION, **asdict(run), "trainable_tensors": n,
                 "data": {"epoch": sampler.epoch, "offset": sampler.offset},
                 "metrics": {"seen": metrics.seen, "skipped": dict(metrics.skipped),
                             "examples": dict(metrics.examples)}}
        _write_text(tmp / STATE, json.dumps(state, indent=2) + "\n")
        _write_text(tmp / RECIPE, recipe_to_yaml(recipe))
        _write_text(tmp / COMPLETE, f"step {run.step}\n")
        _fsync_path(tmp)
        old = None
        if final.exists():  # e.g. the same step saved by an earlier attempt: move it aside, then replace
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest ``keep`` complete checkpoints."""
        if not self.writer:
            return
        for p in self.complete()[: -self.keep]:
            shutil.rmtree(p, ignore_errors=True)

    def drop_newer(self, step: int) -> None:
        """Delete this run's checkpoints after `step`: after a rewind they describe a future that is gone."""
        if not self.writer:
            return
        for p in self.complete():
            if _step_of(p) > step:
                print(f"vlmtune: removing {p}: it is newer than the checkpoint this run resumes from", flush=True)
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, recipe: Recipe, model, optimizer, scheduler, sampler, metrics) -> RunState:
        """Restore everything from `path` into the freshly built objects; sets the RNG states last."""
        state = read_state(path)
        if state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r} is not supported by this "
                                  f"vlmtune (it reads format {FORMAT_VERSION})")
        if (path / RECIPE).is_file():
            changes = recipe_changes((path / RECIPE).read_text(), recipe)
            if changes:
                print("vlmtune: note: the recipe differs from the one that wrote the checkpoint; continuing with "
                      "the new values:\n    " + "\n    ".join(changes), flush=True)
        if state.get("sharded"):  # written by several ranks (vlmtune/parallel.py); loads on any number of ranks
            from vlmtune.parallel import load_sharded

            rng = load_sharded(path, state, model, optimizer, scheduler, sampler)
        else:
            load_trainable(path / TRAINABLE, model)
            opt = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
            try:
                optimizer.load_state_dict(opt["optimizer"])
            except ValueError as e:
                raise CheckpointError(f"{path / OPTIMIZER}: does not fit this run's optimizer ({e}); was the "
                                      "checkpoint written with another freeze/peft setting?") from e
            scheduler.load_state_dict(opt["scheduler"])
            sampler.epoch, sampler.offset = state["data"]["epoch"], state["data"]["offset"]
            rng = torch.load(path / RNG, map_location="cpu", weights_only=True)
        m = state["metrics"]
        metrics.seen, metrics.skipped, metrics.examples = m["seen"], Counter(m["skipped"]), dict(m["examples"])
        run = RunState(**{k: state[k] for k in RunState.__dataclass_fields__})
        set_rng_state(rng)
        if self.writer:
            dropped = truncate_metrics(metrics.path, run.step)
            if dropped:
                print(f"vlmtune: dropped {dropped} line(s) after step {run.step} from {metrics.path}", flush=True)
        self.drop_newer(run.step)
        print(f"vlmtune: resumed from {path} (step {run.step}, epoch {sampler.epoch}, sample {sampler.offset} of "
              "that epoch)", flush=True)
        return run


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {STATE} ({e})") from e


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Copy the saved trainable tensors into the model's parameters of the same names, checking the match."""
    from safetensors.torch import load_file

    tensors = load_file(str(path), device="cpu")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    wrong = sorted(n for n in params.keys() & tensors.keys() if params[n].shape != tensors[n].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(x)} {what} (e.g. {x[0]!r})" for x, what in
                 ((missing, "trainable parameter(s) not in the checkpoint"),
                  (unexpected, "saved tensor(s) that are not trainable parameters of this model"),
                  (wrong, "of different shape")) if x]
        raise CheckpointError(f"{path} does not match the model: {'; '.join(parts)}; was it written with another "
                              "model, freeze or peft setting?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


# ---------------------------------------------------------------------------------------------------------
# Stop signals


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; workers leave it to the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignals:
    """SIGTERM / SIGINT set ``received``; the loop checks it between optimizer steps, saves and returns.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. Handlers are installed only in the main
    thread (Python allows no other) and the previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        # os.write, not print: a print here could re-enter a print the signal interrupted.
        os.write(2, f"\nvlmtune: got {self.received}; finishing the current step, then saving a checkpoint "
                    "(Ctrl-C again to abort without saving)\n".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():  # None: a handler not set from Python; default is closest
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
