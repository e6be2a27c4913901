"""What tests/test_distributed.py launches with torchrun: several fine-tunes, one after another, in one process group.

    torchrun --nproc-per-node N tests/dist_worker.py A.yaml [B.yaml ...] [--fail-rank R --fail-step K]
                                                                          [--no-space-at-save K]

Starting the processes and importing torch / transformers costs more than a test run, so the tests put their runs
in as few launches as they can. The group is started once here (``vlmtune.parallel.process_group``, with the
shortest ``distributed.timeout_s`` of the recipes, and also with one process, so that one launch can hold
one-rank FSDP2 runs); ``finetune`` leaves a group it did not start alone. Rank 0 prints
"dist_worker: start PATH TIME" and "dist_worker: done PATH" around each run. A run that raises ends the launch:
the group is then in an unknown state.

With --fail-rank, that rank raises in the forward of its K-th micro-batch of the *last* recipe; the others must
then exit with an error (gloo notices the closed connection, or the collective times out after timeout_s).
With --no-space-at-save, the last recipe's K-th checkpoint meets a full disk midway.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def fail_at_forward(rank: int, k: int) -> None:
    """Raise in the K-th forward of the whole model (the module that owns ``lm_head``), whatever the loop's own
    helpers are called: a global forward pre-hook, not a patched function."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    calls = [0]

    def hook(module, args):
        if any(name == "lm_head" for name, _ in module.named_children()):
            calls[0] += 1
            if calls[0] >= k:
                raise RuntimeError(f"injected failure on rank {rank}")

    register_module_forward_pre_hook(hook)


def no_space_at_save(k: int) -> None:
    """The K-th checkpoint this process writes fails as a full disk does, midway (after DCP wrote the shards):
    vlmtune's own file writer raises ENOSPC for the rank's RNG file."""
    import errno

    import vlmtune.checkpoint as checkpoint

    real, calls = checkpoint._write_torch, [0]

    def write(path, obj):
        if path.name.startswith("rng-"):
            calls[0] += 1
            if calls[0] >= k:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    checkpoint._write_torch = write


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("recipes", nargs="+")
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-step", type=int, default=1)
    p.add_argument("--no-space-at-save", type=int, help="the last recipe's K-th checkpoint save meets a full disk")
    args = p.parse_args()

    from vlmtune.config import load_recipe
    from vlmtune.parallel import process_group
    from vlmtune.train import finetune

    recipes = [load_recipe(r) for r in args.recipes]
    rank = int(os.environ.get("RANK", "0"))
    timeout = min(r.distributed.timeout_s for r in recipes)
    with process_group(timeout, recipes[0].train.device, strategy="fsdp2"):  # fsdp2: start it for one rank too
        for i, (path, recipe) in enumerate(zip(args.recipes, recipes, strict=True)):
            if rank == 0:
                print(f"dist_worker: start {path} {time.time():.3f}", flush=True)
            if i == len(recipes) - 1 and args.fail_rank == rank:
                fail_at_forward(rank, args.fail_step)
            if i == len(recipes) - 1 and args.no_space_at_save:
                no_space_at_save(args.no_space_at_save)
            finetune(recipe)
            if rank == 0:
                print(f"dist_worker: done {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
