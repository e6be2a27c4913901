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
e.g. BatchNorm statistics, would get them back from ``model.name_or_path``).

A multi-process run (and FSDP2 on one process, whose weights are DTensors) writes a sharded checkpoint instead:
``dcp/`` (torch.distributed.checkpoint: trainable weights + optimizer state, every rank its shards),
``rng-<rank>.pt``, ``scheduler.pt``, and the same trainer_state.json (with every rank's data position),
recipe.yaml and COMPLETE; it resumes on any number of ranks, one included (docs/distributed.md).

This module also holds the one Hugging Face writer (:func:`save_hf`): the run's ``final/`` folder, written whole
by one process or gathered layer by layer from FSDP2 shards, and what ``vlmtune export`` writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from vlmtune.config import Recipe, recipe_to_yaml, safe_yaml
from vlmtune.errors import CheckpointError, OutputError
from vlmtune.output import ensure_space, is_no_space, no_space
from vlmtune.parallel import sum_over_ranks, world

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
RECIPE = "recipe.yaml"
SHARD_BYTES = 2 * 1024**3  # size of a safetensors file of the final model (before the next one starts)
_NAME = re.compile(r"step-(\d+)")
_PARTIAL = re.compile(r"step-\d+\.tmp-\d+")
_UNIT = re.compile(r"^(.*?\.(?:layers|layer|blocks)\.\d+)\.")


@dataclass
class RunState:
    """What the loop carries from step to step besides model, optimizer, scheduler, sampler and Metrics."""

    step: int = 0
    last_loss: float = math.nan
    last_val: float | None = None
    nonfinite_steps: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient norm, in all
    bad_in_row: int = 0  # ... and in a row, up to now
    pending_validation: bool = False  # stopped by a signal before the validation / evaluation due at `step`
    best_value: float | None = None  # checkpoint.best: the best evaluation so far, and its step
    best_step: int | None = None
    trackers: dict | None = None  # the trackers' run ids (vlmtune/trackers.py), so a resumed run continues them


@dataclass
class TrainState:
    """Everything a checkpoint saves and restores: the trained objects and the loop's counters."""

    model: torch.nn.Module  # the model itself (not a DDP wrapper): parameter names, saving
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: object  # vlmtune.data.dataset.EpochSampler: the data position (epoch, offset)
    metrics: object  # vlmtune.metrics.Metrics: samples seen, skips by reason
    run: RunState


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
# Hugging Face folders: the run's final/ and vlmtune export


def save_hf(model: torch.nn.Module, processor, out: Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """`model` as a Hugging Face folder (weights, config, processor, generation config), written beside `out` and
    renamed in by one writer, so it is whole or absent. Every rank calls it: with FSDP2 the weights are gathered
    layer by layer (a LoRA adapter: from every rank's shards) and rank 0 converts the names back to the checkpoint
    layout (as save_pretrained does) and writes safetensors files of about `shard_bytes`, holding at most one
    file's worth of tensors at once; unsharded, rank 0 alone saves."""
    sharded, writer = sharded_weights(model), world()[0] == 0
    if sharded:
        _space_on_every_rank(out.parent, hf_bytes(model), writer)
    elif writer:  # unsharded, the writer alone is here: no collective
        ensure_space(out.parent, hf_bytes(model))
    tmp = out.with_name(out.name + ".tmp")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        if not sharded:
            if writer:
                model.save_pretrained(tmp, safe_serialization=True)
        elif hasattr(model, "peft_config"):
            adapter = {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}
            if writer:
                model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
        else:
            _write_full_model(model, tmp, writer, shard_bytes)
        if writer:
            processor.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    except OSError as e:  # nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e):
            raise no_space(out.parent, hf_bytes(model)) from e
        raise
    if sharded:
        dist.barrier()
    return out


def hf_bytes(model: torch.nn.Module) -> int:
    """About what :func:`save_hf` writes: the adapter of a PeftModel, else every weight."""
    tensors = ([p for p in model.parameters() if p.requires_grad] if hasattr(model, "peft_config")
               else list(model.state_dict().values()))
    return sum(t.numel() * t.element_size() for t in tensors) + 2**20


def _space_on_every_rank(folder: Path, needed: int, writer: bool) -> None:
    """The writer checks the disk; every rank learns the answer (every rank calls this), so that none starts a
    collective the writer will not join."""
    problem = None
    if writer:
        try:
            ensure_space(folder, needed)
        except OutputError as e:
            problem = e
    if sum_over_ranks(float(problem is not None)) > 0:
        raise problem or OutputError(f"no space left on {folder} (rank 0 checked it)")


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Trainable parameters holding NaN or inf, in this rank's shards."""
    from torch.distributed.tensor import DTensor

    return [name for name, p in model.named_parameters() if p.requires_grad
            and not bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())]


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def _chunks(state: dict[str, torch.Tensor]) -> Iterator[list[str]]:
    """Keys grouped by layer (everything of ``...layers.N.`` / ``...blocks.N.`` together), in order."""
    group, current = [], None
    for key in state:
        m = _UNIT.match(key)
        unit = m.group(1) if m else None
        if group and unit != current:
            yield group
            group = []
        group.append(key)
        current = unit
    if group:
        yield group


def _write_full_model(model: torch.nn.Module, folder: Path, writer: bool, shard_bytes: int) -> None:
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # targets of tied weights are not saved
    files: list[tuple[str, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(pending, str(folder / name), metadata={"format": "pt"})
            files.append((name, list(pending)))
        pending, size = {}, 0

    for keys in _chunks(state):
        tensors = {k: _full(state[k]) for k in keys if k not in tied}  # collective: every rank
        if not writer or not tensors:
            continue
        tensors = revert_weight_conversion(model, tensors)
        pending.update(tensors)
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        if size >= shard_bytes:
            flush()
    if not writer:
        return
    flush()
    model.config.save_pretrained(folder)
    if len(files) == 1:
        os.replace(folder / files[0][0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, (name, keys) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map.update({k: final for k in keys})
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


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
                "train.check_gradients", "data.num_workers", "distributed.", "logging.", "eval.")


def recipe_changes(saved_yaml: str, recipe: Recipe) -> list[str]:
    """``key: old -> new`` for every recipe value that differs from the checkpoint's (bookkeeping keys aside)."""
    old = _flat(safe_yaml(saved_yaml, "the checkpoint's recipe.yaml") or {})
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

    def save(self, recipe: Recipe, state: TrainState) -> Path:
        """Write the checkpoint of step `state.run.step` atomically, then apply ``keep``. Returns its folder.
        Every rank calls it; sharded weights (several ranks, or FSDP2 on one) take the sharded form."""
        if dist.is_initialized() and (dist.get_world_size() > 1 or sharded_weights(state.model)):
            return _save_sharded(self, recipe, state)
        final = self.directory / f"step-{state.run.step:06d}"
        if not self.writer:
            return final
        self.directory.mkdir(parents=True, exist_ok=True)
        needed = checkpoint_bytes(state)
        ensure_space(self.directory, needed, self._intact())
        tmp = self.directory / f"{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with self._cleaned_on_failure(tmp, needed):
            n = _write_trainable(tmp / TRAINABLE, state.model)
            _write_torch(tmp / OPTIMIZER, {"optimizer": state.optimizer.state_dict(),
                                           "scheduler": state.scheduler.state_dict()})
            _write_torch(tmp / RNG, rng_state())
            record = {**_state_record(state), "trainable_tensors": n, "files": _sizes(tmp)}
            _write_text(tmp / STATE, json.dumps(record, indent=2) + "\n")
            self._publish(tmp, final, recipe)
        return final

    def _intact(self) -> str:
        done = self.complete()
        return f" from {done[-1]}, which is intact" if done else ""

    @contextlib.contextmanager
    def _cleaned_on_failure(self, tmp: Path, needed: int, remove: bool = True) -> Iterator[None]:
        """A save that fails leaves nothing behind (a full disk stays as full as it was); no space -> one line.
        `remove`: this process deletes `tmp` (in a sharded save, rank 0)."""
        try:
            yield
        except Exception as e:
            if remove:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_no_space(e):
                raise no_space(self.directory, needed, keep=self._intact()) from e
            raise

    def _publish(self, tmp: Path, final: Path, recipe: Recipe) -> None:
        """recipe.yaml and COMPLETE last, then the folder renamed into place (an older one of the same step moved
        aside first), then ``keep`` applied."""
        _write_text(tmp / RECIPE, recipe_to_yaml(recipe))
        _write_text(tmp / COMPLETE, f"step {_step_of(final)}\n")
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

    def load(self, path: Path, recipe: Recipe, state: TrainState) -> None:
        """Restore everything from `path` into the freshly built objects of `state`; the RNG states last."""
        saved = read_state(path)
        if saved.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {saved.get('format')!r} is not supported by this "
                                  f"vlmtune (it reads format {FORMAT_VERSION})")
        if (path / RECIPE).is_file():
            changes = recipe_changes((path / RECIPE).read_text(), recipe)
            if changes:
                print("vlmtune: note: the recipe differs from the one that wrote the checkpoint; continuing with "
                      "the new values:\n    " + "\n    ".join(changes), flush=True)
        _check_files(path, saved, self.complete())
        _check_data(path, saved, state.sampler)
        if saved.get("sharded"):  # written by several ranks; loads on any number of ranks
            rng = _load_sharded(path, saved, state)
        else:
            load_trainable(path / TRAINABLE, state.model)
            opt = _load_plain(path / OPTIMIZER)
            try:
                state.optimizer.load_state_dict(opt["optimizer"])
            except ValueError as e:
                raise CheckpointError(f"{path / OPTIMIZER}: does not fit this run's optimizer ({e}); was the "
                                      "checkpoint written with another freeze/peft setting?") from e
            state.scheduler.load_state_dict(opt["scheduler"])
            state.sampler.epoch, state.sampler.offset = saved["data"]["epoch"], saved["data"]["offset"]
            rng = _load_plain(path / RNG)
        m, metrics = saved["metrics"], state.metrics
        metrics.seen, metrics.skipped, metrics.examples = m["seen"], Counter(m["skipped"]), dict(m["examples"])
        metrics.shortened = Counter(m.get("shortened", {}))
        state.run = RunState(**{k: saved[k] for k in RunState.__dataclass_fields__ if k in saved})
        set_rng_state(rng)
        if self.writer:
            dropped = truncate_metrics(metrics.path, state.run.step)
            if dropped:
                print(f"vlmtune: dropped {dropped} line(s) after step {state.run.step} from {metrics.path}",
                      flush=True)
        self.drop_newer(state.run.step)
        print(f"vlmtune: resumed from {path} (step {state.run.step}, epoch {state.sampler.epoch}, sample "
              f"{state.sampler.offset} of that epoch)", flush=True)


def _state_record(state: TrainState) -> dict:
    """trainer_state.json's common part: format, counters, data position (and the size of the data it is a position
    in), skip counters."""
    m = state.metrics
    return {"format": FORMAT_VERSION, **asdict(state.run),
            "data": {"epoch": state.sampler.epoch, "offset": state.sampler.offset, "size": state.sampler.size},
            "metrics": {"seen": m.seen, "skipped": dict(m.skipped), "examples": dict(m.examples),
                        "shortened": dict(m.shortened)}}


def checkpoint_bytes(state: TrainState) -> int:
    """About what a checkpoint of `state` takes on disk: the trainable weights and the optimizer's state tensors."""
    weights = sum(p.numel() * p.element_size() for p in state.model.parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for s in state.optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor))
    return weights + moments + 2**20


def _sizes(folder: Path) -> dict[str, int]:
    """Every file of a checkpoint folder being written, by relative path, with its size (checked on resume)."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def _check_files(path: Path, saved: dict, complete: list[Path]) -> None:
    """Every file the save recorded is there at its size: a truncated or missing file is named, with the older
    checkpoint to resume from instead."""
    bad = []
    for name, size in saved.get("files", {}).items():
        f = path / name
        if not f.is_file():
            bad.append(f"{name} is missing")
        elif f.stat().st_size != size:
            bad.append(f"{name} has {f.stat().st_size} bytes, {size} were written")
    if bad:
        older = [p for p in complete if p != path and (_step_of(p) or 0) < (_step_of(path) or 0)]
        hint = (f"resume from the older checkpoint {older[-1]} (resume={older[-1]})" if older
                else "no older checkpoint is left: start a new run")
        raise CheckpointError(f"{path} is damaged: {', '.join(bad)}; {hint}, or delete {path}")


def _check_data(path: Path, saved: dict, sampler) -> None:
    """The saved data position belongs to this run's training data (same number of rows)."""
    size = saved["data"].get("size")
    if size is not None and size != sampler.size:
        raise CheckpointError(
            f"{path} was written at epoch {saved['data']['epoch']}, sample {saved['data']['offset']} of a training "
            f"set of {size} rows, but this run's data.train has {sampler.size} rows (did data.train.source or "
            "data.train.limit change?); resume with the same data, or start a new run in another output_dir")


def _load_plain(path: Path):
    """torch.load of tensors and plain values only: vlmtune never runs code from a checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, which vlmtune does not "
                              "load (it would run code from the file); vlmtune did not write it this way: resume "
                              "from a checkpoint vlmtune wrote") from e
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "resume from another checkpoint") from e


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {STATE} ({e})") from e


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Copy the saved trainable tensors into the model's parameters of the same names, checking the match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); resume from another checkpoint") from e
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
# Sharded checkpoints (torch.distributed.checkpoint), written by every rank, loadable on any number of ranks


def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what trains is saved (frozen weights come back from model.name_or_path, as in one process).
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def sharded_weights(model: torch.nn.Module) -> bool:
    """FSDP2 holds the weights as DTensors, on one process too: their checkpoint must be the sharded one."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _save_sharded(ckpts: Checkpoints, recipe: Recipe, state: TrainState) -> Path:
    """The multi-process form of Checkpoints.save: ``dcp/`` (each rank its shards), ``rng-<rank>.pt``, rank 0's
    ``scheduler.pt`` and trainer_state.json (with every rank's data position); rank 0 publishes the folder after
    a barrier."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world_size = dist.get_rank(), dist.get_world_size()
    final = ckpts.directory / f"step-{state.run.step:06d}"
    name = [f"{final.name}.tmp-{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)  # one folder for all ranks: rank 0's pid
    tmp = ckpts.directory / name[0]
    if rank == 0:
        ckpts.directory.mkdir(parents=True, exist_ok=True)
    # Every rank's shards go to one folder: the whole size (DTensor numels are global), checked by rank 0.
    needed = checkpoint_bytes(state)
    _space_on_every_rank(ckpts.directory, needed, rank == 0)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    with ckpts._cleaned_on_failure(tmp, needed, remove=rank == 0):
        model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=_dcp_options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        _write_torch(tmp / f"rng-{rank}.pt", rng_state())
        positions = [None] * world_size
        dist.all_gather_object(positions, [state.sampler.epoch, state.sampler.offset])
        dist.barrier()  # every rank's files are written
        if rank == 0:
            _write_torch(tmp / "scheduler.pt", state.scheduler.state_dict())
            record = _state_record(state)
            record["data"]["positions"] = positions
            record.update(sharded=True, world_size=world_size, files=_sizes(tmp))
            _write_text(tmp / STATE, json.dumps(record, indent=2) + "\n")
            ckpts._publish(tmp, final, recipe)
    dist.barrier()
    return final


def _load_sharded(path: Path, saved: dict, state: TrainState) -> dict:
    """Load a sharded checkpoint on this run's ranks (any number, one included); returns the RNG state to restore
    (this rank's, or rank 0's when the checkpoint had fewer ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / "dcp" / ".metadata").is_file():
        raise CheckpointError(f"{path} says it is sharded, but has no dcp/.metadata; resume from a checkpoint "
                              "vlmtune wrote")
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer, options=_dcp_options())
    loaded = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # one process: DCP says it assumes so, which is what we want
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        try:
            _SafeReader(str(path / "dcp")).read_metadata()  # here, not inside DCP, which would wrap the error
            dcp.load(loaded, storage_reader=_SafeReader(str(path / "dcp")), planner=_SafePlanner())
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path / 'dcp'} holds objects other than DCP's metadata, tensors and plain values, "
                                  "which vlmtune does not load (it would run code from the file); vlmtune did not "
                                  "write it this way: resume from a checkpoint vlmtune wrote") from e
    set_state_dict(state.model, state.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=_dcp_options(strict=False))
    state.scheduler.load_state_dict(_load_plain(path / "scheduler.pt"))
    rank, world_size = world()
    # Every rank consumed the same number of samples of the epoch, so the global position is old world x offset.
    positions = saved["data"]["positions"]
    if len({tuple(p) for p in positions}) != 1:
        raise CheckpointError(f"{path}: the ranks stopped at different data positions {positions}")
    epoch, offset = positions[0]
    consumed = offset * len(positions)
    if consumed % world_size:
        raise CheckpointError(f"{path}: {consumed} samples of epoch {epoch} were seen by {len(positions)} rank(s); "
                              f"that does not split evenly over {world_size} rank(s)")
    state.sampler.epoch, state.sampler.offset = epoch, consumed // world_size
    rng = path / f"rng-{rank}.pt"
    return _load_plain(rng if rng.is_file() else path / "rng-0.pt")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; this unpickler builds DCP's own metadata classes, tensor sizes, dtypes and
    paths, and refuses every other global (a crafted file could otherwise run any code)."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = frozenset({("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                       ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")})

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout)
        if module in self.MODULES or (module, name) in self.NAMES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not one of DCP's metadata types")


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, except that non-tensor items (optimizer hyperparameters) are read weights_only (DCP's
    own reads them with full pickle) and handed on re-serialised."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        safe = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


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
