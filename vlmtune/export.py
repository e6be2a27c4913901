"""Export a trained model as a complete Hugging Face folder, or an adapter folder; optionally merge LoRA.

Input: a ``final/`` folder of a run (a full model, or a PEFT adapter whose adapter_config.json names its
base), or a training checkpoint ``output_dir/checkpoints/step-N/`` (vlmtune/checkpoint.py), which is rebuilt
from its recipe and written as that run's final/ folder would be. Output: weights (safetensors), config,
processor, tokenizer, chat template and generation config, written beside the destination and renamed in, so
it is whole or absent. With ``merge`` an adapter is folded into its base (``merge_and_unload``, in fp32) and
the result is a plain model; without it the adapter folder is copied with its processor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from vlmtune.checkpoint import COMPLETE, RECIPE, TRAINABLE, load_trainable, save_hf
from vlmtune.config import ModelConfig, build_recipe, load_yaml
from vlmtune.errors import ExportError
from vlmtune.generate import has_processor
from vlmtune.model import apply_freeze, load_config, load_model, load_processor
from vlmtune.peft import adapter_base, apply_lora, attach_adapter, is_adapter_dir

DTYPES = ("auto", "float32", "bfloat16", "float16")


def saved_dtype(name_or_path: str, trust_remote_code: bool = False) -> str:
    """The dtype a model folder was saved in (config.json), as a ModelConfig dtype name; float32 if unknown."""
    config = load_config(ModelConfig(name_or_path=name_or_path, trust_remote_code=trust_remote_code))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return dtype if dtype in DTYPES[1:] else "float32"


def _check_out(source: Path, out: Path) -> None:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} must not be the input folder or inside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; choose a new folder or remove it")


def _write_model(model: torch.nn.Module, processor, out: Path, dtype: str) -> Path:
    model.to(getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_hf(model, processor, out)


def _copy_adapter(source: Path, out: Path, trust_remote_code: bool) -> Path:
    """The adapter folder as is (adapter + processor files); the base's processor if none was saved beside it."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if not has_processor(tmp):
        load_processor(ModelConfig(name_or_path=adapter_base(source),
                                   trust_remote_code=trust_remote_code)).save_pretrained(tmp)
    if out.exists():
        out.rmdir()  # checked empty
    os.replace(tmp, out)
    return out


def export(checkpoint: str | Path, out: str | Path, merge: bool = False, dtype: str = "auto",
           base: str | None = None, trust_remote_code: bool = False) -> Path:
    """Export `checkpoint` (a run's final folder) to `out`; returns `out`.

    ``dtype``: the saved weights' dtype; ``auto`` keeps the input's (for a merge: the base's).
    ``base``: the base model of an adapter, overriding adapter_config.json's base_model_name_or_path.
    ``trust_remote_code``: run a model's own code; only the command line (--trust-remote-code) turns it on, never
    a file in the checkpoint (its recipe.yaml may say true: that is ignored).
    """
    source, out = Path(checkpoint), Path(out)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not source.is_dir():
        raise ExportError(f"--checkpoint {checkpoint} is not a folder")
    _check_out(source, out)
    cpu = torch.device("cpu")

    if (source / TRAINABLE).is_file():
        return _export_checkpoint(source, out, merge, dtype, trust_remote_code)
    if is_adapter_dir(source):
        if not merge:
            return _copy_adapter(source, out, trust_remote_code)
        base_path = base or adapter_base(source)
        target = saved_dtype(base_path, trust_remote_code) if dtype == "auto" else dtype
        model_cfg = ModelConfig(name_or_path=base_path, dtype="float32", trust_remote_code=trust_remote_code)
        model, processor, _ = load_model(model_cfg, cpu,
                                         processor_path=str(source) if has_processor(source) else None)
        model = attach_adapter(model, source).merge_and_unload()
        model.eval()
        return _write_model(model, processor, out, target)

    if not (source / "config.json").is_file():
        hint = ("; it looks like a run's output_dir: pass its final/ folder or one of its checkpoints/step-* folders"
                if (source / "final").is_dir() or (source / "checkpoints").is_dir() else "")
        raise ExportError(f"--checkpoint {checkpoint} holds neither a model (config.json), a PEFT adapter "
                          f"(adapter_config.json) nor a vlmtune checkpoint ({TRAINABLE}){hint}")
    if merge:
        raise ExportError(f"--merge: {checkpoint} is a full model, not an adapter; there is nothing to merge")
    target = saved_dtype(str(source), trust_remote_code) if dtype == "auto" else dtype
    model_cfg = ModelConfig(name_or_path=str(source), dtype=target, trust_remote_code=trust_remote_code)
    model, processor, _ = load_model(model_cfg, cpu)
    model.eval()
    return _write_model(model, processor, out, target)


def _export_checkpoint(source: Path, out: Path, merge: bool, dtype: str, trust_remote_code: bool) -> Path:
    """A training checkpoint (vlmtune/checkpoint.py: trainable tensors + the recipe): rebuild the model as the
    run built it (base weights from its model.name_or_path, freezing or adapters), load the trained tensors,
    and write it like the run's final/ folder would be (an adapter for a LoRA run, unless merged)."""
    if not (source / COMPLETE).is_file():
        raise ExportError(f"--checkpoint {source} is an incomplete checkpoint (no {COMPLETE} marker: its save did "
                          "not finish); use another one")
    if not (source / RECIPE).is_file():
        raise ExportError(f"--checkpoint {source} has no {RECIPE}, so the model it belongs to is unknown")
    recipe = build_recipe(load_yaml(source / RECIPE))
    if merge and recipe.peft is None:
        raise ExportError(f"--merge: {source} is a checkpoint of a full fine-tune, not of an adapter; "
                          "there is nothing to merge")
    # The checkpoint's own recipe never decides to run code: only this command's --trust-remote-code does.
    update = {"trust_remote_code": trust_remote_code, **({"dtype": "float32"} if recipe.peft is not None else {})}
    model_cfg = recipe.model.model_copy(update=update)
    model, processor, family = load_model(model_cfg, torch.device("cpu"))  # never quantized: export full precision
    if recipe.peft is not None:
        model, _ = apply_lora(model, family, recipe.peft, recipe.freeze, recipe.model.name_or_path,
                              recipe.model.revision)
    else:
        apply_freeze(model, family, recipe.freeze)
    load_trainable(source / TRAINABLE, model)
    model.eval()
    if merge:
        model = model.merge_and_unload()
        target = saved_dtype(recipe.model.name_or_path, trust_remote_code) if dtype == "auto" else dtype
    else:
        target = str(next(model.parameters()).dtype).removeprefix("torch.") if dtype == "auto" else dtype
    return _write_model(model, processor, out, target)


def describe(out: Path) -> str:
    files = sorted(p.name for p in Path(out).iterdir())
    kind = "adapter" if (Path(out) / "adapter_config.json").is_file() else "model"
    base = ""
    if kind == "adapter":
        base = f" (base: {json.loads((Path(out) / 'adapter_config.json').read_text()).get('base_model_name_or_path')})"
    return f"{kind}{base} in {out}: {', '.join(files)}"
