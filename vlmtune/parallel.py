"""Several processes (``torchrun``): the process group, collectives, FSDP2 / DDP, activation checkpointing.

Checkpoints (sharded and not) and the gathered final save live in vlmtune/checkpoint.py.

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
import os
import warnings
from collections.abc import Iterator
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist

from vlmtune.errors import DistributedError
from vlmtune.families import PARTS, VISION_PARTS, Family, part_of

# ---------------------------------------------------------------------------------------------------------
# The process group


def world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    return part_of(_strip(name), family)


def apply_activation_checkpointing(model: torch.nn.Module, family: Family, which: str) -> int:
    """Turn on recomputation for the GradientCheckpointingLayer modules of the chosen parts; returns how many."""
    if which == "none":
        return 0
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    parts = {"language": ("language_model",), "vision": VISION_PARTS, "all": PARTS}[which]
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
