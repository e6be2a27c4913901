"""The training loop: set-up, the loop, the finish; read it top to bottom.

One optimizer step = ``accum`` micro-batches. Its loss is the sum of token losses over every supervised token
in the step divided by the number of those tokens (summed over micro-batches and, when distributed, over
ranks), so the result does not depend on how tokens fall into micro-batches.

A step's path: the loader's workers encode samples (vlmtune/encode.py), :class:`~vlmtune.batching.Batcher` groups
them into micro-batches, :func:`train_step` runs each through :func:`~vlmtune.loss.loss_sum` and steps the
optimizer; vlmtune/checkpoint.py saves and resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlmtune.attention import host_inputs, setup_attention
from vlmtune.batching import Batcher, MicroBatch, Plan, check_packing, filler_sample, rope_index_module
from vlmtune.checkpoint import (
    Checkpoints,
    RunState,
    StopSignals,
    TrainState,
    ignore_stop_signals,
    nonfinite_parameters,
    preserve_rng,
    read_state,
    save_hf,
    truncate_metrics,
)
from vlmtune.compile import compile_regions
from vlmtune.config import Recipe, accumulation_steps, recipe_to_yaml
from vlmtune.data.dataset import EpochSampler
from vlmtune.encode import Encoded, EncodedDataset, Skipped, make_encoder
from vlmtune.errors import DataError, OutputError, TrainingError
from vlmtune.evaluate import Evaluator, better, eval_mode, evaluate_in_training, evaluator_for
from vlmtune.evaluate import write as write_eval
from vlmtune.families import Family
from vlmtune.kernels import require_liger, use_liger_norms
from vlmtune.loss import loss_sum, supervised_count, token_weight_table
from vlmtune.metrics import Metrics, strict_json
from vlmtune.model import apply_freeze, autocast_dtype, load_model, pick_device
from vlmtune.output import hold
from vlmtune.parallel import (
    clip_grad_norm,
    grad_scale,
    parallelize,
    process_group,
    resolve_strategy,
    sum_over_ranks,
    sync_context,
    world,
)
from vlmtune.peft import GradientCheck, apply_lora, param_groups, quantization_config
from vlmtune.report import build_report
from vlmtune.trackers import Trackers, flatten, run_environment
from vlmtune.views import write_label_samples


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR multiplier after `step` optimizer steps: linear warmup, then cosine / linear decay to min_ratio."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def to_device(batch: dict, device: torch.device, dtype: torch.dtype, cast_keys: tuple[str, ...]) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k in cast_keys and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# Data: encoded samples from loader workers, endlessly, resumable


def loader_workers(requested: int) -> int:
    """data.num_workers, at most the CPU cores this process may use (under torchrun: its share of the node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def loader_kwargs(recipe: Recipe) -> dict:
    # Workers decode and process samples; the main process groups, pads or packs them (it needs the counts).
    return dict(batch_size=recipe.train.micro_batch_size, collate_fn=list,
                num_workers=loader_workers(recipe.data.num_workers), persistent_workers=False,
                worker_init_fn=ignore_stop_signals)


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader's own generator (it seeds workers). Without one, every new loader iterator draws from the
    global torch RNG, so a resumed run, which starts its loader mid-epoch, would shift the dropout stream."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def loader_batches(loader_for_epoch: Callable[[], DataLoader],
                   sampler: EpochSampler) -> Iterator[list[Encoded | Skipped]]:
    """Endless lists of loaded samples; (sampler.epoch, sampler.offset) always points at the next unseen one."""
    while True:
        for items in loader_for_epoch():
            sampler.offset += len(items)
            yield items
        sampler.epoch, sampler.offset = sampler.epoch + 1, 0


def train_stream(train_ds: EncodedDataset, recipe: Recipe, rank: int = 0,
                 world_size: int = 1) -> tuple[EpochSampler, Iterator[list[Encoded | Skipped]]]:
    """This rank's resumable sampler and the endless stream of loaded samples the loop draws from
    (bench/data_path.py times this stream alone)."""
    sampler = EpochSampler(len(train_ds), recipe.train.seed, rank, world_size)
    loaded = loader_batches(lambda: DataLoader(train_ds, sampler=sampler, generator=loader_generator(
        recipe.train.seed, sampler.epoch), **loader_kwargs(recipe)), sampler)
    return sampler, loaded


# ---------------------------------------------------------------------------------------------------------
# Set-up: everything the loop needs, built once


@dataclass
class Engine:
    """How one optimizer step runs: the module to call, precision, the loss, and the update."""

    forward: torch.nn.Module  # what runs the forward: the DDP wrapper, else the model itself
    params: list[torch.nn.Parameter]  # the trainable ones (clipped)
    device: torch.device
    dtype: torch.dtype  # of the weights; vision tensors are cast to it (Family.cast_to_model_dtype)
    amp: Callable[[], contextlib.AbstractContextManager]
    cast_keys: tuple[str, ...]
    loss_factor: float  # DDP / FSDP2 average gradients over ranks; the back-propagated loss is scaled to the sum
    chunk_tokens: int | None
    kernel: str
    token_weights: torch.Tensor | None  # per vocabulary id (train.token_weights), or None
    max_grad_norm: float
    grad_check: GradientCheck


@dataclass
class Data:
    """The training data as the loop draws it, and the validation loader."""

    batcher: Batcher
    sampler: EpochSampler
    loaded: Iterator[list[Encoded | Skipped]]
    val_loader: DataLoader | None
    train_size: int
    format: str


@dataclass
class Session:
    """What set-up builds for the loop and the finish."""

    recipe: Recipe
    out_dir: Path
    rank: int
    world_size: int
    processor: object
    family: Family
    state: TrainState
    engine: Engine
    data: Data
    ckpts: Checkpoints
    accum: int
    total_steps: int
    sharded: bool  # FSDP2: every rank takes part in the final save
    evaluator: Evaluator | None  # the recipe's eval section: generation scored during training
    trackers: Trackers


def finetune(recipe: Recipe) -> Path:
    """Train; returns the final model folder, or the checkpoint folder when SIGTERM / SIGINT stopped the run."""
    # Under torchrun (WORLD_SIZE > 1) the process group lives as long as the run; see vlmtune/parallel.py.
    with process_group(recipe.distributed.timeout_s, recipe.train.device, recipe.distributed.strategy), \
            hold(recipe.output_dir), StopSignals() as stop:
        s = setup(recipe)
        try:
            saved = train_loop(s, stop)
            final = finish(s, stop.received, saved)
        except BaseException:
            s.trackers.close(failed=True)
            raise
        s.trackers.close()
        return final


def setup(recipe: Recipe) -> Session:
    tcfg = recipe.train
    rank, world_size = world()
    accum = accumulation_steps(tcfg, world_size)
    out_dir = Path(recipe.output_dir)
    ckpts = Checkpoints(out_dir / "checkpoints", recipe.checkpoint.keep, writer=rank == 0)
    resume_from = ckpts.find(recipe.resume)  # None: a fresh run
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    if tcfg.kernels == "liger":
        require_liger(device)  # before the model loads: a wrong device or a missing package fails at once
    trackers = Trackers(recipe.logging, out_dir, enabled=rank == 0)
    trackers.check()  # before the model loads: a missing package or an unreachable server fails at once

    model, processor, family, trainable = build_model(recipe, device, rank)
    strategy = resolve_strategy(recipe.distributed, world_size)
    # Several ranks: FSDP2 shards `model` in place, DDP wraps it (forward through `forward`, all else `model`).
    forward = parallelize(model, family, recipe.distributed, strategy, device)
    if tcfg.compile:  # after sharding / checkpointing: each layer compiled as it will run (vlmtune/compile.py)
        compile_regions(model)
    data = build_data(recipe, processor, family, model, device, rank, world_size)
    total_steps = tcfg.max_steps or math.ceil(tcfg.epochs * data.train_size / tcfg.global_batch_size)
    optimizer, scheduler = build_optimizer(recipe, model, family, device, total_steps)
    weights_dtype = next(model.parameters()).dtype
    amp_dtype = autocast_dtype(device, weights_dtype)
    engine = Engine(
        forward=forward, params=[p for p in model.parameters() if p.requires_grad], device=device,
        dtype=weights_dtype, cast_keys=family.cast_to_model_dtype,
        amp=(partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp_dtype
             else contextlib.nullcontext),
        loss_factor=grad_scale(strategy, world_size), chunk_tokens=tcfg.loss_chunk_tokens, kernel=tcfg.kernels,
        token_weights=token_weight_table(processor.tokenizer, tcfg.token_weights, model),
        max_grad_norm=tcfg.max_grad_norm if tcfg.max_grad_norm is not None else float("inf"),
        grad_check=GradientCheck(model, family, enabled=tcfg.check_gradients))

    start_step = read_state(resume_from)["step"] if resume_from is not None else 0
    metrics = Metrics(out_dir, total_steps, enabled=rank == 0, start_step=start_step, trackers=trackers)
    state = TrainState(model, optimizer, scheduler, data.sampler, metrics, RunState())
    if rank == 0:
        (out_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"vlmtune: {family.name} model, {n_params:,} parameters, trainable by part {trainable}; "
              f"{data.train_size} training rows ({data.format}); {total_steps} steps of "
              f"{tcfg.global_batch_size} samples ({accum} micro-batch(es) of {tcfg.micro_batch_size}) on "
              f"{device}", flush=True)
    # Resume: weights, optimizer, scheduler, data position, counters; the RNG states last, right before the loop.
    if resume_from is not None:
        ckpts.load(resume_from, recipe, state)
    elif rank == 0:
        truncate_metrics(metrics.path, 0)  # a fresh run: no lines of an earlier one in this output_dir
    trackers.start(flatten(recipe.model_dump(mode="json")), run_environment(device.type, world_size),
                   resume=state.run.trackers)
    return Session(recipe, out_dir, rank, world_size, processor, family, state, engine, data, ckpts, accum,
                   total_steps, strategy == "fsdp2", evaluator_for(recipe, model, processor, family), trackers)


def build_model(recipe: Recipe, device: torch.device, rank: int) -> tuple[torch.nn.Module, object, Family, dict]:
    """Model, processor, family; freezing, or LoRA adapters (base frozen; freeze.<part> = no adapters there);
    returns the trainable parameter counts per part too."""
    model, processor, family = load_model(recipe.model, device,
                                          quantization_config(recipe.peft, device, recipe.model))
    if recipe.train.packing:
        check_packing(family)
    setup_attention(model, recipe.train.attention, recipe.train.packing)  # vlmtune/attention.py
    if recipe.train.kernels == "liger":
        swapped = use_liger_norms(model)
        if rank == 0:
            print(f"vlmtune: train.kernels=liger: Liger's fused linear cross-entropy; {swapped} RMSNorm module(s) "
                  "replaced by Liger's", flush=True)
    if recipe.peft is not None:
        model, trainable = apply_lora(model, family, recipe.peft, recipe.freeze, recipe.model.name_or_path,
                                      recipe.model.revision)
    else:
        trainable = apply_freeze(model, family, recipe.freeze)
    return model, processor, family, trainable


def build_data(recipe: Recipe, processor, family: Family, model: torch.nn.Module, device: torch.device, rank: int,
               world_size: int) -> Data:
    """Rows -> conversations -> encoded samples in loader workers, grouped into this rank's micro-batches."""
    tcfg = recipe.train
    encoder = make_encoder(processor, family, tcfg.max_length, tcfg.overlong)
    train_ds = EncodedDataset.of(recipe.data.train, encoder, "data.train",
                                 max_image_pixels=recipe.data.max_image_pixels, video=recipe.data.video)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    batcher = Batcher(pad_id, tcfg.micro_batch_size, tcfg.micro_batch_tokens, tcfg.packing,
                      rope_index_module(model) if tcfg.packing else None,
                      filler_sample(encoder) if world_size > 1 else None, family.uniform_media,
                      host_inputs(model, bucket=tcfg.compile), pin=device.type == "cuda")
    sampler, loaded = train_stream(train_ds, recipe, rank, world_size)
    val_loader = None
    if recipe.data.validation is not None:
        val_ds = EncodedDataset.of(recipe.data.validation, encoder, "data.validation",
                                   max_image_pixels=recipe.data.max_image_pixels, video=recipe.data.video)
        val_sampler = EpochSampler(len(val_ds), tcfg.seed, rank, world_size, shuffle=False)
        val_loader = DataLoader(val_ds, sampler=val_sampler, generator=loader_generator(tcfg.seed, -1),
                                **loader_kwargs(recipe))
    if rank == 0:  # a few training samples as the model sees them, for the run report
        write_label_samples(Path(recipe.output_dir) / "label_samples.jsonl", train_ds, processor.tokenizer.decode)
    workers = loader_workers(recipe.data.num_workers)
    if rank == 0 and workers < recipe.data.num_workers:
        print(f"vlmtune: data.num_workers={recipe.data.num_workers} lowered to {workers}: the CPU cores this "
              "process may use", flush=True)
    return Data(batcher, sampler, loaded, val_loader, len(train_ds), train_ds.conversations.format)


def build_optimizer(recipe: Recipe, model: torch.nn.Module, family: Family, device: torch.device,
                    total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with one group per (part, decay / no decay): lr x optim.lr_multipliers[part], no decay on norms and
    biases; linear warmup, then the schedule."""
    tcfg = recipe.train
    optimizer = torch.optim.AdamW(param_groups(model, family, tcfg.lr, tcfg.weight_decay,
                                               recipe.optim.lr_multipliers),
                                  lr=tcfg.lr, betas=tcfg.betas,
                                  fused=device.type == "cuda" and not recipe.distributed.cpu_offload)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=tcfg.warmup_steps, total=total_steps, schedule=tcfg.schedule,
                           min_ratio=tcfg.min_lr_ratio))
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepResult:
    loss: float  # the step's loss: summed token losses / supervised tokens, over every rank
    grad_norm: float
    lr: float  # train.lr as scheduled for this step
    finite: bool  # False: a NaN/inf loss or norm; the update was skipped
    supervised: int  # the step's supervised tokens over every rank (the loss's divisor)


def train_step(state: TrainState, e: Engine, plan: Plan, batches: Iterable[MicroBatch]) -> StepResult:
    """One optimizer step over this rank's micro-batches (`batches`, collated as `plan` says): forward and backward
    each, check, clip, update. A NaN/inf step is skipped: no optimizer or scheduler step, its gradients dropped."""
    global_sup = int(sum_over_ranks(plan.supervised))  # counted on the host before any forward: no sync
    step_loss = torch.zeros((), dtype=torch.float64, device=e.device)  # read once per step, not per micro-batch
    for i, b in enumerate(batches):
        tensors = to_device(b.tensors, e.device, e.dtype, e.cast_keys)
        with sync_context(e.forward, last=i == len(plan.rows) - 1):
            with e.amp():
                loss = loss_sum(e.forward, tensors, e.chunk_tokens, e.kernel, e.token_weights) / max(global_sup, 1)
            (loss * e.loss_factor).backward()
        step_loss += loss.detach().double()
    step_loss = sum_over_ranks(float(step_loss))
    # First step (vision parts: first step with images); then a no-op.
    e.grad_check(state.model, images=plan.vision_samples > 0)
    grad_norm = clip_grad_norm(e.params, e.max_grad_norm)
    lr = state.scheduler.get_last_lr()[0] / state.optimizer.param_groups[0]["lr_multiplier"]  # of train.lr
    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
    if finite:
        state.optimizer.step()
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, grad_norm, lr, finite, global_sup)


def next_samples(s: Session) -> list[Encoded]:
    """The step's usable samples on this rank (the whole step first: the loss is normalised by its supervised-
    token count); skipped ones are counted, and too many stop the run."""
    items = [it for _ in range(s.accum) for it in next(s.data.loaded)]
    metrics = s.state.metrics
    metrics.count(items)
    check_bad_fraction(metrics, s.recipe.data.max_bad_fraction, s.data.train_size)
    return [it for it in items if isinstance(it, Encoded)]


def train_loop(s: Session, stop: StopSignals) -> Path | None:
    """Steps until the last one; returns the checkpoint saved when a stop signal came, else None."""
    run, tcfg = s.state.run, s.recipe.train
    if run.pending_validation:  # stopped by a signal before the evaluations due at this step ran
        run_evaluations(s, run.step)
    run.pending_validation = False
    for step in range(run.step + 1, s.total_steps + 1):
        t0 = time.perf_counter()
        samples = next_samples(s)
        plan = s.data.batcher.plan(samples)
        result = train_step(s.state, s.engine, plan, s.data.batcher.stream(plan))
        run.step, run.last_loss = step, result.loss
        run.bad_in_row = 0 if result.finite else run.bad_in_row + 1
        run.nonfinite_steps += not result.finite
        log_step(s, result, samples, plan, time.perf_counter() - t0)
        if not result.finite:
            check_nonfinite(run, result.loss, result.grad_norm, tcfg.max_bad_steps, s.rank)

        if sum_over_ranks(float(stop.received is not None)) > 0:  # SIGTERM / SIGINT: save and stop
            run.pending_validation = evaluations_due(s, step)  # the resumed run evaluates first; RNG unaffected
            return save_checkpoint(s)
        run_evaluations(s, step)
        if s.recipe.checkpoint.every_steps and step % s.recipe.checkpoint.every_steps == 0:
            save_checkpoint(s)
    return None


def save_checkpoint(s: Session) -> Path:
    s.state.run.trackers = s.trackers.state(s.state.run.step)  # a resumed run continues the same tracker runs
    return s.ckpts.save(s.recipe, s.state)


def log_step(s: Session, result: StepResult, samples: list[Encoded], plan: Plan, elapsed: float) -> None:
    run = s.state.run
    tokens = sum_over_ranks(sum(x.length for x in samples))
    padding = sum_over_ranks(plan.padding)
    record = {"step": run.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
              "tokens": int(tokens),
              "supervised_tokens": result.supervised, "tokens_per_s": tokens / elapsed,
              "padding_fraction": padding / max(1.0, tokens + padding), "micro_batches": len(plan.rows),
              "epoch": s.state.sampler.epoch}
    if not result.finite:
        record.update(skipped_nonfinite=True, nonfinite_steps=run.nonfinite_steps)
    s.state.metrics.step(record, print_line=run.step % s.recipe.train.log_every_steps == 0 or run.step == 1)


def _due(every: int | None, step: int, last: int) -> bool:
    return bool(every and step % every == 0) or step == last


def due_now(s: Session, step: int) -> tuple[bool, bool]:
    """(validation loss, task evaluation) due at `step`."""
    val = s.data.val_loader is not None and _due(s.recipe.train.val_every_steps, step, s.total_steps)
    return val, s.evaluator is not None and _due(s.recipe.eval.every_steps, step, s.total_steps)


def evaluations_due(s: Session, step: int) -> bool:
    return any(due_now(s, step))


def run_evaluations(s: Session, step: int) -> None:
    """The validation loss and the task evaluation due at `step`; neither moves the training RNG streams."""
    val, evaluation = due_now(s, step)
    with preserve_rng():
        if val:
            s.state.run.last_val, n = validate(s)
            s.state.metrics.validation(step, s.state.run.last_val, n)
        if evaluation:
            run_evaluation(s, step)


def run_evaluation(s: Session, step: int) -> None:
    """Generation on the eval split, scored (vlmtune/evaluate.py): ``eval/step-N/`` and a metrics.jsonl line; with
    ``checkpoint.best`` the model of the best evaluation so far is kept in ``output_dir/best``."""
    ev, run = s.evaluator, s.state.run
    start = time.perf_counter()
    with eval_mode(s.state.model):
        result = evaluate_in_training(ev.generator, ev.dataset, s.recipe.eval, ev.metrics, ev.tags)
    if result is not None:  # rank 0
        rows, aggregate = result
        record = write_eval(s.out_dir / "eval" / f"step-{step:06d}", rows, aggregate, step,
                            time.perf_counter() - start)
        s.state.metrics.evaluation(step, len(rows), aggregate, record["seconds"])
    best = s.recipe.checkpoint.best
    if best is None:
        return
    # Rank 0's value on every rank; nan (never better) when no eval sample could be read.
    value = sum_over_ranks(result[1].get(best.metric, math.nan) if result is not None else 0.0)
    if better(value, run.best_value, best.metric, best.mode):
        run.best_value, run.best_step = value, step
        save_hf(s.state.model, s.processor, s.out_dir / "best")
        if s.rank == 0:
            (s.out_dir / "best" / "best.json").write_text(json.dumps(
                {"step": step, "metric": best.metric, "value": value}, indent=2) + "\n")


@torch.no_grad()
def validate(s: Session) -> tuple[float, int]:
    """The validation loss (summed token losses / supervised tokens, over every rank) and its token count."""
    e, model, limit = s.engine, s.state.model, s.recipe.train.val_max_batches
    total, count = 0.0, 0
    with eval_mode(model):
        for i, items in enumerate(s.data.val_loader):
            if limit is not None and i >= limit:
                break
            for batch in s.data.batcher([it for it in items if isinstance(it, Encoded)]):
                tensors = to_device(batch.tensors, e.device, e.dtype, e.cast_keys)
                with e.amp():
                    total += float(loss_sum(model, tensors, e.chunk_tokens, "torch", e.token_weights))
                count += supervised_count(tensors["labels"])
    total, count = sum_over_ranks(total), int(sum_over_ranks(count))
    return (total / count if count else float("nan")), count


def check_nonfinite(run: RunState, loss: float, grad_norm: float, max_bad: int, rank: int) -> None:
    """Report a skipped NaN/inf step; stop once `max_bad` came in a row."""
    if rank == 0:
        print(f"vlmtune: step {run.step}: loss {loss} / grad_norm {grad_norm} is not finite; step skipped "
              f"({run.bad_in_row} in a row, {run.nonfinite_steps} in all; train.max_bad_steps={max_bad})", flush=True)
    if run.bad_in_row >= max_bad:
        raise TrainingError(
            f"{run.bad_in_row} optimizer steps in a row (steps {run.step - run.bad_in_row + 1}-{run.step}) had a "
            f"NaN or inf loss or gradient norm (train.max_bad_steps={max_bad}), so training stopped. Usual causes: "
            "too high a train.lr (lower it, add train.warmup_steps, keep train.max_grad_norm set), float16 "
            "overflow (use bfloat16 or float32), or broken samples; the loss of each step is in metrics.jsonl")


def check_bad_fraction(metrics: Metrics, limit: float, dataset_size: int) -> None:
    """Stop once enough samples were seen (16, or the whole dataset if smaller) and too many were bad."""
    bad = sum(metrics.skipped.values())
    if metrics.seen >= min(16, dataset_size) and bad > limit * metrics.seen:
        raise DataError(f"{bad} of the first {metrics.seen} samples were unusable (more than "
                        f"data.max_bad_fraction={limit}); {metrics.skip_report()}")


# ---------------------------------------------------------------------------------------------------------
# The finish


def finish(s: Session, stopped_by: str | None, saved: Path | None) -> Path:
    """The final model (or, after a stop signal, the checkpoint) and the run summary."""
    run, metrics = s.state.run, s.state.metrics
    metrics.close()
    final = s.out_dir / "final"
    try:
        if saved is None:
            save_final(s, final)
    except (TrainingError, OutputError) as e:
        write_summary(s, stopped_by, saved, None, error=str(e))
        raise
    write_summary(s, stopped_by, saved, None if saved else final)
    if s.rank != 0:
        return saved or final
    if saved is not None:
        print(f"vlmtune: stopped by {stopped_by} after step {run.step} of {s.total_steps}; checkpoint saved: "
              f"{saved}\n  to continue, run the same command again with resume=auto (or resume={saved})",
              flush=True)
        return saved
    print(f"vlmtune: done. final loss {run.last_loss:.4f}"
          + (f", val_loss {run.last_val:.4f}" if run.last_val is not None else "")
          + f"; {metrics.skip_report()}\n  model: {final}\n  metrics: {s.out_dir / 'metrics.jsonl'}", flush=True)
    return final


def save_final(s: Session, final: Path) -> None:
    """The final Hugging Face folder: never one of NaN weights, and never at the cost of the run's last state (a
    final save that finds no space leaves a checkpoint of the last step to export later, where there is room)."""
    bad = nonfinite_parameters(s.state.model)
    if sum_over_ranks(len(bad)) > 0:
        done = s.ckpts.complete()
        raise TrainingError(
            f"the trained weights hold NaN or inf values ({', '.join(bad[:3]) or 'on another rank'}), so final/ was "
            f"not written; the last step's loss was {s.state.run.last_loss}. Lower train.lr or use bfloat16/float32"
            + (f"; the newest checkpoint is {done[-1]}" if done else ""))
    if not (s.sharded or s.rank == 0):
        return
    try:
        save_hf(s.state.model, s.processor, final)
    except OutputError as e:
        if s.world_size > 1 and not s.sharded:  # DDP: rank 0 alone saves; a checkpoint would need every rank
            raise
        done = [p for p in s.ckpts.complete() if p.name == f"step-{s.state.run.step:06d}"]
        ckpt = done[0] if done else save_checkpoint(s)  # may find no room either: then that error
        raise OutputError(f"{e}\n  final/ was not written; the run's last state is the checkpoint {ckpt}: free "
                          f"space, then `vlmtune export --checkpoint {ckpt} --out {final}`") from e


def write_summary(s: Session, stopped_by: str | None, saved: Path | None, final: Path | None,
                  error: str | None = None) -> None:
    """summary.json (rank 0): strict JSON, a NaN/inf value written as null."""
    if s.rank != 0:
        return
    run, metrics = s.state.run, s.state.metrics
    summary = {"steps": run.step, "total_steps": s.total_steps, "final_loss": run.last_loss,
               "final_val_loss": run.last_val, "samples_seen": metrics.seen, "skipped": dict(metrics.skipped),
               "skip_examples": dict(metrics.examples), "shortened": dict(metrics.shortened),
               "nonfinite_steps": run.nonfinite_steps, "final_model": str(final) if final else None}
    if saved is not None:
        summary.update(stopped_by=stopped_by, checkpoint=str(saved))
    if run.best_step is not None:
        summary["best"] = {"step": run.best_step, "metric": s.recipe.checkpoint.best.metric,
                           "value": run.best_value, "model": str(s.out_dir / "best")}
    if error is not None:
        summary["error"] = error
    clean = strict_json(summary)
    (s.out_dir / "summary.json").write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    s.trackers.summary(clean)
    try:  # the report is a view of the run's files: it never fails the run
        print(f"vlmtune: report: {build_report(s.out_dir)}", flush=True)
    except Exception as e:  # reported; `vlmtune report` can rebuild it
        print(f"vlmtune: warning: the run report could not be written ({e}); `vlmtune report "
              f"{s.out_dir}` tries again", flush=True)
