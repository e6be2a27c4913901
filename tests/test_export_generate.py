"""export (full model, adapter, --merge, checkpoints) and generate (one prompt; a split, batched = one by one)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import PIL.Image
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import small_recipe
from vlmtune.cli import main
from vlmtune.config import ModelConfig, build_recipe
from vlmtune.data.dataset import ConversationDataset
from vlmtune.generate import Generator, load_for_inference, split_conversation
from vlmtune.loss import model_inputs
from vlmtune.model import load_model

CPU = torch.device("cpu")
ANSWERS = ["A cat.", "Total: 12,000", "Nothing here", "Two lines\nof text"]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**model_inputs(batch)).logits


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """Each model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


_BASE: dict[str, torch.nn.Module] = {}


def base_model(path) -> torch.nn.Module:
    """A pristine copy of the base model (loaded once)."""
    if str(path) not in _BASE:
        _BASE[str(path)] = load_model(ModelConfig(name_or_path=str(path)), CPU)[0]
    return copy.deepcopy(_BASE[str(path)])


@pytest.fixture(scope="module")
def messages_dir(tmp_path_factory):
    """Four image + question samples whose prompts differ in length (image sizes, question lengths)."""
    d = tmp_path_factory.mktemp("messages")
    sizes_questions = [((56, 56), "Hi?"), ((224, 112), "What is written on this receipt, in as much detail?"),
                       ((112, 168), "Total?"), ((84, 224), "Describe the picture briefly, please.")]
    rows = []
    for i, ((w, h), question) in enumerate(sizes_questions):
        PIL.Image.new("RGB", (w, h), (40 * i, 120, 200 - 30 * i)).save(d / f"im{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[i]}]}],
                     "images": [f"im{i}.png"]})
    (d / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(tmp_path_factory, model_dir, data_dir, name: str, **sections) -> Path:
    out = tmp_path_factory.mktemp(name)
    tree = small_recipe(model_dir, data_dir, out / "run")
    del tree["data"]["validation"]
    tree.update(sections)
    cfg = out / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    assert main(["finetune", "-c", str(cfg)]) == 0
    return out / "run"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, cord_dir) -> Path:
    """A 2-step LoRA run (adapters on the language model and the projector) with a checkpoint at step 2."""
    return run(tmp_path_factory, tiny_model_dir, cord_dir, "lora", peft={"method": "lora", "r": 8, "projector": True},
               checkpoint={"every_steps": 2})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, cord_dir) -> Path:
    return run(tmp_path_factory, tiny_model_dir, cord_dir, "full", freeze={"vision_tower": True},
               checkpoint={"every_steps": 2})


def assert_complete_hf_folder(path: Path) -> None:
    files = {p.name for p in path.iterdir()}
    need = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processor_config.json"}
    assert need <= files, need - files
    assert "adapter_config.json" not in files


# ---------------------------------------------------------------------------------------------------------
# export


def test_export_merge_equals_adapter_logits(lora_run, tiny_model_dir, tmp_path, image_batch):
    final = lora_run / "final"
    assert main(["export", "--checkpoint", str(final), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert_complete_hf_folder(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(base_model(tiny_model_dir), str(final))
    assert any(bool(p.ne(0).any()) for n, p in adapter.named_parameters() if ".lora_B." in n), "adapter is a no-op"
    want = logits(adapter, image_batch)
    torch.testing.assert_close(logits(merged, image_batch), want, atol=1e-5, rtol=0)
    assert (logits(base_model(tiny_model_dir), image_batch) - want).abs().max() > 1e-4  # the adapter matters
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    assert processor.chat_template and processor.tokenizer.pad_token_id == 151643


def test_export_adapter_without_merge_copies_it(lora_run, tiny_model_dir, tmp_path, image_batch):
    out = tmp_path / "adapter"
    assert main(["export", "--checkpoint", str(lora_run / "final"), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    a = PeftModel.from_pretrained(base_model(tiny_model_dir), str(out))
    b = PeftModel.from_pretrained(base_model(tiny_model_dir), str(lora_run / "final"))
    torch.testing.assert_close(logits(a, image_batch), logits(b, image_batch), atol=0, rtol=0)
    assert main(["export", "--checkpoint", str(lora_run / "final"), "--out", str(out)]) == 2  # not empty


def test_export_checkpoint(lora_run, tiny_model_dir, tmp_path, image_batch):
    step = lora_run / "checkpoints" / "step-000002"
    assert (step / "trainable.safetensors").is_file()
    # Merged from the checkpoint == the final adapter (the checkpoint is of the last step).
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert_complete_hf_folder(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base_model(tiny_model_dir), str(lora_run / "final"))
    torch.testing.assert_close(logits(merged, image_batch), logits(adapter, image_batch), atol=1e-5, rtol=0)
    # Without --merge: a PEFT adapter folder, like the run's final/.
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    again = PeftModel.from_pretrained(base_model(tiny_model_dir), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(again, image_batch), logits(adapter, image_batch), atol=1e-6, rtol=0)


def test_export_full_finetune_loads_with_auto_classes(full_run, tmp_path, image_batch, capsys):
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(full_run / "final"), "--out", str(out)]) == 0
    assert_complete_hf_folder(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template and model.generation_config.eos_token_id == [151645, 151643]
    trained = AutoModelForImageTextToText.from_pretrained(full_run / "final")
    want = logits(trained, image_batch)
    torch.testing.assert_close(logits(model, image_batch), want, atol=0, rtol=0)
    # A full fine-tune's checkpoint exports to the same model (frozen weights come from the base).
    step = full_run / "checkpoints" / "step-000002"
    assert main(["export", "--checkpoint", str(step), "--out", str(tmp_path / "from_ckpt")]) == 0
    assert_complete_hf_folder(tmp_path / "from_ckpt")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "from_ckpt")
    torch.testing.assert_close(logits(again, image_batch), want, atol=0, rtol=0)
    assert main(["export", "--checkpoint", str(full_run / "final"), "--out", str(tmp_path / "m"), "--merge"]) == 2
    assert main(["export", "--checkpoint", str(full_run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "nothing to merge" in err and "looks like a run's output_dir" in err


# ---------------------------------------------------------------------------------------------------------
# generate


def test_generate_one_prompt(lora_run, messages_dir, capsys):
    argv = ["generate", "--model", str(lora_run / "final"), "--image", str(messages_dir / "im1.png"),
            "--prompt", "What is written?", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    model, processor, family = load_for_inference(lora_run / "final")
    assert isinstance(model, PeftModel)
    conv = [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(messages_dir / "im1.png")},
                                         {"type": "text", "text": "What is written?"}]}]
    out, width = Generator(model, processor, family, max_new_tokens=4).generate([conv])
    assert out.shape[1] - width == 4  # greedy ran the whole budget (no EOS from this random model)
    assert printed == processor.tokenizer.decode(out[0, width:], skip_special_tokens=True).strip() + "\n"
    assert main(["generate", "--model", str(lora_run / "final"), "--image", "missing.png", "--prompt", "x"]) == 2


def test_generate_split_batched_equals_one_by_one(lora_run, tiny_model_dir, messages_dir, tmp_path):
    tree = small_recipe(tiny_model_dir, messages_dir, lora_run)
    tree["data"]["validation"] = {"source": str(messages_dir / "val.jsonl"), "format": "messages"}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    for bs in (1, 3):  # --model defaults to output_dir/final: the LoRA adapter
        assert main(["generate", "-c", str(cfg), "--split", "validation", "--out", str(tmp_path / f"p{bs}.jsonl"),
                     "--batch-size", str(bs), "--max-new-tokens", "4", "--limit", "3"]) == 0
    one = [json.loads(x) for x in (tmp_path / "p1.jsonl").read_text().splitlines()]
    batched = [json.loads(x) for x in (tmp_path / "p3.jsonl").read_text().splitlines()]
    assert one == batched
    assert [r["index"] for r in one] == [0, 1, 2] and [r["reference"] for r in one] == ANSWERS[:3]
    for r in one:
        assert set(r) == {"index", "prompt", "reference", "prediction"}
        assert r["prompt"].endswith("<|im_start|>assistant\n") and r["reference"] not in r["prompt"]

    # The strong form: every step's logits of the left-padded batch equal those of each prompt alone.
    recipe = build_recipe(tree)
    model, processor, family = load_for_inference(lora_run / "final", model_cfg=recipe.model)
    ds = ConversationDataset(recipe.data.validation, "data.validation")
    convs = [split_conversation(ds.conversation(i))[0] for i in range(4)]
    gen = Generator(model, processor, family, max_new_tokens=3)
    mask = gen.encode(convs)["attention_mask"]
    assert len(set(mask.sum(1).tolist())) == 4 and not mask[:, -1].eq(0).any()  # left padding, unequal lengths
    out, width = gen.generate(convs, output_logits=True, return_dict_in_generate=True)
    for i, conv in enumerate(convs):
        alone, w1 = gen.generate([conv], output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, w1:])
        for step_logits, step_alone in zip(out.logits, alone.logits, strict=True):
            torch.testing.assert_close(step_logits[i], step_alone[0], atol=1e-4, rtol=0)


def test_generate_usage_errors(lora_run, capsys):
    assert main(["generate", "--split", "validation", "-c", "nope.yaml"]) == 2  # no --out
    assert main(["generate", "--image", "x.png"]) == 2  # no --prompt
    assert main(["generate", "--prompt", "hi"]) == 2  # no --model, no recipe
    err = capsys.readouterr().err
    assert "--split needs --out" in err and "give --prompt" in err and "--model is required" in err
