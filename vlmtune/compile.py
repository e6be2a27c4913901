"""Regional ``torch.compile`` (``train.compile: true``): each decoder layer and vision block compiled on its own.

The regions are the model's ``GradientCheckpointingLayer`` modules (transformers' decoder layers and vision blocks
in every supported family; the same units activation checkpointing uses), compiled in place with
``nn.Module.compile``, so parameter names, PEFT adapters, FSDP2 units and checkpoints are unchanged and the rest of
the model (embeddings, mask and position set-up, the loss) stays eager. Layers of one kind share their compiled
code: the compile cost is one layer's, not the model's.

Shapes: the regions are compiled with dynamic shapes, so a new sequence or image length does not recompile; the
batcher rounds the integer length bounds the attention reads (``max_length_q``, ``max_seqlen`` ...) up to a power
of two (vlmtune/attention.py, ``host_inputs(bucket=True)``), so those take a few values over a run, not one per
batch. tests/test_compile.py checks both: the same loss and gradients as eager, and no recompiles after the first
steps of a run with changing lengths.

When it pays: the fusion (RMSNorm in fp32, rotary, SwiGLU, residual adds) saves GPU time per step, compiling costs
time once per process (docs/benchmarks.md has the measured numbers); on CPU it only costs.
"""

from __future__ import annotations

import torch

from vlmtune.errors import KernelError

BACKEND = "inductor"


def compile_regions(model: torch.nn.Module, backend: str | None = None) -> int:
    """Compile every decoder layer and vision block of `model` in place; returns how many. ``backend``: torch's
    (the tests use ``aot_eager``: the same capture, guards and autograd graphs without generating kernels)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    regions = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not regions:
        raise KernelError(f"train.compile: {type(model).__name__} has no decoder layers or vision blocks that "
                          "transformers marks as such (GradientCheckpointingLayer); set train.compile=false")
    for module in regions:
        module.compile(dynamic=True, backend=backend or BACKEND)
    return len(regions)
