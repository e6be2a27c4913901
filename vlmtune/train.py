"""The training loop: read it top to bottom.

One optimizer step = ``accum`` micro-batches. Its loss is the sum of token losses over every supervised token
in the step divided by the number of those tokens (summed over micro-batches and, when distributed, over
ranks), so the result does not depend on how tokens fall into micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlmtune.attention import use_segment_attention
from vlmtune.batching import Batcher, check_packing, filler_sample, padding_tokens, rope_index_module
from vlmtune.checkpoint import (
    Checkpoints,
    RunState,
    StopSignals,
    ignore_stop_signals,
    preserve_rng,
    read_state,
    truncate_metrics,
)
from vlmtune.collate import IGNORE, Encoded, SampleEncoder, Skipped
from vlmtune.config import Recipe, recipe_to_yaml
from vlmtune.data.dataset import EpochSampler, SFTDataset
from vlmtune.data.formats import DataError
from vlmtune.kernels import require_liger, use_liger_norms
from vlmtune.loss import loss_sum
from vlmtune.metrics import Metrics
from vlmtune.model import apply_freeze, autocast_dtype, load_model, pick_device
from vlmtune.parallel import (
    clip_grad_norm,
    grad_scale,
    parallelize,
    process_group,
    resolve_strategy,
    save_final_sharded,
    sum_over_ranks,
    sync_context,
)
from vlmtune.peft import GradientCheck, apply_lora, param_groups, quantization_config


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many NaN/inf steps in a row)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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


def loader_batches(loader_for_epoch, sampler: EpochSampler) -> Iterator[list[Encoded | Skipped]]:
    """Endless lists of loaded samples; (sampler.epoch, sampler.offset) always points at the next unseen one."""
    while True:
        for items in loader_for_epoch():
            sampler.offset += len(items)
            yield items
        sampler.epoch, sampler.offset = sampler.epoch + 1, 0


def loader_kwargs(recipe: Recipe) -> dict:
    # Workers decode and process samples; the main process groups, pads or packs them (it needs the counts).
    return dict(batch_size=recipe.train.micro_batch_size, collate_fn=list, num_workers=recipe.data.num_workers,
                persistent_workers=False, worker_init_fn=ignore_stop_signals)


def train_stream(train_ds: SFTDataset, recipe: Recipe, rank: int = 0,
                 world_size: int = 1) -> tuple[EpochSampler, Iterator[list[Encoded | Skipped]]]:
    """This rank's resumable sampler and the endless stream of loaded samples the loop draws from
    (bench/data_path.py times this stream alone)."""
    sampler = EpochSampler(len(train_ds), recipe.train.seed, rank, world_size)
    loaded = loader_batches(lambda: DataLoader(train_ds, sampler=sampler, generator=loader_generator(
        recipe.train.seed, sampler.epoch), **loader_kwargs(recipe)), sampler)
    return sampler, loaded


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader's own generator (it seeds workers). Without one, every new loader iterator draws from the
    global torch RNG, so a resumed run, which starts its loader mid-epoch, would shift the dropout stream."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@torch.no_grad()
def validate(model, loader: DataLoader, batcher: Batcher, chunk_tokens: int | None, device, dtype, cast_keys, amp,
             max_batches: int | None) -> tuple[float, int]:
    model.eval()
    total, count = 0.0, 0
    for i, items in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        for batch in batcher([it for it in items if isinstance(it, Encoded)]):
            batch = to_device(batch, device, dtype, cast_keys)
            with amp():
                total += float(loss_sum(model, batch, chunk_tokens))
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train()
    total, count = sum_over_ranks(total), int(sum_over_ranks(count))
    return (total / count if count else float("nan")), count


def save_final(model, processor, out: Path) -> Path:
    """A Hugging Face folder, written beside its final place and renamed in, so it is whole or absent."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def finetune(recipe: Recipe) -> Path:
    """Train; returns the final model folder, or the checkpoint folder when SIGTERM / SIGINT stopped the run."""
    # Under torchrun (WORLD_SIZE > 1) the process group lives as long as the run; see vlmtune/parallel.py.
    with process_group(recipe.distributed.timeout_s, recipe.train.device, recipe.distributed.strategy), \
            StopSignals() as stop:
        return _finetune(recipe, stop)


def _finetune(recipe: Recipe, stop: StopSignals) -> Path:
    cfg, tcfg = recipe, recipe.train
    rank, world_size = world()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out_dir / "checkpoints", cfg.checkpoint.keep, writer=rank == 0)
    resume_from = ckpts.find(cfg.resume)  # None: a fresh run
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    if tcfg.kernels == "liger":
        require_liger(device)  # before the model loads: a wrong device or a missing package fails at once

    # Model, processor, family; freezing, or LoRA adapters (base frozen; freeze.<part> = no adapters there).
    model, processor, family = load_model(cfg.model, device, quantization_config(cfg.peft, device, cfg.model))
    if tcfg.packing:
        check_packing(family)
        use_segment_attention(model)  # sdpa per sample of a packed row, not over the whole row (vlmtune/attention.py)
    if tcfg.kernels == "liger":
        swapped = use_liger_norms(model)
        if rank == 0:
            print(f"vlmtune: train.kernels=liger: Liger's fused linear cross-entropy; {swapped} RMSNorm module(s) "
                  "replaced by Liger's", flush=True)
    if cfg.peft is not None:
        model, trainable = apply_lora(model, family, cfg.peft, cfg.freeze, cfg.model.name_or_path, cfg.model.revision)
    else:
        trainable = apply_freeze(model, family, cfg.freeze)
    weights_dtype = next(model.parameters()).dtype
    amp_dtype = autocast_dtype(device, weights_dtype)
    amp = (partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp_dtype
           else contextlib.nullcontext)
    # Several ranks: FSDP2 shards `model` in place, DDP wraps it (forward through `forward_model`, all else `model`).
    strategy = resolve_strategy(cfg.distributed, world_size)
    forward_model = parallelize(model, family, cfg.distributed, strategy, device)
    loss_factor = grad_scale(strategy, world_size)  # DDP / FSDP2 average gradients over ranks; we need the sum

    # Data: rows -> conversations -> encoded samples, in loader workers.
    encoder = SampleEncoder(processor, family, tcfg.max_length, tcfg.overlong)
    train_ds = SFTDataset(cfg.data.train, encoder, "data.train")
    val_ds = SFTDataset(cfg.data.validation, encoder, "data.validation") if cfg.data.validation else None
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    batcher = Batcher(pad_id, tcfg.micro_batch_size, tcfg.micro_batch_tokens, tcfg.packing,
                      rope_index_module(model) if tcfg.packing else None,
                      filler_sample(encoder) if world_size > 1 else None)
    sampler, loaded = train_stream(train_ds, cfg, rank, world_size)
    val_loader = None
    if val_ds is not None:
        val_sampler = EpochSampler(len(val_ds), tcfg.seed, rank, world_size, shuffle=False)
        val_loader = DataLoader(val_ds, sampler=val_sampler, generator=loader_generator(tcfg.seed, -1),
                                **loader_kwargs(cfg))

    accum = tcfg.global_batch_size // (tcfg.micro_batch_size * world_size)
    if accum < 1 or tcfg.global_batch_size % (tcfg.micro_batch_size * world_size):
        raise ValueError(f"train.global_batch_size={tcfg.global_batch_size} is not a multiple of "
                         f"micro_batch_size ({tcfg.micro_batch_size}) x world size ({world_size})")
    total_steps = tcfg.max_steps or math.ceil(tcfg.epochs * len(train_ds) / tcfg.global_batch_size)

    params = [p for p in model.parameters() if p.requires_grad]
    # One group per (part, decay / no decay): lr x optim.lr_multipliers[part]; norms and biases get no decay.
    optimizer = torch.optim.AdamW(param_groups(model, family, tcfg.lr, tcfg.weight_decay, cfg.optim.lr_multipliers),
                                  lr=tcfg.lr, betas=tcfg.betas,
                                  fused=device.type == "cuda" and not cfg.distributed.cpu_offload)
    grad_check = GradientCheck(model, family, enabled=tcfg.check_gradients)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=tcfg.warmup_steps, total=total_steps, schedule=tcfg.schedule,
                           min_ratio=tcfg.min_lr_ratio))

    start_step = read_state(resume_from)["step"] if resume_from is not None else 0
    metrics = Metrics(out_dir, total_steps, enabled=rank == 0, start_step=start_step)
    if rank == 0:
        (out_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"vlmtune: {family.name} model, {n_params:,} parameters, trainable by part {trainable}; "
              f"{len(train_ds)} training rows ({train_ds.format}); {total_steps} steps of "
              f"{tcfg.global_batch_size} samples ({accum} micro-batch(es) of {tcfg.micro_batch_size}) on "
              f"{device}", flush=True)

    # Resume: weights, optimizer, scheduler, data position, counters; the RNG states last, right before the loop.
    run = RunState()
    if resume_from is not None:
        run = ckpts.load(resume_from, recipe, model, optimizer, scheduler, sampler, metrics)
    elif rank == 0:
        truncate_metrics(metrics.path, 0)  # a fresh run: no lines of an earlier one in this output_dir

    cast_keys = family.cast_to_model_dtype
    val_args = (model, val_loader, batcher, tcfg.loss_chunk_tokens, device, weights_dtype, cast_keys, amp,
                tcfg.val_max_batches)
    if run.pending_validation and val_loader is not None:  # stopped by a signal before this validation ran
        with preserve_rng():
            run.last_val, n = validate(*val_args)
        metrics.validation(run.step, run.last_val, n)
    run.pending_validation = False
    saved = None  # the checkpoint written when a signal stops the run
    for step in range(run.step + 1, total_steps + 1):
        t0 = time.perf_counter()
        # Fetch the whole step first: the loss is normalised by the step's supervised-token count.
        items = [it for _ in range(accum) for it in next(loaded)]
        metrics.count(len(items), [it for it in items if isinstance(it, Skipped)])
        check_bad_fraction(metrics, cfg.data.max_bad_fraction, len(train_ds))
        samples = [it for it in items if isinstance(it, Encoded)]
        step_batches = batcher(samples)
        n_sup = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in step_batches)
        n_tok = sum(s.length for s in samples)
        n_pad = sum(padding_tokens(b) for b in step_batches)
        global_sup = sum_over_ranks(n_sup)

        step_loss = 0.0
        for i, b in enumerate(step_batches):
            b = to_device(b, device, weights_dtype, cast_keys)
            with sync_context(forward_model, last=i == len(step_batches) - 1):
                with amp():
                    loss = loss_sum(forward_model, b, tcfg.loss_chunk_tokens, tcfg.kernels) / max(global_sup, 1)
                (loss * loss_factor).backward()
            step_loss += float(loss.detach())
        step_loss = sum_over_ranks(step_loss)
        grad_check(model, step_batches)  # first step (vision parts: first step with images); then a no-op

        max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm is not None else float("inf")
        grad_norm = clip_grad_norm(params, max_norm)
        lr = scheduler.get_last_lr()[0] / optimizer.param_groups[0]["lr_multiplier"]  # train.lr, scheduled
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if finite:  # a NaN/inf step is skipped: no optimizer or scheduler step, its gradients dropped
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.step, run.last_loss = step, step_loss
        run.bad_in_row = 0 if finite else run.bad_in_row + 1
        run.nonfinite_steps += not finite

        elapsed = time.perf_counter() - t0
        global_tok, global_pad = sum_over_ranks(n_tok), sum_over_ranks(n_pad)
        record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(global_tok),
                  "supervised_tokens": int(global_sup), "tokens_per_s": global_tok / elapsed,
                  "padding_fraction": global_pad / max(1.0, global_tok + global_pad),
                  "micro_batches": len(step_batches), "epoch": sampler.epoch}
        if not finite:
            record.update(skipped_nonfinite=True, nonfinite_steps=run.nonfinite_steps)
        metrics.step(record, print_line=step % tcfg.log_every_steps == 0 or step == 1)
        if not finite:
            check_nonfinite(run, step_loss, grad_norm, tcfg.max_bad_steps, rank)

        val_due = val_loader is not None and ((tcfg.val_every_steps and step % tcfg.val_every_steps == 0)
                                              or step == total_steps)
        if sum_over_ranks(float(stop.received is not None)) > 0:  # SIGTERM / SIGINT: save and stop
            run.pending_validation = bool(val_due)  # the resumed run validates first; the RNG is unaffected
            saved = ckpts.save(recipe, run, model, optimizer, scheduler, sampler, metrics)
            break
        if val_due:
            with preserve_rng():  # validation must not move the training RNG streams
                run.last_val, n = validate(*val_args)
            metrics.validation(step, run.last_val, n)
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
            ckpts.save(recipe, run, model, optimizer, scheduler, sampler, metrics)

    metrics.close()
    last_loss, last_val = run.last_loss, run.last_val
    if saved is not None:
        if rank == 0:
            summary = {"steps": run.step, "total_steps": total_steps, "stopped_by": stop.received,
                       "checkpoint": str(saved), "final_loss": last_loss, "final_val_loss": last_val,
                       "samples_seen": metrics.seen, "skipped": dict(metrics.skipped),
                       "nonfinite_steps": run.nonfinite_steps, "final_model": None}
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"vlmtune: stopped by {stop.received} after step {run.step} of {total_steps}; checkpoint saved: "
                  f"{saved}\n  to continue, run the same command again with resume=auto (or resume={saved})",
                  flush=True)
        return saved
    final = out_dir / "final"
    if strategy == "fsdp2":  # every rank takes part in gathering the sharded weights
        save_final_sharded(model, processor, final)
    elif rank == 0:
        save_final(model, processor, final)
    if rank == 0:
        summary = {"steps": total_steps, "final_loss": last_loss, "final_val_loss": last_val,
                   "samples_seen": metrics.seen, "skipped": dict(metrics.skipped),
                   "nonfinite_steps": run.nonfinite_steps, "final_model": str(final)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"vlmtune: done. final loss {last_loss:.4f}"
              + (f", val_loss {last_val:.4f}" if last_val is not None else "")
              + f"; {metrics.skip_report()}\n  model: {final}\n  metrics: {out_dir / 'metrics.jsonl'}", flush=True)
    return final


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
