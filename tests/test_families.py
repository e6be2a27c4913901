"""Every family of the mission, end to end on tiny models with the real processors (tests/tiny/)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from PIL import Image
from tiny import chat_specs
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import cached_load_processor
from vlmtune.batching import collate
from vlmtune.checkpoint import save_hf
from vlmtune.cli import main
from vlmtune.config import FreezeConfig, ModelConfig, PeftConfig
from vlmtune.encode import SampleEncoder
from vlmtune.families import family_for, part_of
from vlmtune.generate import Generator
from vlmtune.kernels import LIGER_NORMS, norm_eps, rms_norm_reference, swappable_norms
from vlmtune.loss import loss_sum
from vlmtune.model import apply_freeze, apply_load_fixes, load_model, unused_parameters
from vlmtune.peft import lora_targets
from vlmtune.train import to_device
from vlmtune.views import trained_runs

SPECS = chat_specs()
NAMES = sorted(SPECS)
CPU = torch.device("cpu")
_LOADED: dict[str, tuple] = {}  # name -> load_model(...) of the last family loaded (see `loaded`)


def families(names=NAMES):
    """Parametrize over families; each family's tests form one xdist group, so one worker loads its model once
    (tests/conftest.py also keeps a family's tests together when running without xdist)."""
    return [pytest.param(n, marks=pytest.mark.xdist_group(f"family-{n}")) for n in names]


@pytest.fixture(scope="module", autouse=True)
def _shared(cached_processors):
    """Each family's processor is parsed once, also inside `vlmtune finetune` (tests/conftest.py); the model kept
    by `loaded` goes with the module."""
    yield
    _LOADED.clear()


def image(colour="red", size=(64, 48)):
    return Image.new("RGB", size, colour)


def conversation(spec, n_images=1, video=False):
    first = [*([{"type": "image", "image": image(c)} for c in ("red", "blue", "green")[:n_images]]),
             *([{"type": "video", "video": [image("red", (64, 64))] * 4}] if video else []),
             {"type": "text", "text": "What do you see?"}]
    return [
        {"role": "user", "content": first},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the border?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue, 2 px wide."}]},
    ]


def trained_spans(name, tiny_model, conv):
    spec = SPECS[name]
    processor = cached_load_processor(ModelConfig(name_or_path=str(tiny_model(name))))
    family = family_for(spec.model_type)
    enc = SampleEncoder(processor, family, max_length=4096)(conv, 0)
    ids, labels = enc.tensors["input_ids"].tolist(), enc.tensors["labels"].tolist()
    return [processor.tokenizer.decode(t) for t, trained in trained_runs(ids, labels) if trained], family


@pytest.mark.parametrize("name", families())
def test_multi_turn_masking(name, tiny_model):
    spans, family = trained_spans(name, tiny_model, conversation(SPECS[name]))
    assert [s.strip() for s in spans] == [a + family.assistant_end for a in ("A red square.", "Blue, 2 px wide.")]


@pytest.mark.parametrize("name", families([n for n in NAMES if SPECS[n].multi_image]))
def test_multi_image_masking(name, tiny_model):
    spans, family = trained_spans(name, tiny_model, conversation(SPECS[name], n_images=2))
    assert [s.strip() for s in spans] == [a + family.assistant_end for a in ("A red square.", "Blue, 2 px wide.")]


@pytest.mark.parametrize("name", families([n for n in NAMES if SPECS[n].video]))
def test_video_masking(name, tiny_model):
    spans, family = trained_spans(name, tiny_model, conversation(SPECS[name], n_images=0, video=True))
    assert [s.strip() for s in spans] == [a + family.assistant_end for a in ("A red square.", "Blue, 2 px wide.")]


def write_dataset(tmp_path, spec) -> str:
    """Messages-format JSONL mixing one-image, several-image and text-only samples."""
    image("red").save(tmp_path / "a.png")
    image("blue", (48, 64)).save(tmp_path / "b.png")
    user = lambda n, q: [*([{"type": "image"}] * n), {"type": "text", "text": q}]  # noqa: E731
    rows = [(1, ["a.png"]), (2, ["a.png", "b.png"]) if spec.multi_image else (1, ["b.png"]),
            (0, []) if spec.text_only else (1, ["a.png"])]
    lines = [json.dumps({"messages": [{"role": "user", "content": user(n, "Colour?")},
                                      {"role": "assistant", "content": [{"type": "text", "text": f"Answer {i}."}]}],
                         "images": imgs}) for i, (n, imgs) in enumerate(rows)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data.jsonl")


LORA_EVERYWHERE = ["peft.method=lora", "peft.vision=true", "peft.projector=true"]


@pytest.mark.parametrize("name", families())
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_step_through_cli_with_mixed_batch(name, mode, tiny_model, tmp_path):
    """A full and a LoRA (language + vision + projector) step; the loop's first-step gradient check proves every
    trainable parameter, vision adapters included, got a gradient. The evaluation after the last step generates
    for every sample (one-image, several-image and text-only in one batch) and scores it."""
    spec = SPECS[name]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tiny_model(name))},
        "data": {"train": {"source": write_dataset(tmp_path, spec)}},
        "train": {"max_steps": 2, "micro_batch_size": 3, "global_batch_size": 3, "lr": 1e-3, "max_length": 4096},
        "eval": {"split": "train", "max_new_tokens": 3, "batch_size": 3}}))
    assert main(["finetune", "-c", str(recipe), *(LORA_EVERYWHERE if mode == "lora" else [])]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {} and summary["samples_seen"] == 6
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    (evaluation,) = [x for x in lines if "eval" in x]
    assert evaluation["step"] == 2 and evaluation["eval_samples"] == 3
    assert set(evaluation["eval"]) == {"exact_match", "anls", "rouge_l"}
    rows = [json.loads(x) for x in (tmp_path / "out" / "eval" / "step-000002" / "predictions.jsonl").read_text()
            .splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all(set(r["scores"]) == set(evaluation["eval"]) for r in rows)
    assert (tmp_path / "out" / "final" / ("adapter_config.json" if mode == "lora" else "config.json")).is_file()


@pytest.fixture
def loaded(name, tiny_model):
    """(model, processor, family) of the family, the model a fresh copy of one load_model per family (the last
    family loaded is kept: a worker runs one family's tests one after the other)."""
    if name not in _LOADED:
        _LOADED.clear()
        _LOADED[name] = load_model(ModelConfig(name_or_path=str(tiny_model(name))), CPU)
    model, processor, family = _LOADED[name]
    return copy.deepcopy(model), processor, family


def image_batch(processor, family, spec):
    conv = conversation(spec)
    enc = SampleEncoder(processor, family, max_length=4096)(conv, 0)
    pad = processor.tokenizer.pad_token_id
    batch = collate([enc], pad if pad is not None else processor.tokenizer.eos_token_id)
    # As the training loop does: some processors return bf16 pixels (Llama 4); the tiny models are fp32.
    return to_device(batch, torch.device("cpu"), torch.float32, family.cast_to_model_dtype)


@pytest.mark.parametrize("name", families())
def test_save_reload_same_logits(name, loaded, tmp_path):
    model, processor, family = loaded
    batch = image_batch(processor, family, SPECS[name])
    out = save_hf(model, processor, tmp_path / "final")
    reloaded = apply_load_fixes(AutoModelForImageTextToText.from_pretrained(out), family).eval()
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-5)
    AutoProcessor.from_pretrained(out)


@pytest.mark.parametrize("name", families())
def test_every_parameter_has_a_part(name, loaded):
    model, _, family = loaded
    unassigned = [n for n, _ in model.named_parameters() if part_of(n, family) is None]
    assert unassigned == [], f"{family.name}: parameters outside vision_tower/projector/language_model"


@pytest.mark.parametrize("name", families())
@pytest.mark.parametrize("frozen", ["vision_tower", "projector", "language_model"])
def test_freeze_switch_by_name_and_gradient(name, frozen, loaded):
    model, processor, family = loaded
    apply_freeze(model, family, FreezeConfig(**{frozen: True}))
    batch = image_batch(processor, family, SPECS[name])
    model.zero_grad()
    loss_sum(model, batch).backward()
    unused = set(unused_parameters(model, family))  # frozen at load
    for n, p in model.named_parameters():
        part = part_of(n, family)
        assert p.requires_grad == (part != frozen and n not in unused), n
        if part == frozen:
            assert p.grad is None, n
        if p.requires_grad:  # what DDP requires
            assert p.grad is not None, f"{n} is trainable but got no gradient"
    got_grad = {part_of(n, family) for n, p in model.named_parameters()
                if p.grad is not None and p.grad.abs().sum() > 0}
    assert got_grad == {"vision_tower", "projector", "language_model"} - {frozen}


@pytest.mark.parametrize("name", families())
def test_unused_parameters_are_exactly_those_without_gradient(name, loaded):
    """Family.unused_params / feature_layers name exactly the parameters an image batch gives no gradient."""
    model, processor, family = loaded
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    loss_sum(model, image_batch(processor, family, SPECS[name])).backward()
    # An all-zero gradient counts as none (Gemma 3n's audio embedder runs on every token, its result dropped).
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.any())
    assert no_grad == sorted(unused_parameters(model, family))


@pytest.mark.parametrize("name", families())
def test_peft_switches_target_exactly_their_parts(name, loaded):
    """By name: default adapters only in the language model; peft.vision / peft.projector add exactly those parts'
    plain linear layers (a part without any, like Gemma 3's projection matrix, gets none)."""
    model, _, family = loaded
    head = model.get_output_embeddings()
    unused = set(unused_parameters(model, family))
    by_part: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        plain = (type(m).forward is torch.nn.Linear.forward and isinstance(m, torch.nn.Linear) and m is not head
                 and not any(n.endswith(x) for x in family.no_adapters))
        if plain and not all(f"{n}.{p}" in unused for p, _ in m.named_parameters()):
            by_part.setdefault(part_of(n, family), set()).add(n)
    for switches, parts in [({}, {"language_model"}), ({"vision": True}, {"language_model", "vision_tower"}),
                            ({"projector": True}, {"language_model", "projector"})]:
        targets = set(lora_targets(model, family, PeftConfig(method="lora", **switches), FreezeConfig()))
        assert targets == set().union(*(by_part.get(p, set()) for p in parts)), switches
    assert by_part.get("vision_tower") or family.name == "gemma3n"  # its vision tower is convolutional


@pytest.mark.parametrize("name", families())
def test_generate_produces_tokens(name, loaded):
    model, processor, family = loaded
    model.eval()
    prompt = conversation(SPECS[name])[:1]
    out, width = Generator(model, processor, family, max_new_tokens=4).generate([prompt])
    assert out.shape[0] == 1 and width < out.shape[1] <= width + 4


@pytest.mark.parametrize("name", families())
def test_rms_norms_match_the_liger_table(name, loaded):
    """train.kernels=liger replaces RMSNorm modules by Liger's with the (offset, casting mode) of LIGER_NORMS:
    every RMSNorm class of the family is in the table, and each module's output equals
    rms_norm_reference for that entry in fp32 and bf16 (bench/gpu_kernels.py checks Liger's kernel against the
    same reference on a GPU)."""
    model, _, _ = loaded
    norms = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    unknown = {type(m).__name__ for _, m in norms} - LIGER_NORMS.keys()
    assert not unknown, f"add these to vlmtune/kernels.py LIGER_NORMS: {unknown}"
    swappable = swappable_norms(model)
    assert swappable, "no RMSNorm that train.kernels=liger would replace"
    # Norms without a weight are never replaced; what they compute is the table's formula with a weight of 1.
    weightless = [(n, m) for n, m in norms if not isinstance(getattr(m, "weight", None), torch.nn.Parameter)]
    torch.manual_seed(0)
    for module_name, module in swappable + weightless:
        offset, mode = LIGER_NORMS[type(module).__name__]
        for dtype in (torch.float32, torch.bfloat16):
            m = copy.deepcopy(module).to(dtype)
            with torch.no_grad():
                weight = getattr(m, "weight", None)
                if isinstance(weight, torch.nn.Parameter):
                    weight.copy_(torch.randn_like(weight) * 0.3)  # not the ones / zeros of a fresh model
                else:
                    weight = torch.ones(8, dtype=dtype)
                x = torch.randn(2, 5, weight.shape[0], dtype=dtype) * 3
                where = f"{module_name} ({type(module).__name__}, {dtype})"
                torch.testing.assert_close(m(x), rms_norm_reference(x, weight, norm_eps(m), offset, mode),
                                           msg=lambda s, where=where: f"{where}: {s}")
