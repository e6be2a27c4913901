"""Optional fused CUDA kernels: ``train.kernels: liger`` (off by default; see docs/benchmarks.md for what it gains).

Liger Kernel's Triton kernels, used without patching transformers: the loss hands its fused linear
cross-entropy to Liger's (vlmtune/loss.py), and the RMSNorm modules of *this loaded model* are replaced by
Liger's, which compute the same formula (``LIGER_NORMS``). The parameters stay the same objects under the same
names, so PEFT targets, FSDP2 units, checkpoints and the exported model are unchanged.
"""

from __future__ import annotations

import torch

from vlmtune.errors import KernelError

INSTALL_HINT = "pip install liger-kernel (needs a CUDA GPU and Triton)"

# HF RMSNorm class -> (offset, casting mode) of the Liger RMSNorm that computes the same, see rms_norm_reference.
# tests/test_families.py checks every entry against the HF module (a weightless one as weight 1), and that every
# *RMSNorm class of every family is here. Modules without a weight (Llama 4's weightless norm, Gemma 3n's
# scale-free ones) are never replaced: there is no weight for Liger's kernel to fuse.
LIGER_NORMS: dict[str, tuple[float, str]] = {
    "Qwen2RMSNorm": (0.0, "llama"),
    "Qwen2VLRMSNorm": (0.0, "llama"),
    "Qwen2_5_VLRMSNorm": (0.0, "llama"),
    "Qwen3VLTextRMSNorm": (0.0, "llama"),
    "Qwen3VLMoeTextRMSNorm": (0.0, "llama"),
    "Qwen3_5RMSNorm": (1.0, "gemma"),
    "Qwen3_5MoeRMSNorm": (1.0, "gemma"),
    "Gemma3RMSNorm": (1.0, "gemma"),
    "Gemma3nRMSNorm": (0.0, "gemma"),
    "LlamaRMSNorm": (0.0, "llama"),
    "Llama4TextRMSNorm": (0.0, "llama"),
    "Llama4TextWeightlessRMSNorm": (0.0, "gemma"),  # transformers >= 5.25 (was Llama4TextL2Norm)
    "MistralRMSNorm": (0.0, "llama"),
    "Mistral3RMSNorm": (0.0, "llama"),
    "Mistral4RMSNorm": (0.0, "llama"),
    "PixtralRMSNorm": (0.0, "llama"),
    "Qwen3RMSNorm": (0.0, "llama"),
    "Idefics3RMSNorm": (0.0, "llama"),
    "InternVLVisionRMSNorm": (0.0, "llama"),
    "DeepseekV3RMSNorm": (0.0, "llama"),
}


def require_liger(device: torch.device) -> None:
    """Raise a KernelError that says how to fix it unless Liger's kernels can run on `device`."""
    if device.type != "cuda":
        raise KernelError(f"train.kernels=liger runs Triton kernels on CUDA, but training runs on {device}; "
                          "set train.kernels=torch (the default) or train on a GPU")
    try:
        import liger_kernel.ops  # noqa: F401
    except ImportError as e:
        raise KernelError(f"train.kernels=liger needs Liger Kernel, which cannot be imported ({e}): "
                          f"{INSTALL_HINT}, or set train.kernels=torch") from e


def norm_eps(module: torch.nn.Module) -> float:
    return float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))


def swappable_norms(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the RMSNorms that LIGER_NORMS maps and that have a 1-D weight (Gemma 3n's scale-free
    norms have none)."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__ in LIGER_NORMS and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
            and m.weight.dim() == 1]


def use_liger_norms(model: torch.nn.Module) -> int:
    """Replace the model's mapped RMSNorm modules by Liger's, keeping their weights; returns how many."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    swaps = swappable_norms(model)
    for name, old in swaps:
        offset, mode = LIGER_NORMS[type(old).__name__]
        # in_place=False: the in-place backward writes the input gradient into the output gradient's buffer, which
        # autograd may still hand to another consumer (Liger itself turns it off for Gemma 2 / 3).
        new = LigerRMSNorm(old.weight.shape[0], eps=norm_eps(old), offset=offset, casting_mode=mode, in_place=False)
        new.weight = old.weight  # the same Parameter: name, dtype, device and requires_grad unchanged
        model.set_submodule(name, new)
    return len(swaps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, mode: str) -> torch.Tensor:
    """What a Liger RMSNorm with (offset, casting mode) computes, in plain torch.

    llama: the normalisation in fp32, cast back to x's dtype, then times (offset + weight);
    gemma: everything in fp32, cast to x's dtype at the end.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if mode == "llama":
        return (offset + weight) * normed.to(x.dtype)
    if mode == "gemma":
        return (normed * (offset + weight.float())).to(x.dtype)
    raise ValueError(f"unknown casting mode {mode!r}")
