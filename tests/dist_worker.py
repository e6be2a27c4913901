"""What tests/test_distributed.py launches with torchrun: one finetune, optionally with a rank made to fail.

    torchrun --nproc-per-node 2 tests/dist_worker.py RECIPE.yaml [--fail-rank R --fail-step N]

With --fail-rank, that rank raises in the forward of its N-th micro-batch; the others must then exit with an
error (gloo notices the closed connection, or the collective times out after distributed.timeout_s).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-step", type=int, default=1)
    args = p.parse_args()

    import vlmtune.train as train
    from vlmtune.config import load_recipe

    if args.fail_rank is not None and int(os.environ.get("RANK", "0")) == args.fail_rank:
        real, calls = train.loss_sum, [0]

        def failing(model, batch):
            calls[0] += 1
            if calls[0] >= args.fail_step:
                raise RuntimeError(f"injected failure on rank {args.fail_rank}")
            return real(model, batch)

        train.loss_sum = failing
    train.finetune(load_recipe(args.recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
