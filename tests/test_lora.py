"""LoRA through peft: targets from the family table, freeze semantics, per-part lrs, the gradient check, QLoRA."""

from __future__ import annotations

import copy
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

import vlmtune.train as train_mod
from conftest import small_recipe
from vlmtune.batching import collate
from vlmtune.cli import main
from vlmtune.config import FreezeConfig, ModelConfig, PeftConfig, RecipeError, build_recipe
from vlmtune.families import family_for
from vlmtune.loss import loss_sum, model_inputs
from vlmtune.model import load_model
from vlmtune.peft import (
    AdapterError,
    GradientCheck,
    GradientCheckError,
    apply_lora,
    lora_targets,
    param_groups,
    param_part,
    quantization_config,
)

FAMILY = family_for("qwen2_5_vl")
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """Each model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


_LOADED: dict[str, torch.nn.Module] = {}


def fresh_model(model_dir):
    """A pristine copy of the model in `model_dir` (loaded once per module)."""
    if str(model_dir) not in _LOADED:
        _LOADED[str(model_dir)] = load_model(ModelConfig(name_or_path=str(model_dir)), CPU)[0]
    return copy.deepcopy(_LOADED[str(model_dir)])


def linear_names(model, prefix: str, but: str | None = None) -> set[str]:
    """An oracle independent of part_of: nn.Linear module names under a literal prefix."""
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)
            and not (but and n.startswith(but))}


def adapted(model) -> set[str]:
    return {n.removeprefix("base_model.model.").split(".lora_")[0] for n, _ in model.named_parameters()
            if ".lora_" in n}



@pytest.fixture(scope="module")
def text_batch(encoder):
    conv = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi there."}]}]
    return collate([encoder(conv, 0)], pad_id=151643)


def write_recipe(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# The real CLI path


def test_lora_run_through_cli_writes_a_peft_adapter(tiny_model_dir, cord_dir, tmp_path, monkeypatch, image_batch):
    captured = {}
    real_save = train_mod.save_hf

    def spy(model, processor, out):
        captured["model"] = model
        return real_save(model, processor, out)

    monkeypatch.setattr(train_mod, "save_hf", spy)
    tree = small_recipe(tiny_model_dir, cord_dir, tmp_path / "run")
    del tree["data"]["validation"]
    assert main(["finetune", "-c", write_recipe(tmp_path / "r.yaml", tree), "peft.method=lora"]) == 0

    final = tmp_path / "run" / "final"
    files = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and config["use_dora"] is False

    trained = captured["model"].eval()
    lora_b = [p for n, p in trained.named_parameters() if ".lora_B." in n]
    assert lora_b and all(bool(p.ne(0).any()) for p in lora_b), "training should have moved every lora_B"
    base = fresh_model(config["base_model_name_or_path"])
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = PeftModel.from_pretrained(base, str(final)).eval()
    with torch.no_grad():
        want = trained(**model_inputs(image_batch)).logits
        got = loaded(**model_inputs(image_batch)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Base weights were frozen in training: the trained model's base equals the pristine base.
    trained_base = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
                    for n, p in trained.named_parameters() if ".lora_" not in n}
    for name, value in base_state.items():
        if name in trained_base:
            torch.testing.assert_close(trained_base[name], value, atol=0, rtol=0)


def test_dora_run(tiny_model_dir, cord_dir, tmp_path):
    tree = small_recipe(tiny_model_dir, cord_dir, tmp_path / "run", max_steps=1)
    tree["peft"] = {"method": "dora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    final = train_mod.finetune(build_recipe(tree))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4
    assert all(n.endswith(("q_proj", "v_proj")) for n in config["target_modules"])


def test_lora_on_another_family_skips_layers_unused_by_design(tiny_model, tmp_path):
    """LLaVA reads image features from the penultimate vision layer: the last one gets no adapters, and a LoRA
    run with every switch on passes the gradient check. No family branches: only the family table differs."""
    model_dir = tiny_model("llava")
    model, _, family = load_model(ModelConfig(name_or_path=str(model_dir)), CPU)
    assert model.config.vision_feature_layer == -2
    targets = set(lora_targets(model, family, PeftConfig(vision=True, projector=True), FreezeConfig()))
    vision = linear_names(model, "model.vision_tower.")
    last = "model.vision_tower.encoder.layers.1."
    assert {n for n in vision if not n.startswith(last)} <= targets and not any(n.startswith(last) for n in targets)
    assert linear_names(model, "model.multi_modal_projector.") <= targets
    assert linear_names(model, "model.language_model.") <= targets

    red_png(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}], "images": ["a.png"]}
    (tmp_path / "d.jsonl").write_text((json.dumps(row) + "\n") * 2)
    final = train_mod.finetune(build_recipe({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"source": str(tmp_path / "d.jsonl")}}, "peft": {"vision": True, "projector": True},
        "train": {"max_steps": 1, "micro_batch_size": 2, "global_batch_size": 2, "lr": 1e-3, "max_length": 4096}}))
    # peft may save a shorter, equivalent target list (name suffixes); loaded, it adapts exactly the same layers.
    model.requires_grad_(False)
    assert adapted(PeftModel.from_pretrained(model, str(final))) == targets


def red_png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(path)


# ---------------------------------------------------------------------------------------------------------
# Targets


def test_default_targets_are_exactly_the_language_model_linears(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    want = linear_names(model, "model.language_model.")
    assert want and "lm_head" not in want
    peft_model, counts = apply_lora(model, FAMILY, PeftConfig(), FreezeConfig(), str(tiny_model_dir))
    assert adapted(peft_model) == want
    assert not any(n.startswith("model.visual") for n in adapted(peft_model))
    assert set(counts) == {"language_model"}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # every base weight frozen


def test_vision_and_projector_switches(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    lm = linear_names(model, "model.language_model.")
    vision = linear_names(model, "model.visual.", but="model.visual.merger.")
    merger = linear_names(model, "model.visual.merger.")
    assert vision and merger
    targets = lambda **kw: set(lora_targets(model, FAMILY, PeftConfig(**kw), FreezeConfig()))  # noqa: E731
    assert targets(vision=True) == lm | vision
    assert targets(projector=True) == lm | merger
    assert targets(vision=True, projector=True) == lm | vision | merger
    # freeze.language_model=true with peft: no adapters in the language model.
    assert set(lora_targets(model, FAMILY, PeftConfig(projector=True), FreezeConfig(language_model=True))) == merger


def test_target_and_exclude_patterns(tiny_model_dir):
    model = fresh_model(tiny_model_dir)

    def targets(freeze=None, **kw):
        return set(lora_targets(model, FAMILY, PeftConfig(**kw), freeze or FreezeConfig()))

    lm = "model.language_model.layers"
    assert targets(target_modules=["q_proj", "*.v_proj"], exclude_modules=["layers.1"]) == {
        f"{lm}.0.self_attn.q_proj", f"{lm}.0.self_attn.v_proj"}
    assert targets(target_modules=["self_attn"]) == {f"{lm}.{i}.self_attn.{p}_proj" for i in (0, 1)
                                                     for p in "qkvo"}
    assert targets(exclude_modules=["mlp.*"]) == {f"{lm}.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    # "all-linear" means the default set, limited to the adapted parts (unlike peft's own all-linear).
    assert targets(target_modules=["all-linear"]) == targets()
    # Patterns never reach outside the adapted parts: mlp.* matches the merger only with peft.projector.
    assert not any("merger" in n for n in targets(target_modules=["mlp.*"]))
    assert {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"} <= targets(target_modules=["mlp.*"],
                                                                                  projector=True)
    with pytest.raises(AdapterError, match=r"'qkv' matches only layers outside.*vision_tower.*peft\.vision"):
        targets(target_modules=["qkv"])
    with pytest.raises(AdapterError, match=r"'nope' matches no layer"):
        targets(target_modules=["nope"])
    with pytest.raises(AdapterError, match=r"exclude_modules pattern 'nope' matches no module"):
        targets(exclude_modules=["nope"])
    with pytest.raises(AdapterError, match=r"no layer is left"):
        targets(target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_modules_to_save(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    peft_model, counts = apply_lora(model, FAMILY, PeftConfig(modules_to_save=["merger"]), FreezeConfig(),
                                    str(tiny_model_dir))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    merger = {n for n in trainable if ".merger." in n}
    assert merger and all(".modules_to_save." in n for n in merger)
    assert set(counts) == {"language_model", "projector"}
    with pytest.raises(AdapterError, match=r"merger is in projector.*freeze\.projector"):
        apply_lora(fresh_model(tiny_model_dir), FAMILY, PeftConfig(modules_to_save=["merger"]),
                   FreezeConfig(projector=True), str(tiny_model_dir))
    with pytest.raises(AdapterError, match=r"overlaps the adapter targets"):
        apply_lora(fresh_model(tiny_model_dir), FAMILY, PeftConfig(modules_to_save=["merger"], projector=True),
                   FreezeConfig(), str(tiny_model_dir))


def test_recipe_peft_section_and_contradictions(tiny_model_dir, cord_dir, tmp_path):
    from vlmtune.config import apply_overrides

    def recipe(*overrides):
        return build_recipe(apply_overrides(small_recipe(tiny_model_dir, cord_dir, tmp_path), list(overrides)))

    assert recipe().peft is None
    r = recipe("peft.method=lora")
    assert (r.peft.r, r.peft.alpha, r.peft.dropout, r.peft.use_rslora) == (16, 32, 0.0, False)
    assert r.peft.target_modules is None and not r.peft.vision and not r.peft.projector
    assert recipe("peft.target_modules=q_proj").peft.target_modules == ["q_proj"]
    with pytest.raises(RecipeError, match=r"peft\.vision=true puts adapters in the vision_tower, but "
                                          r"freeze\.vision_tower=true"):
        recipe("peft.vision=true", "freeze.vision_tower=true")
    with pytest.raises(RecipeError, match=r"peft\.projector=true.*freeze\.projector=true"):
        recipe("peft.projector=true", "freeze.projector=true")
    with pytest.raises(RecipeError, match=r"nothing would train"):
        recipe("peft.method=lora", "freeze.language_model=true")
    with pytest.raises(RecipeError, match=r"peft\.method"):
        recipe("peft.method=ia3")


# ---------------------------------------------------------------------------------------------------------
# Per-part learning rates


def test_lr_multipliers_make_param_groups(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    mult = {"vision_tower": 0.1, "projector": 0.5}
    groups = param_groups(model, FAMILY, 1e-3, 0.01, mult)
    seen = set()
    for g in groups:
        part = g["name"].split("/")[0]
        assert g["lr"] == pytest.approx(1e-3 * mult.get(part, 1.0))
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            assert param_part(name, FAMILY) == part
            assert g["weight_decay"] == (0.01 if p.dim() >= 2 else 0.0)
            seen.add(name)
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(seen)
    assert {g["name"] for g in groups} >= {"vision_tower/decay", "projector/decay", "language_model/no_decay"}
    # Under a PeftModel the adapter parameters are grouped by the part of the layer they adapt.
    lora, _ = apply_lora(fresh_model(tiny_model_dir), FAMILY, PeftConfig(projector=True), FreezeConfig(),
                         str(tiny_model_dir))
    groups = {g["name"]: g for g in param_groups(lora, FAMILY, 1e-3, 0.0, mult)}
    assert set(groups) == {"projector/decay", "language_model/decay"}
    assert groups["projector/decay"]["lr"] == pytest.approx(5e-4)
    assert all(".merger." in n for n, p in lora.named_parameters()
               if any(p is q for q in groups["projector/decay"]["params"]))


def test_lr_multipliers_through_the_loop(tiny_model_dir, cord_dir, tmp_path, monkeypatch):
    captured = []
    real = train_mod.param_groups
    monkeypatch.setattr(train_mod, "param_groups", lambda *a, **k: captured.extend(real(*a, **k)) or captured)
    tree = small_recipe(tiny_model_dir, cord_dir, tmp_path / "run", max_steps=1, schedule="constant")
    del tree["data"]["validation"]
    tree["optim"] = {"lr_multipliers": {"vision_tower": 0.1, "projector": 0.25}}
    train_mod.finetune(build_recipe(tree))
    lrs = {g["name"]: g["initial_lr"] for g in captured}
    assert lrs["vision_tower/decay"] == pytest.approx(1e-4) and lrs["projector/decay"] == pytest.approx(2.5e-4)
    assert lrs["language_model/decay"] == pytest.approx(1e-3)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["lr"] == pytest.approx(1e-3)  # the logged lr is train.lr's schedule, not a part's


def test_unknown_lr_multiplier_part_is_a_recipe_error(tiny_model_dir, cord_dir, tmp_path):
    tree = small_recipe(tiny_model_dir, cord_dir, tmp_path)
    tree["optim"] = {"lr_multipliers": {"vision_towr": 0.1}}
    with pytest.raises(RecipeError, match=r"optim\.lr_multipliers: unknown part 'vision_towr'; did you mean "
                                          r"'vision_tower'"):
        build_recipe(tree)


# ---------------------------------------------------------------------------------------------------------
# The gradient check


def test_gradient_check_lora_pairs(tiny_model_dir, image_batch):
    model, _ = apply_lora(fresh_model(tiny_model_dir), FAMILY, PeftConfig(dropout=0.0), FreezeConfig(),
                          str(tiny_model_dir))
    loss_sum(model, image_batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # Why pairs: at step 1 lora_B == 0, so every lora_A gradient is exactly zero while lora_B's is not.
    assert all(not g.ne(0).any() for n, g in grads.items() if ".lora_A." in n)
    assert all(g.ne(0).any() for n, g in grads.items() if ".lora_B." in n)
    check = GradientCheck(model, FAMILY)
    check(model, images=True)
    assert not check.pending
    # A dead adapter (lora_B gets no gradient) is caught, even though its lora_A is excused.
    name = next(n for n in grads if ".lora_B." in n)
    dict(model.named_parameters())[name].grad.zero_()
    with pytest.raises(GradientCheckError, match=r"all-zero gradient:.*\n\s+" + re.escape(name)):
        GradientCheck(model, FAMILY)(model, images=True)


def test_gradient_check_defers_vision_parts_to_a_step_with_images(tiny_model_dir, text_batch, image_batch):
    model = fresh_model(tiny_model_dir)
    check = GradientCheck(model, FAMILY)
    loss_sum(model, text_batch).backward()  # no image: the vision tower cannot get gradients
    check(model, images=False)
    assert check.pending and all(n.startswith("model.visual.") for n in check.pending)
    model.zero_grad(set_to_none=True)
    loss_sum(model, image_batch).backward()
    check(model, images=True)
    assert not check.pending


def test_gradient_check_flags_frozen_parameter_with_gradient():
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    model(torch.ones(1, 2)).sum().backward()
    model.bias.grad = torch.ones(2)
    with pytest.raises(GradientCheckError, match=r"frozen parameter\(s\) got a gradient:\n\s+bias"):
        GradientCheck(model, FAMILY)(model, images=False)


def _with_unused_layer(monkeypatch):
    real = train_mod.load_model

    def load(*args, **kwargs):
        model, processor, family = real(*args, **kwargs)
        model.model.language_model.unused = torch.nn.Linear(4, 4)  # trainable, never called in forward
        return model, processor, family

    monkeypatch.setattr(train_mod, "load_model", load)


def test_unused_trainable_parameter_fails_the_first_step(tiny_model_dir, cord_dir, tmp_path, monkeypatch, capsys):
    _with_unused_layer(monkeypatch)
    tree = small_recipe(tiny_model_dir, cord_dir, tmp_path / "run", max_steps=1)
    cfg = write_recipe(tmp_path / "r.yaml", tree)
    assert main(["finetune", "-c", cfg]) == 2
    err = capsys.readouterr().err
    assert "2 trainable parameter(s) got no gradient" in err
    assert "model.language_model.unused.weight (language_model)" in err
    assert "model.language_model.unused.bias (language_model)" in err
    assert "freeze.<part>=true" in err and "train.check_gradients=false" in err
    assert not (tmp_path / "run" / "final").exists()
    # The escape hatch, for setups where it is expected.
    assert main(["finetune", "-c", cfg, "train.check_gradients=false", f"output_dir={tmp_path / 'run2'}"]) == 0


# ---------------------------------------------------------------------------------------------------------
# QLoRA


def test_qlora_on_cpu_errors_clearly(tiny_model_dir, cord_dir, tmp_path, capsys):
    cfg = write_recipe(tmp_path / "r.yaml", small_recipe(tiny_model_dir, cord_dir, tmp_path / "run"))
    assert main(["finetune", "-c", cfg, "peft.quantize=4bit", "train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "peft.quantize=4bit (QLoRA) needs a CUDA GPU" in err and "this run is on cpu" in err


def test_qlora_without_bitsandbytes_says_how_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(AdapterError, match=r"pip install bitsandbytes"):
        quantization_config(PeftConfig(quantize="4bit"), torch.device("cuda", 0),
                            ModelConfig(name_or_path=str(tiny_model_dir)))
    assert quantization_config(None, CPU, ModelConfig(name_or_path=str(tiny_model_dir))) is None


def test_qlora_config_quantizes_only_the_language_model(tiny_model_dir, monkeypatch):
    """What QLoRA loads with (the run itself needs CUDA and bitsandbytes: bench/gpu_smoke.sh): NF4 with double
    quantization, and the vision tower, projector and output head named as modules that stay whole."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    config = quantization_config(PeftConfig(quantize="4bit"), torch.device("cuda", 0),
                                 ModelConfig(name_or_path=str(tiny_model_dir)))
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.llm_int8_skip_modules == [*FAMILY.parts["vision_tower"], *FAMILY.parts["projector"], "lm_head"]
    assert not any("model.language_model".startswith(p) for p in config.llm_int8_skip_modules)  # its layers: NF4
