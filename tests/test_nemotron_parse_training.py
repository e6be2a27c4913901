"""Nemotron-Parse, the encoder-decoder family, through the same recipe, loop and CLI as every family: decoder labels
checked by decoding, full and LoRA steps through `vlmtune finetune`, token weights, save -> reload parity,
generation with the parsed page, freeze switches by name and gradient, packing refused. (The model itself:
tests/test_nemotron_parse.py; the 2-rank FSDP2 step: tests/test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from vlmtune.batching import Batcher, check_packing, collate
from vlmtune.checkpoint import save_hf
from vlmtune.cli import main
from vlmtune.config import DataSource, FreezeConfig, ModelConfig
from vlmtune.encode import IGNORE, EncodedDataset, make_encoder
from vlmtune.errors import PackingError
from vlmtune.families import family_for, part_of
from vlmtune.generate import Generator, split_conversation
from vlmtune.loss import loss_sum, model_inputs, token_weight_table
from vlmtune.model import apply_freeze, load_model
from vlmtune.models.nemotron_parse import syntax

CPU = torch.device("cpu")
FAMILY = family_for("nemotron_parse")
STRUCTURE = {"<x_*>": 10.0, "<y_*>": 10.0, "<class_*>": 10.0}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("nemotron_parse")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(ModelConfig(name_or_path=str(model_dir)), CPU)


@pytest.fixture(scope="module")
def dataset(loaded, page_data):
    _, processor, family = loaded
    spec = DataSource(source=str(page_data / "train.jsonl"), format="auto")
    return EncodedDataset.of(spec, make_encoder(processor, family, 512), "data.train")


def recipe(model_dir, page_data, out, **over) -> dict:
    t = {"output_dir": str(out), "model": {"name_or_path": str(model_dir)},
         "data": {"train": {"source": str(page_data / "train.jsonl")},
                  "validation": {"source": str(page_data / "validation.jsonl")}},
         "train": {"max_steps": 3, "micro_batch_size": 2, "global_batch_size": 2, "lr": 1e-3, "max_length": 512,
                   "val_every_steps": 3}}
    for key, value in over.items():
        t[key] = {**t.get(key, {}), **value} if isinstance(value, dict) else value
    return t


def test_the_format_renders_blocks_and_the_labels_train_the_page_and_its_end(loaded, dataset, page_data):
    """Detected from the columns; the target is the blocks in the model's syntax (boxes from the page's pixels);
    the decoder reads the task-token prompt untrained, then the target and </s> are trained, nothing else."""
    _, processor, _ = loaded
    assert dataset.conversations.format == "nemotron_parse"
    row = json.loads((page_data / "train.jsonl").read_text().splitlines()[2])
    conv = dataset.conversations.conversation(2)
    _, target = split_conversation(conv)
    assert target == syntax.render_page(row["blocks"], (120, 160))
    sample = dataset[2]
    ids, labels = sample.tensors["decoder_input_ids"].tolist(), sample.tensors["labels"].tolist()
    prompt_ids = processor.tokenizer(syntax.PROMPT, add_special_tokens=False)["input_ids"]
    assert prompt_ids == [2, 0, 50004, 50008, 50001] and ids[:5] == prompt_ids and labels[:5] == [IGNORE] * 5
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert trained == ids[5:] and processor.tokenizer.decode(trained) == target + "</s>"
    assert sample.tensors["pixel_values"].shape[-2:] == (192, 176)  # the tiny processor's canvas


def test_the_loss_path_equals_a_plain_reference_with_token_weights(loaded, dataset):
    """Fused chunked loss == plain loss == a hand-written teacher-forced reference, unweighted and with the
    structure tokens (coordinates, classes) weighted x10."""
    model, processor, _ = loaded
    model.eval()  # the decoder has dropout (0.1, as the official config)
    batch = collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    table = token_weight_table(processor.tokenizer, STRUCTURE, model)
    ids = syntax.token_ids(processor.tokenizer)
    assert table[ids["coordinate"] + ids["class"]].eq(10).all() and table[:50000].eq(1).all()
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits.float()
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    for weights in (None, table):
        w = torch.ones_like(ce) if weights is None else weights[targets.flatten().clamp(min=0)]
        want = (ce * w).sum()
        with torch.no_grad():
            for chunk in (None, 7):
                torch.testing.assert_close(loss_sum(model, batch, chunk, token_weights=weights), want,
                                           rtol=1e-5, atol=1e-4)
    assert loss_sum(model, batch, 7, token_weights=table) > loss_sum(model, batch, 7)

    # The loop's counts, taken before collation (Batcher.plan), are those of the decoder's padded batch.
    plan = Batcher(processor.tokenizer.pad_token_id, 2, None, False, None, None).plan([dataset[0], dataset[1]])
    assert plan.padding == int((batch["decoder_attention_mask"] == 0).sum()) > 0
    assert plan.supervised == int((targets != IGNORE).sum())


@pytest.mark.parametrize("setting", ["full", "lora"])
def test_steps_through_the_cli(model_dir, page_data, tmp_path, setting):
    over = {"peft": {"method": "lora", "r": 4}} if setting == "lora" else {}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, page_data, tmp_path / "out",
                                          train={"token_weights": STRUCTURE}, **over)))
    assert main(["finetune", "-c", str(path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 100 for x in losses) and any("val_loss" in r for r in lines)
    final = tmp_path / "out" / "final"
    kind = "adapter_model.safetensors" if setting == "lora" else "model.safetensors"
    assert (final / kind).is_file() and (final / "preprocessor_config.json").is_file()
    trained = load_file(final / kind)
    if setting == "full":  # the official weight names, and the decoder moved from the tiny model's
        base = load_file(model_dir / "model.safetensors")
        assert trained.keys() == base.keys()
        assert not torch.equal(trained["decoder.layers.0.fc1.weight"], base["decoder.layers.0.fc1.weight"])
    else:
        assert trained and all(".lora_" in k for k in trained)


def test_save_and_reload_give_the_same_logits(model_dir, dataset, tmp_path):
    trained, processor, _ = load_model(ModelConfig(name_or_path=str(model_dir)), CPU)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # not the saved weights of the tiny model
    out = save_hf(trained, processor, tmp_path / "final")
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    batch = collate([dataset[0]], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**model_inputs(batch)).logits, trained.eval()(**model_inputs(batch)).logits)


def test_generate_writes_the_page_and_its_parsed_blocks(model_dir, page_data, tmp_path, loaded, dataset):
    model, processor, family = loaded
    gen = Generator(model.eval(), processor, family, max_new_tokens=8)
    convs = [split_conversation(dataset.conversations.conversation(i))[0] for i in range(3)]
    out, width = gen.generate(convs)
    assert width == 5 and out[:, :5].tolist() == [[2, 0, 50004, 50008, 50001]] * 3  # the decoder prompt, kept
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, page_data, tmp_path / "out")))
    preds = tmp_path / "preds.jsonl"
    assert main(["generate", "-c", str(path), "--split", "validation", "--out", str(preds), "--model",
                 str(model_dir), "--max-new-tokens", "6"]) == 0
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["prompt"] == syntax.PROMPT
    assert all(isinstance(r["parsed"], list) for r in rows)
    assert rows[0]["parsed"] == syntax.parse_page(rows[0]["prediction"], (120, 160))


@pytest.mark.parametrize("frozen", ["vision_tower", "projector", "language_model"])
def test_freeze_switches_by_name_and_gradient(model_dir, dataset, loaded, frozen):
    """The encoder (vision tower), the neck (projector) and the decoder (language model): a frozen part gets no
    gradient, every other part does."""
    model, processor, _ = load_model(ModelConfig(name_or_path=str(model_dir)), CPU)
    apply_freeze(model, FAMILY, FreezeConfig(**{frozen: True}))
    parts = {n: part_of(n, FAMILY) for n, _ in model.named_parameters()}
    assert {"vision_tower", "projector", "language_model"} <= set(parts.values())
    assert parts["encoder.conv1.weight"] == "projector" and parts["lm_head.weight"] == "language_model"
    loss_sum(model, collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)).backward()
    for name, p in model.named_parameters():
        if parts[name] == frozen:
            assert p.grad is None, name
    got = {parts[n] for n, p in model.named_parameters() if p.grad is not None and p.grad.ne(0).any()}
    assert got == {"vision_tower", "projector", "language_model"} - {frozen}


def test_packing_is_refused_with_the_reason():
    with pytest.raises(PackingError, match="encoder-decoder"):
        check_packing(FAMILY)


def test_inspect_shows_the_decoder_tokens_with_the_trained_spans(model_dir, page_data, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, page_data, tmp_path / "out")))
    assert main(["inspect", "-c", str(path), "--format", "json", "--index", "1"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["text"].startswith(syntax.PROMPT) and view["trained_spans"][-1].endswith("</s>")
    assert "<class_" in view["trained_spans"][-1] and view["images"][0]["width"] == 120
