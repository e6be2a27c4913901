"""Evaluation: greedy generation on a data split, scored by task metrics (vlmtune/scores.py).

``vlmtune evaluate -c RECIPE`` scores a model (the run's final/ folder by default, an adapter, or any model) and
writes ``DIR/predictions.jsonl`` (one row per sample: index, prompt, reference, prediction, scores) and
``DIR/metrics.json``; ``vlmtune evaluate --predictions FILE --metrics m1,m2`` scores an existing file again, with no
model. During training (recipe section ``eval``) the same runs every ``eval.every_steps`` and after the last step:
each rank generates for its share of the samples, the rows are gathered, and rank 0 scores every sample exactly
once, so a run on N ranks scores what one rank would. Think blocks (``<think>...</think>``, Kimi's
``◁think▷...◁/think▷``: the family's ``think_tags``) are stripped from predictions before scoring.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vlmtune.config import EvalConfig, Recipe
from vlmtune.data.dataset import ConversationDataset
from vlmtune.errors import RecipeError
from vlmtune.families import Family
from vlmtune.generate import Generator, predict, split_dataset, split_model_and_data, split_spec
from vlmtune.parallel import max_over_ranks, world
from vlmtune.scores import DEFAULT_METRICS, METRICS, check_metrics, rescore_file, score_rows


@dataclass
class Evaluator:
    """What evaluation during training needs, built once at set-up."""

    generator: Generator
    dataset: ConversationDataset
    metrics: list[str]
    tags: tuple[str, str] | None


def evaluator_for(recipe: Recipe, model: torch.nn.Module, processor, family: Family) -> Evaluator | None:
    """The evaluator of the recipe's ``eval`` section (None without one)."""
    ecfg = recipe.eval
    if ecfg is None:
        return None
    ds = split_dataset(recipe, ecfg.split, split_spec(recipe, ecfg.split, "eval"), processor)
    return Evaluator(Generator(model, processor, family, ecfg.max_new_tokens), ds, metrics_for(ecfg, ds.format),
                     think_tags(ecfg, family))


def metrics_for(ecfg: EvalConfig, data_format: str) -> list[str]:
    """The recipe's metrics, or the default ones of the data format."""
    return check_metrics(ecfg.metrics or DEFAULT_METRICS[data_format])


def think_tags(ecfg: EvalConfig, family: Family) -> tuple[str, str] | None:
    return family.think_tags if ecfg.strip_thinking else None


def score(rows: list[dict], metrics: list[str], tags: tuple[str, str] | None) -> dict[str, float]:
    """Scores each row in place (``row["scores"]``) and returns the aggregate over all rows."""
    per_row, total = score_rows(rows, metrics, think_tags=tags)
    for row, values in zip(rows, per_row, strict=True):
        row["scores"] = values
    return total


def write(folder: Path, rows: list[dict], aggregate: dict[str, float], step: int | None = None,
          seconds: float | None = None) -> dict:
    """``folder/predictions.jsonl`` (rows sorted by index) and ``folder/metrics.json``, whose record it returns;
    ``seconds``: how long generating the rows took (with its samples/s)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.jsonl").open("w") as f:
        for row in sorted(rows, key=lambda r: r["index"]):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    record = {"step": step, "samples": len(rows), "metrics": aggregate}
    if seconds is not None:
        record.update(seconds=round(seconds, 3), samples_per_s=round(len(rows) / seconds, 3))
    (folder / "metrics.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return record


def evaluate_recipe(recipe: Recipe, out: str | Path, split: str | None = None, model_path: str | None = None,
                    adapter: str | None = None, limit: int | None = None) -> dict:
    """``vlmtune evaluate -c RECIPE``: one process, the recipe's ``eval`` settings (its defaults without one).
    Returns the metrics.json record."""
    ecfg = recipe.eval or EvalConfig()
    model, processor, family, ds = split_model_and_data(recipe, split or ecfg.split, model_path, adapter, "evaluate")
    metrics = metrics_for(ecfg, ds.format)
    gen = Generator(model, processor, family, ecfg.max_new_tokens)
    n = min(x for x in (len(ds), limit, ecfg.max_samples) if x is not None)
    skipped: list = []
    start = time.perf_counter()
    rows = list(predict(gen, ds, range(n), ecfg.batch_size, skipped))
    seconds = time.perf_counter() - start
    for i, reason in skipped:
        print(f"vlmtune evaluate: skipped sample {i} ({reason})", file=sys.stderr)
    if not rows:
        raise RecipeError(f"evaluate: none of the {n} samples could be read; see the reasons above")
    return write(Path(out), rows, score(rows, metrics, think_tags(ecfg, family)), seconds=seconds)


def rescore(predictions: str | Path, metrics: list[str], out: str | Path) -> dict:
    """``vlmtune evaluate --predictions FILE --metrics ...``: the same numbers from the same rows, no model.
    Returns the metrics.json record."""
    rows, aggregate = rescore_file(predictions, metrics)
    for i, row in enumerate(rows):
        row.setdefault("index", i)
    return write(Path(out), rows, aggregate)


def evaluate_in_training(gen: Generator, ds: ConversationDataset, ecfg: EvalConfig, metrics: list[str],
                         tags: tuple[str, str] | None) -> tuple[list[dict], dict[str, float]] | None:
    """Every rank generates for its share of the first ``eval.max_samples`` samples (the same number of batches on
    every rank, a rank short of samples repeating one, and ``synced_gpus`` so that sharded forwards stay in step);
    rank 0 gathers the rows, drops the repeats, and scores each sample once. Returns (rows, aggregate) on rank 0,
    None on the others."""
    rank, world_size = world()
    n = len(ds) if ecfg.max_samples is None else min(ecfg.max_samples, len(ds))
    mine = list(range(rank, n, world_size)) or [0]
    need = max_over_ranks(-(-len(mine) // ecfg.batch_size)) * ecfg.batch_size  # the most batches of any rank
    mine += [mine[-1]] * (need - len(mine))
    kwargs = {"synced_gpus": True} if world_size > 1 else {}
    rows = list(predict(gen, ds, mine, ecfg.batch_size, **kwargs))
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    if rank != 0:
        return None
    unique = {row["index"]: row for row in rows if row["index"] < n}
    rows = [unique[i] for i in sorted(unique)]
    return rows, (score(rows, metrics, tags) if rows else {})


def better(value: float, best: float | None, metric: str, mode: str | None) -> bool:
    """Whether `value` beats `best` (None: nothing yet) for `metric`, maximised unless ``mode`` or the metric's
    direction says otherwise (error rates are minimised)."""
    if not math.isfinite(value):  # no score (no eval sample could be read): never the best
        return False
    maximise = (mode or ("max" if METRICS[metric].higher_is_better else "min")) == "max"
    return best is None or (value > best if maximise else value < best)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) and without gradients for the block; its training mode after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)
