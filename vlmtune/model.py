"""Load a model and its processor (hub id or local folder), pick dtype and attention, freeze parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

from vlmtune.config import FreezeConfig, ModelConfig
from vlmtune.errors import ModelLoadError
from vlmtune.families import Family, family_for, frozen_parts, part_of
from vlmtune.models import register_native_models


def pick_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("train.device=cuda, but no CUDA device is visible; use train.device=auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def pick_dtype(choice: str) -> torch.dtype:
    """Weights dtype. ``auto`` keeps fp32 master weights; on CUDA the loop then autocasts to bf16."""
    return torch.float32 if choice == "auto" else getattr(torch, choice)


def autocast_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype | None:
    if device.type == "cuda" and weights == torch.float32 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _load_error(cfg: ModelConfig, what: str, err: Exception) -> ModelLoadError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "custom code" in str(err) or "trust_remote_code" in str(err):
        hint = ("this model ships its own Python code (auto_map in its config); vlmtune runs such code only when "
                "the recipe says model.trust_remote_code: true. Set it only if you trust that code; Kimi-VL and "
                "Nemotron-Parse need no remote code in vlmtune")
    elif Path(cfg.name_or_path).exists():
        hint = f"the folder {cfg.name_or_path!r} exists but its {what} could not be read; is it complete?"
    else:
        hint = (f"{cfg.name_or_path!r} is not a local folder, so it was looked up on the Hugging Face Hub and that "
                "failed. If this machine is offline (or HF_HUB_OFFLINE=1), download the model elsewhere "
                f"(`hf download {cfg.name_or_path} --local-dir ./model`) and set model.name_or_path to that folder; "
                "gated models (Llama, Gemma) also need `hf auth login`")
    return ModelLoadError(f"could not load the {what} of model.name_or_path={cfg.name_or_path!r}: {first}\n  {hint}")


def load_config(cfg: ModelConfig) -> PretrainedConfig:
    register_native_models()
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, "config", e) from e


def load_processor(cfg: ModelConfig):
    """The model's processor, with ``cfg.processor_kwargs`` applied where they belong (see `_with_options`)."""
    register_native_models()
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(cfg.name_or_path, **common)
        rest = _with_options(processor, cfg.processor_kwargs)
        if rest:  # options of the processor itself (or its tokenizer): from_pretrained hands them on
            processor = AutoProcessor.from_pretrained(cfg.name_or_path, **common, **rest)
            _with_options(processor, cfg.processor_kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(cfg, "processor", e) from e
    return processor


MEDIA_PROCESSORS = ("image_processor", "video_processor")


def _with_options(processor, options: dict) -> dict:
    """Rebuild the image / video processor with the options it takes (``max_pixels``, ``do_image_splitting`` ...),
    as from_pretrained would; returns the options neither takes. Options handed to ``AutoProcessor.from_pretrained``
    would also land in the tokenizer's init kwargs, and the processor passes those back into every image call,
    where transformers 5.25 deprecates them (``min_pixels`` / ``max_pixels``)."""
    taken: set[str] = set()
    for attr in MEDIA_PROCESSORS:
        sub = getattr(processor, attr, None)
        valid = getattr(getattr(sub, "valid_kwargs", None), "__annotations__", {})
        mine = {k: v for k, v in options.items() if k in valid}
        if mine:
            setattr(processor, attr, type(sub).from_dict(sub.to_dict(), **mine))
            taken |= mine.keys()
    return {k: v for k, v in options.items() if k not in taken}


def load_model(cfg: ModelConfig, device: torch.device, quantization_config=None,
               processor_path: str | None = None) -> tuple[torch.nn.Module, object, Family]:
    """Model (on `device`, train mode), processor, and the family row that describes it.

    ``quantization_config`` (QLoRA, see vlmtune/peft.py) loads the weights quantized, straight onto `device`.
    ``processor_path``: load the processor from that folder instead (e.g. the one saved beside an adapter).
    """
    hf_config = load_config(cfg)
    family = family_for(hf_config.model_type)
    processor = load_processor(cfg if processor_path is None else
                               cfg.model_copy(update={"name_or_path": str(processor_path)}))
    dtype = pick_dtype(cfg.dtype)
    quantized = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                        "device_map": {"": device}}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
            attn_implementation=cfg.attn_implementation or family.attn_implementation, **quantized,
        )
    except (OSError, ValueError) as e:
        raise _load_error(cfg, "weights", e) from e
    if not quantized:  # quantized weights are placed by device_map and cannot be moved
        model.to(device)
    apply_load_fixes(model, family)
    for name in unused_parameters(model, family):
        model.get_parameter(name).requires_grad_(False)
    model.train()
    return model, processor, family


def unused_parameters(model: torch.nn.Module, family: Family) -> list[str]:
    """Names of the parameters the forward never uses, by design (``Family.unused_params``, and the vision layers
    after ``config.vision_feature_layer`` under ``Family.feature_layers``)."""
    prefixes = list(family.unused_params)
    chosen = getattr(model.config, "vision_feature_layer", None)
    # A checkpoint of the family with another vision tower may lack that module: then nothing is known unused.
    if family.feature_layers and chosen is not None and _has_submodule(model, family.feature_layers):
        n = len(model.get_submodule(family.feature_layers))
        # hidden_states[k] is the output of the first k layers (hidden_states[0]: the embeddings).
        k = max(i if i >= 0 else n + 1 + i for i in ([chosen] if isinstance(chosen, int) else chosen))
        prefixes += [f"{family.feature_layers}.{i}" for i in range(k, n)]
    return [name for name, _ in model.named_parameters()
            if any(name == p or name.startswith(p + ".") for p in prefixes)]


def _has_submodule(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _llama4_language_model_image_outputs(model: torch.nn.Module) -> None:
    """transformers 5.24.0: ``Llama4ForConditionalGeneration.forward`` builds its output with
    ``image_outputs=outputs.image_outputs``, where ``outputs`` is its language model's ``MoeCausalLMOutputWithPast``,
    which has no such field, so every forward raises AttributeError (fixed in 5.25.0). A forward hook on this
    model's language model gives that output the attribute (None, as for a forward without images). No class is
    changed."""

    def add_image_outputs(module, args, output):
        if not isinstance(output, tuple) and not hasattr(output, "image_outputs"):
            output.image_outputs = None
        return output

    model.get_submodule("language_model").register_forward_hook(add_image_outputs)


@dataclass(frozen=True)
class LoadFix:
    """A workaround for an upstream bug, applied at load to models of the families that name it, and only under
    the transformers releases that have the bug: ``first`` <= version < ``fixed``. tests/test_load_fixes.py checks
    on the installed release that the fix is needed where it is applied and that the stock model works elsewhere."""

    apply: Callable[[torch.nn.Module], None]
    first: str  # first transformers release with the bug
    fixed: str  # first release without it

    def needed(self, version: str = transformers.__version__) -> bool:
        return Version(self.first) <= Version(version) < Version(self.fixed)


# Family.load_fixes names -> fixes for upstream bugs.
LOAD_FIXES = {"llama4_language_model_image_outputs": LoadFix(_llama4_language_model_image_outputs, "5.24.0", "5.25.0")}


def apply_load_fixes(model: torch.nn.Module, family: Family) -> torch.nn.Module:
    """Apply the family's workarounds for upstream bugs (``Family.load_fixes``) that this transformers needs."""
    for name in family.load_fixes:
        if LOAD_FIXES[name].needed():
            LOAD_FIXES[name].apply(model)
    return model


def parameter_parts(model: torch.nn.Module, family: Family) -> dict[str, str | None]:
    """name -> part for every parameter (None: belongs to no named part, e.g. an audio tower)."""
    return {name: part_of(name, family) for name, _ in model.named_parameters()}


def apply_freeze(model: torch.nn.Module, family: Family, freeze: FreezeConfig) -> dict[str, int]:
    """Freeze the parts the recipe asks for; returns trainable parameter counts per part."""
    frozen = frozen_parts(freeze)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = part_of(name, family)
        if part in frozen:
            param.requires_grad_(False)
        if param.requires_grad:
            counts[str(part)] = counts.get(str(part), 0) + param.numel()
    return counts
