"""Several processes (``torchrun``): the process group, FSDP2 / DDP, activation checkpointing, the final save.

Recipe keys (``distributed.*``, read when ``WORLD_SIZE`` > 1 or the strategy is named, see docs/distributed.md)
-------------------------------------------------------------------------------------------------------------
``strategy`` (``fsdp2`` | ``ddp`` | ``none``, default: fsdp2 when the world size > 1, else none)
    fsdp2: every decoder layer, the vision tower (one unit) and the root are ``fully_shard``-ed, so parameters,
    gradients and optimizer state are split over ranks. ddp: each rank holds the whole model, gradients are
    all-reduced. none: refused with several processes (the ranks would train unrelated copies). Named fsdp2 / ddp
    under torchrun with one process: a process group of one, and that strategy (FSDP2 on one GPU).
``dp_replicate`` / ``dp_shard`` (default 1 / world size): HSDP on a 2-D DeviceMesh, parameters sharded within a
    group of ``dp_shard`` ranks (e.g. one node) and replicated across ``dp_replicate`` groups.
``cpu_offload`` (default false): FSDP2 keeps parameters, gradients and optimizer state in CPU memory.
``activation_checkpointing`` (``none`` | ``language`` | ``vision`` | ``all``): recompute the activations of each
    decoder layer / vision block of those parts in the backward instead of storing them.
``find_unused_parameters`` (default false): DDP only; needed when a trainable parameter gets no gradient in some
    step, e.g. MoE experts no token was routed to (text-only micro-batches get a vision filler row, see batching.py).
``timeout_s`` (default 600): every collective (and the process-group start) fails after this long, so a rank that
    died or hangs makes the others exit with an error instead of waiting forever.

Loss normalisation: the loop divides each rank's summed token loss by the *global* number of supervised tokens of
the step (all ranks, all micro-batches), so the exact gradient is the *sum* of the ranks' gradients. DDP and FSDP2
both *average* over ranks, so the loop multiplies the loss it back-propagates by :func:`grad_scale` (the world
size) — an exact power-of-two factor for 2, 4, 8 ... ranks. DDP syncs only on the last micro-batch (``no_sync``).

Mixed precision under FSDP2: on CUDA, parameters are gathered in bfloat16 for compute and gradients reduced in
float32 (fp32 master weights and optimizer state); on CPU everything stays float32.

Activation checkpointing uses the flag of transformers' ``GradientCheckpointingLayer`` (the decoder layers and
vision blocks of every supported family) per layer, with ``torch.utils.checkpoint`` (non-reentrant), rather than
torch's ``checkpoint_wrapper``: the wrapper would insert ``_checkpoint_wrapped_module.`` into every parameter
name, which checkpoints, the part table and the Hugging Face save all rely on; and non-reentrant checkpointing
needs no ``enable_input_require_grads`` for LoRA.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from vlmtune.families import Family

SHARD_BYTES = 2 * 1024**3  # size of a safetensors file of the final model (before the next one starts)
_UNIT = re.compile(r"^(.*?\.(?:layers|blocks)\.\d+)\.")


class DistributedError(RuntimeError):
    """A distributed setting that cannot work, or a rank that failed."""


# ---------------------------------------------------------------------------------------------------------
# The process group


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    """torchrun's rendezvous variables are set (with any number of processes, one included)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextlib.contextmanager
def process_group(timeout_s: float = 600.0, device: str = "auto", strategy: str | None = None) -> Iterator[None]:
    """Start the process group from torchrun's environment (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1, or
    with one process when `strategy` is fsdp2 / ddp (e.g. FSDP2 on one GPU), and none is running; destroy it at
    the end. A group started by the caller is left alone; without torchrun nothing is started."""
    wanted = env_world_size() > 1 or (strategy in ("fsdp2", "ddp") and launched_by_torchrun())
    if not wanted or not dist.is_available() or dist.is_initialized():
        yield
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    kwargs = {}
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def resolve_strategy(dcfg, world_size: int) -> str:
    """The recipe's strategy (default fsdp2), checked against the world size. One process: 'none', unless the
    recipe names fsdp2 / ddp and a process group is running (torchrun, see process_group)."""
    group = dist.is_available() and dist.is_initialized()
    if world_size == 1 and not (group and dcfg.strategy in ("fsdp2", "ddp")):
        return "none"
    strategy = dcfg.strategy or "fsdp2"
    if strategy == "none":
        raise DistributedError(f"distributed.strategy=none with {world_size} processes: each rank would train "
                               "its own copy; use fsdp2 or ddp, or run one process")
    shard = dcfg.dp_shard or world_size // dcfg.dp_replicate
    if strategy == "fsdp2" and dcfg.dp_replicate * shard != world_size:
        raise DistributedError(f"distributed.dp_replicate ({dcfg.dp_replicate}) x dp_shard ({shard}) must equal "
                               f"the world size ({world_size})")
    return strategy


def reduce_device() -> torch.device:
    """Where a tensor must be for a collective: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _over_ranks(value: float, op) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=reduce_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def sum_over_ranks(value: float) -> float:
    """The sum of `value` over all ranks (the value itself in one process)."""
    return _over_ranks(value, dist.ReduceOp.SUM)


def max_over_ranks(value: int) -> int:
    """The largest `value` of any rank."""
    return int(_over_ranks(value, dist.ReduceOp.MAX))


def grad_scale(strategy: str, world_size: int) -> float:
    """Factor on the back-propagated loss that turns DDP's / FSDP2's gradient average into the sum we need."""
    return float(world_size) if strategy in ("ddp", "fsdp2") else 1.0


def sync_context(forward_model: torch.nn.Module, last: bool):
    """DDP: all-reduce only in the last micro-batch's backward. FSDP2 reduce-scatters each one (less memory)."""
    if not last and isinstance(forward_model, torch.nn.parallel.DistributedDataParallel):
        return forward_model.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# Wrapping


def _strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


def _part(name: str, family: Family) -> str | None:
    from vlmtune.families import part_of

    return part_of(_strip(name), family)


def apply_activation_checkpointing(model: torch.nn.Module, family: Family, which: str) -> int:
    """Turn on recomputation for the GradientCheckpointingLayer modules of the chosen parts; returns how many."""
    if which == "none":
        return 0
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    parts = {"language": ("language_model",), "vision": ("vision_tower", "projector"),
             "all": ("language_model", "vision_tower", "projector")}[which]
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and _part(name, family) in parts:
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            n += 1
    return n


def _units(model: torch.nn.Module, family: Family) -> list[torch.nn.Module]:
    """FSDP2 units below the root: each decoder layer, then the vision tower as one unit."""
    units, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and \
                _part(name, family) == "language_model":
            units += list(module)
    for prefix in family.parts.get("vision_tower", ()):
        for name in (prefix, "base_model.model." + prefix):
            with contextlib.suppress(AttributeError):
                tower = model.get_submodule(name)
                if id(tower) not in seen:
                    units.append(tower)
                    seen.add(id(tower))
    return units


def parallelize(model: torch.nn.Module, family: Family, dcfg, strategy: str,
                device: torch.device) -> torch.nn.Module:
    """Apply activation checkpointing and the strategy; returns the module to call for the forward.

    fsdp2 shards `model` in place (parameter names unchanged) and returns it; ddp returns a
    DistributedDataParallel wrapper around it (use `model` itself for names, saving and the optimizer).
    """
    apply_activation_checkpointing(model, family, dcfg.activation_checkpointing)
    if strategy == "none":
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                         find_unused_parameters=dcfg.find_unused_parameters)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    world_size = dist.get_world_size()
    if dcfg.dp_replicate > 1:
        mesh = init_device_mesh(device.type, (dcfg.dp_replicate, world_size // dcfg.dp_replicate),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    kwargs = {"mesh": mesh}
    if device.type == "cuda":  # bf16 compute, fp32 gradient reduction; fp32 master weights stay in the optimizer
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if dcfg.cpu_offload:  # pinned memory needs CUDA; on CPU (tests) the same code path runs unpinned
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # The loop never changes the model's outputs in place, which is what this warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # Frozen parameters are sharded like the others (1/N of their memory per rank) and never get gradients or
    # optimizer state; trainable adapters and frozen base weights share a unit without trouble.
    for unit in _units(model, family):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """torch's clip_grad_norm_, also for FSDP2's DTensor gradients (the norm is then over the whole model)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = torch.stack([torch.linalg.vector_norm(g.to_local(), dtype=torch.float32) for g in grads])
    sq = (local.double() ** 2).sum()
    sq = sq.to(reduce_device())  # cpu_offload keeps gradients on the CPU, which NCCL cannot reduce
    dist.all_reduce(sq)  # shards are disjoint over the (shard) group; replicas would count twice, see below
    replicate = grads[0].device_mesh.size() // grads[0].device_mesh.size(-1) if grads[0].device_mesh.ndim > 1 else 1
    total = float((sq / replicate).sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g.to_local().mul_(coef)
    return total


# ---------------------------------------------------------------------------------------------------------
# The final model, written without gathering it whole on one rank


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


def save_final_sharded(model: torch.nn.Module, processor, out: Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """Every rank calls this. LoRA: the whole adapter (gathered from every rank), in the PEFT layout. Full model:
    gathered layer by layer; rank 0 converts the names back to the checkpoint layout (as save_pretrained does)
    and writes safetensors files of about `shard_bytes` plus their index, so at most one file's worth of
    tensors is held at once. Written beside `out` and renamed in by rank 0."""
    rank = dist.get_rank()
    tmp = out.with_name(out.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        adapter = {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
    else:
        _write_full_model(model, tmp, rank == 0, shard_bytes)
    if rank == 0:
        processor.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return out


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
# Sharded checkpoints (torch.distributed.checkpoint), written by every rank, loadable on any number of ranks


def _dcp_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what trains is saved (frozen weights come back from model.name_or_path, as in one process).
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded(ckpts, recipe, run, model, optimizer, scheduler, sampler, metrics) -> Path:
    """The multi-process form of Checkpoints.save: ``dcp/`` (trainable weights + optimizer state, each rank its
    shards), ``rng-<rank>.pt``, and rank 0's ``scheduler.pt``, trainer_state.json (with every rank's data
    position), recipe.yaml; COMPLETE is written by rank 0 after a barrier, then the folder is renamed in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from vlmtune import checkpoint as ck

    rank, world_size = dist.get_rank(), dist.get_world_size()
    final = ckpts.directory / f"step-{run.step:06d}"
    name = [f"{final.name}.tmp-{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)  # one folder for all ranks: rank 0's pid
    tmp = ckpts.directory / name[0]
    if rank == 0:
        ckpts.directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    ck._write_torch(tmp / f"rng-{rank}.pt", ck.rng_state())
    positions = [None] * world_size
    dist.all_gather_object(positions, [sampler.epoch, sampler.offset])
    dist.barrier()  # every rank's files are written
    if rank == 0:
        ck._write_torch(tmp / "scheduler.pt", scheduler.state_dict())
        state = {"format": ck.FORMAT_VERSION, "sharded": True, "world_size": world_size, **ck.asdict(run),
                 "data": {"epoch": sampler.epoch, "offset": sampler.offset, "positions": positions},
                 "metrics": {"seen": metrics.seen, "skipped": dict(metrics.skipped),
                             "examples": dict(metrics.examples)}}
        ck._write_text(tmp / ck.STATE, json.dumps(state, indent=2) + "\n")
        ck._write_text(tmp / ck.RECIPE, ck.recipe_to_yaml(recipe))
        ck._write_text(tmp / ck.COMPLETE, f"step {run.step}\n")
        ck._fsync_path(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ck._fsync_path(ckpts.directory)
        ckpts.prune()
    dist.barrier()
    return final


def sharded_weights(model: torch.nn.Module) -> bool:
    """FSDP2 holds the weights as DTensors, on one process too: their checkpoint must be the sharded one."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def load_sharded(path: Path, state: dict, model, optimizer, scheduler, sampler) -> dict:
    """Load a save_sharded checkpoint on this run's ranks (any number, one included); returns the RNG state
    to restore (this rank's, or rank 0's when the checkpoint had fewer ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from vlmtune.checkpoint import CheckpointError

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_dcp_options())
    loaded = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # one process: DCP says it assumes so, which is what we want
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(loaded, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=_dcp_options(strict=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # Every rank consumed the same number of samples of the epoch, so the global position is old world x offset.
    positions = state["data"]["positions"]
    if len({tuple(p) for p in positions}) != 1:
        raise CheckpointError(f"{path}: the ranks stopped at different data positions {positions}")
    epoch, offset = positions[0]
    consumed = offset * len(positions)
    if consumed % world_size:
        raise CheckpointError(f"{path}: {consumed} samples of epoch {epoch} were seen by {len(positions)} rank(s); "
                              f"that does not split evenly over {world_size} rank(s)")
    sampler.epoch, sampler.offset = epoch, consumed // world_size
    rng = path / f"rng-{rank}.pt"
    return torch.load(rng if rng.is_file() else path / "rng-0.pt", map_location="cpu", weights_only=True)
