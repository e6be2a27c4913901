"""What trains: LoRA / DoRA adapters through ``peft``, per-part learning rates, and the first-step gradient check.

Adapters go on an explicit list of module names computed from the family table (:func:`part_of`), never on
peft's ``"all-linear"`` (which also hits the vision tower and projector of most VLMs). By default every
``nn.Linear`` of the language model except the output head gets an adapter; ``peft.vision`` and
``peft.projector`` add those parts. With adapters every base weight is frozen, and ``freeze.<part>: true``
means "no adapters in that part" (asking for adapters in a frozen part is a recipe error). MoE experts stored as
fused 3-D weights (``Family.expert_params``) are no ``nn.Linear``: they get adapters through peft's
``target_parameters``, where peft can (LoRA without dropout).

Name patterns (``peft.target_modules``, ``exclude_modules``, ``modules_to_save``) are names or globs matched
against any dotted piece of a module's name that ends at a module boundary, so ``q_proj``,
``self_attn.q_proj``, ``*.q_proj`` and ``layers.0`` all work; a pattern that names a block (``self_attn``,
``layers.0``) selects the layers inside it.

``peft`` and ``bitsandbytes`` are imported only when used.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from vlmtune.config import ModelConfig, PeftConfig
from vlmtune.errors import AdapterError, GradientCheckError
from vlmtune.families import VISION_PARTS, Family, family_for, frozen_parts, part_of
from vlmtune.parallel import max_over_ranks

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's parameter names
ADAPTED_PARTS_SWITCH = {"vision_tower": "peft.vision", "projector": "peft.projector",
                        "language_model": "freeze.language_model=false"}
_LORA_FACTOR = re.compile(r"\.lora_(embedding_)?([AB])(?=\.|$)")
_BASE_LAYERS = re.compile(r"(\.base_layer)+$")


def _import_peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise AdapterError(f"LoRA needs the peft package ({e}); pip install peft") from e
    return peft


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` on every wrap: not the user's doing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ---------------------------------------------------------------------------------------------------------
# Names and parts


def param_part(name: str, family: Family) -> str | None:
    """The part of a parameter or module, also under a PeftModel (``base_model.model.`` prefix)."""
    return part_of(name.removeprefix(PEFT_PREFIX), family)


def _pieces(name: str) -> Iterable[str]:
    """Every dotted piece of `name` that ends at a module boundary: for a.b.c -> a.b.c, b.c, c, a.b, b, a."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        for start in range(end):
            yield ".".join(parts[start:end])


def name_matches(name: str, pattern: str) -> bool:
    """`pattern` (a name or glob) names module `name` or one of the blocks that contain it."""
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(piece, pattern) for piece in _pieces(name))
    return pattern in set(_pieces(name))


def _supported_layer(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | torch.nn.Embedding | torch.nn.Conv1d | torch.nn.Conv2d
                      | torch.nn.Conv3d | Conv1D)


def adapted_parts(pcfg: PeftConfig, freeze) -> tuple[str, ...]:
    """The parts that get adapters: the language model unless frozen, plus the vision switches."""
    return tuple(part for part, on in (("vision_tower", pcfg.vision), ("projector", pcfg.projector),
                                       ("language_model", not freeze.language_model)) if on)


def _examples(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def lora_targets(model: torch.nn.Module, family: Family, pcfg: PeftConfig, freeze) -> list[str]:
    """The full names of the modules that get adapters, in model order.

    Layers the forward never uses by design (the family table's unused parameters, e.g. LLaVA's vision layers
    after ``vision_feature_layer``) get none: their adapters would never train.
    """
    from vlmtune.model import unused_parameters

    parts = adapted_parts(pcfg, freeze)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    unused = set(unused_parameters(model, family))
    layers = [(name, part_of(name, family), m) for name, m in model.named_modules() if _supported_layer(m)
              and not all(f"{name}.{p}" in unused for p, _ in m.named_parameters())]
    # Plain linears only: a subclass with its own forward (Llama 4's router returns a tuple) breaks LoRA's wrapper.
    linear = [(n, part) for n, part, m in layers
              if isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward and m is not head
              and not n.endswith(family.no_adapters)]
    patterns = pcfg.target_modules or ["all-linear"]
    # Modules holding fused expert weights: no layer here, adapted through peft's target_parameters instead.
    experts = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()
               if family.expert_params and n.endswith(family.expert_params) and part_of(n, family) in parts}
    chosen: set[str] = set()
    for pattern in patterns:
        pool = linear if pattern == "all-linear" else [(n, part) for n, part, _ in layers]
        hits = [n for n, part in pool if part in parts and (pattern == "all-linear" or name_matches(n, pattern))]
        if not hits and any(name_matches(m, pattern) for m in experts):
            continue  # see expert_parameter_targets
        if not hits:
            elsewhere = [(n, part) for n, part in pool if part not in parts
                         and (pattern == "all-linear" or name_matches(n, pattern))]
            if elsewhere:
                where = sorted({str(part) for _, part in elsewhere})
                switches = [ADAPTED_PARTS_SWITCH[p] for p in where if p in ADAPTED_PARTS_SWITCH]
                raise AdapterError(
                    f"peft.target_modules pattern {pattern!r} matches only layers outside the parts that get "
                    f"adapters ({', '.join(parts) or 'none'}): {_examples([n for n, _ in elsewhere])} in "
                    f"{', '.join(where)}" + (f"; set {' / '.join(switches)} to adapt them" if switches else ""))
            raise AdapterError(f"peft.target_modules pattern {pattern!r} matches no layer of the model; "
                               f"layer names look like {_examples([n for n, _, _ in layers], 6)}")
        chosen.update(hits)
    for pattern in pcfg.exclude_modules:
        if not any(name_matches(n, pattern) for n, _ in model.named_modules() if n):
            raise AdapterError(f"peft.exclude_modules pattern {pattern!r} matches no module of the model")
        chosen = {n for n in chosen if not name_matches(n, pattern)}
    targets = [n for n, _, _ in layers if n in chosen]
    if not targets and any(name_matches(m, p) and not any(name_matches(m, x) for x in pcfg.exclude_modules)
                           for m in experts for p in patterns):
        return targets  # only fused experts: their parameter adapters are all there is
    if not targets:
        raise AdapterError("peft: no layer is left to adapt after peft.exclude_modules "
                           f"{pcfg.exclude_modules}; exclude fewer")
    return targets


def expert_parameter_targets(model: torch.nn.Module, family: Family, pcfg: PeftConfig, freeze) -> list[str]:
    """Full names of the fused MoE expert weights (``Family.expert_params``) that get adapters through peft's
    ``target_parameters``: in a part that gets adapters, chosen by ``peft.target_modules`` (the default, or a pattern
    naming the experts module) and not excluded. Empty where peft cannot adapt a parameter: with DoRA or dropout
    (peft's parameter adapters support neither), with a warning saying how to include them."""
    if not family.expert_params:
        return []
    parts = adapted_parts(pcfg, freeze)
    patterns = pcfg.target_modules or ["all-linear"]
    chosen = []
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if not name.endswith(family.expert_params) or part_of(name, family) not in parts:
            continue
        if not any(p == "all-linear" or name_matches(module, p) for p in patterns):
            continue
        if not any(name_matches(module, p) for p in pcfg.exclude_modules):
            chosen.append(name)
    if chosen and (pcfg.method == "dora" or pcfg.dropout):
        warnings.warn(f"peft: the {len(chosen)} fused MoE expert weights ({_examples(chosen, 2)}) get no adapters: "
                      f"peft adapts such parameters only with method=lora and dropout=0 (got method={pcfg.method}, "
                      f"dropout={pcfg.dropout}); set peft.dropout=0 to adapt them", stacklevel=2)
        return []
    return chosen


def save_targets(model: torch.nn.Module, family: Family, pcfg: PeftConfig, freeze, targets: Sequence[str]) -> list[str]:
    """Full names of the modules trained in full beside the adapters (peft.modules_to_save), outermost only."""
    frozen = frozen_parts(freeze)
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in pcfg.modules_to_save:
        hits = [n for n in names if name_matches(n, pattern)
                and not any(name_matches(p, pattern) for p in _ancestors(n))]
        if not hits:
            raise AdapterError(f"peft.modules_to_save pattern {pattern!r} matches no module of the model")
        chosen.extend(h for h in hits if h not in chosen)
    chosen = [n for n in chosen if not any(a in chosen for a in _ancestors(n))]
    for name in chosen:
        module = model.get_submodule(name)
        parts = {part_of(f"{name}.{p}", family) for p, _ in module.named_parameters()}
        if parts & frozen:
            bad = sorted(str(p) for p in parts & frozen)
            raise AdapterError(f"peft.modules_to_save: {name} is in {', '.join(bad)}, which freeze."
                               f"{bad[0]}=true keeps frozen; unfreeze it or drop the module from modules_to_save")
        overlap = [t for t in targets if t == name or t.startswith(name + ".") or name.startswith(t + ".")]
        if overlap:
            raise AdapterError(f"peft.modules_to_save: {name} overlaps the adapter targets "
                               f"({_examples(overlap)}); a module is either adapted or trained in full, not both: "
                               "add it to peft.exclude_modules or drop it from modules_to_save")
    return chosen


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


# ---------------------------------------------------------------------------------------------------------
# LoRA / QLoRA


def quantization_config(pcfg: PeftConfig | None, device: torch.device, model_cfg: ModelConfig):
    """A BitsAndBytesConfig for QLoRA (``peft.quantize: 4bit``), or None. Fails early and clearly off CUDA.

    Only the language model's layers are quantized: the vision tower, the projector and the output head
    stay in model.dtype.
    """
    if pcfg is None or pcfg.quantize is None:
        return None
    if device.type != "cuda":
        raise AdapterError(
            f"peft.quantize={pcfg.quantize} (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit weights and kernels "
            f"run on CUDA, and this run is on {device.type}. Remove peft.quantize to train LoRA on unquantized "
            "weights here, or run on a CUDA machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise AdapterError(f"peft.quantize={pcfg.quantize} (QLoRA) needs the bitsandbytes package, which is not "
                           f"installed ({e}): pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    from vlmtune.model import load_config

    family = family_for(load_config(model_cfg).model_type)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    keep = [*family.parts["vision_tower"], *family.parts["projector"], "lm_head"]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=keep)


def base_reference(name_or_path: str) -> str:
    """What adapter_config.json records as the base: an absolute path for a local folder, else the hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def apply_lora(model: torch.nn.Module, family: Family, pcfg: PeftConfig, freeze, base_name_or_path: str,
               revision: str | None = None) -> tuple[torch.nn.Module, dict[str, int]]:
    """Wrap `model` in a PeftModel with adapters on :func:`lora_targets`; returns it and the trainable
    parameter counts per part. Every base weight is frozen; ``modules_to_save`` train in full."""
    peft = _import_peft()
    targets = lora_targets(model, family, pcfg, freeze)
    expert_targets = expert_parameter_targets(model, family, pcfg, freeze)
    if not targets and not expert_targets:
        raise AdapterError("peft.target_modules chose only fused MoE experts, which peft adapts only with "
                           "method=lora and dropout=0; set peft.dropout=0 or target other layers too")
    to_save = save_targets(model, family, pcfg, freeze, targets)
    if getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=pcfg.r, lora_alpha=pcfg.alpha, lora_dropout=pcfg.dropout, use_rslora=pcfg.use_rslora,
                             use_dora=pcfg.method == "dora", target_modules=targets, modules_to_save=to_save or None,
                             bias="none", base_model_name_or_path=base_reference(base_name_or_path),
                             revision=revision, target_parameters=expert_targets or None)
    with _quiet_peft():
        model = peft.get_peft_model(model, config)
    # A parameter adapter wraps its module (nested, one per parameter: `experts.base_layer.lora_A` is the inner one)
    adapted = sorted({_BASE_LAYERS.sub("", n.removeprefix(PEFT_PREFIX).split(".lora_")[0])
                      for n, _ in model.named_parameters() if ".lora_" in n})
    wanted = sorted({*targets, *(n.rsplit(".", 1)[0] for n in expert_targets)})
    if adapted != wanted:  # peft matched names its own way: never train something else silently
        raise AdapterError(f"peft placed adapters on {len(adapted)} modules, vlmtune asked for {len(wanted)}: "
                           f"{_examples(sorted(set(adapted) ^ set(wanted)))}")
    return model, trainable_counts(model, family)


def trainable_counts(model: torch.nn.Module, family: Family) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = str(param_part(name, family))
            counts[part] = counts.get(part, 0) + param.numel()
    return counts


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on (adapter_config.json's base_model_name_or_path)."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{path}/adapter_config.json names no base model (base_model_name_or_path); "
                           "pass the base model explicitly")
    return base


def attach_adapter(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """`model` with the adapter in folder `path` loaded (frozen: for inference, export and merging)."""
    peft = _import_peft()
    if not is_adapter_dir(path):
        raise AdapterError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    with _quiet_peft():
        return peft.PeftModel.from_pretrained(model, str(path), is_trainable=False)


# ---------------------------------------------------------------------------------------------------------
# Optimizer parameter groups


def param_groups(model: torch.nn.Module, family: Family, lr: float, weight_decay: float,
                 lr_multipliers: dict[str, float]) -> list[dict]:
    """AdamW groups of the trainable parameters: one per (part, decay / no decay), lr = lr x the part's
    multiplier. Norms and biases (dim < 2) get no weight decay."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = param_part(name, family)
        decay = param.dim() >= 2
        key = (str(part), decay)
        if key not in groups:
            mult = lr_multipliers.get(part, 1.0) if part else 1.0
            groups[key] = {"params": [], "name": f"{part}/{'decay' if decay else 'no_decay'}", "lr": lr * mult,
                           "lr_multiplier": mult, "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------
# The gradient check


class GradientCheck:
    """Call after a step's backward, before clipping and the optimizer step.

    Every trainable parameter must have a non-zero gradient and every frozen one none. LoRA factors are
    checked as pairs: while one factor of an adapter is all zero (lora_B at init; lora_embedding_A for
    embeddings), the other's gradient is exactly zero by construction, so only its presence is required.
    Parameters of the vision tower and projector are checked at the first step that carries images.
    Each parameter is checked once; afterwards a call costs nothing.
    """

    def __init__(self, model: torch.nn.Module, family: Family, enabled: bool = True):
        self.family = family
        self.pending: set[str] = {n for n, _ in model.named_parameters()} if enabled else set()

    def __call__(self, model: torch.nn.Module, images: bool) -> None:
        """`images`: the step's real samples carried images or video (a vision filler row, vlmtune/batching.py,
        carries images but trains nothing)."""
        if not self.pending:
            return
        # Looking at an FSDP2 gradient is a collective: every rank must check the same parameters.
        images = bool(max_over_ranks(int(images)))
        params = dict(model.named_parameters())
        now = [n for n in params if n in self.pending
               and (images or param_part(n, self.family) not in VISION_PARTS or not params[n].requires_grad)]
        missing, zero, leaked = [], [], []
        for name in now:
            p = params[name]
            if not p.requires_grad:
                if p.grad is not None:
                    leaked.append(name)
            elif p.grad is None:
                missing.append(name)
            elif not bool(p.grad.ne(0).any()) and not self._zero_by_construction(name, p, params):
                zero.append(name)
        self.pending.difference_update(now)
        problems = []

        def described(names: list[str]) -> str:
            return "\n".join(f"    {n} ({param_part(n, self.family)})" for n in names[:20]) + (
                f"\n    ... and {len(names) - 20} more" if len(names) > 20 else "")

        if missing:
            problems.append(f"{len(missing)} trainable parameter(s) got no gradient: they take no part in the "
                            f"loss, so they would never train:\n{described(missing)}")
        if zero:
            problems.append(f"{len(zero)} trainable parameter(s) got an all-zero gradient: they are used, but "
                            f"nothing flows back to them:\n{described(zero)}")
        if leaked:
            problems.append(f"{len(leaked)} frozen parameter(s) got a gradient:\n{described(leaked)}")
        if problems:
            raise GradientCheckError(
                "gradient check after the first optimizer step's backward:\n  " + "\n  ".join(problems) +
                "\n  Freeze what should not train (freeze.<part>=true; with peft: leave the part without adapters "
                "or add the modules to peft.exclude_modules), or fix the model code that should use these "
                "parameters. If this is expected (e.g. MoE experts that no token was routed to in this step), "
                "set train.check_gradients=false.")

    @staticmethod
    def _zero_by_construction(name: str, param: torch.Tensor, params: dict[str, torch.Tensor]) -> bool:
        """A LoRA factor whose partner factor is all zero (and which is not zero itself) has a zero gradient."""
        m = _LORA_FACTOR.search(name)
        if m is None:
            return False
        other = "B" if m.group(2) == "A" else "A"
        partner = params.get(f"{name[:m.start()]}.lora_{m.group(1) or ''}{other}{name[m.end():]}")
        return partner is not None and not bool(partner.ne(0).any()) and bool(param.ne(0).any())
