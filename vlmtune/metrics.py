"""metrics.jsonl, the experiment trackers, console progress, and the counts of the end-of-run summary.

Progress: in a terminal, one live tqdm line (step / total, ETA, loss, lr, tokens/s, samples skipped so far);
elsewhere (CI, SLURM logs) a plain line every ``train.log_every_steps`` steps.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from vlmtune.encode import Encoded, Skipped
from vlmtune.trackers import Trackers


def strict_json(record: dict) -> dict:
    """The record with NaN / inf values (a skipped step, see checkpoint.py) as None: written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class Metrics:
    """One JSON object per line in ``output_dir/metrics.jsonl``, the same numbers to the trackers; only the writing
    rank writes."""

    def __init__(self, output_dir: Path, total_steps: int, enabled: bool = True, start_step: int = 0,
                 trackers: Trackers | None = None):
        self.enabled = enabled
        self.trackers = trackers
        self.path = output_dir / "metrics.jsonl"
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled or not sys.stderr.isatty(),
                        dynamic_ncols=True, desc="train")
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # one message per skip reason, for the summary
        self.shortened: Counter[str] = Counter()  # samples over train.max_length made to fit, by train.overlong
        self.seen = 0

    def write(self, record: dict, tracked: dict | None = None) -> None:
        """A line of metrics.jsonl, and `tracked` (default: the record's numbers) to the trackers at its step."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        if self.trackers is not None:
            self.trackers.log(record["step"], tracked if tracked is not None else record)

    def step(self, record: dict, print_line: bool) -> None:
        self.write(record)
        if not self.enabled:
            return
        skipped = sum(self.skipped.values())
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", skipped=skipped)
        if print_line and self.bar.disable:
            print(f"step {record['step']:>5}/{self.bar.total} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                  f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | skipped {skipped}",
                  flush=True)

    def validation(self, step: int, val_loss: float, tokens: int) -> None:
        self.write({"step": step, "val_loss": val_loss, "val_tokens": tokens})
        if self.enabled:
            tqdm.write(f"step {step:>5} | val_loss {val_loss:.4f} ({tokens} tokens)")

    def evaluation(self, step: int, samples: int, aggregate: dict[str, float], seconds: float) -> None:
        # The time goes to the log line and eval/step-N/metrics.json; metrics.jsonl's eval records stay deterministic.
        self.write({"step": step, "eval_samples": samples, "eval": aggregate},
                   {"eval_samples": samples, **{f"eval/{k}": v for k, v in aggregate.items()}})
        if self.enabled:
            shown = " | ".join(f"{k} {v:.4f}" for k, v in aggregate.items())
            tqdm.write(f"step {step:>5} | eval ({samples} samples, {seconds:.1f} s) | {shown}")

    def count(self, items: list[Encoded | Skipped]) -> None:
        """Count a step's loaded items: Skipped ones by reason (with an example each), shortened ones by how."""
        self.seen += len(items)
        for it in items:
            if isinstance(it, Skipped):
                self.skipped[it.reason] += 1
                self.examples.setdefault(it.reason, it.message)
            elif isinstance(it, Encoded) and it.shortened:
                self.shortened[it.shortened] += 1

    def skip_report(self) -> str:
        short = "".join(f"; {n} sample(s) over train.max_length shortened by train.overlong={how} (never through "
                        "image tokens; a cut answer is not taught to end)" for how, n in self.shortened.items())
        if not self.skipped:
            return "no samples skipped" + short
        lines = [f"{n} x {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.most_common()]
        return (f"skipped {sum(self.skipped.values())} of {self.seen} samples:\n    " + "\n    ".join(lines)
                + short)

    def close(self) -> None:
        self.bar.close()
