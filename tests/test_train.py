"""The loop: loss normalisation, padding/position-id invariance, determinism, save/reload parity, the demo CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import small_recipe
from vlmtune.batching import collate
from vlmtune.checkpoint import save_hf
from vlmtune.config import DataSource, ModelConfig, build_recipe
from vlmtune.encode import EncodedDataset
from vlmtune.model import load_model
from vlmtune.train import finetune, loss_sum


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """The tiny model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))


@pytest.fixture(scope="module")
def samples(loaded, cord_dir, encoder):
    ds = EncodedDataset.of(DataSource(source=str(cord_dir), format="cord_v2"), encoder, "data.train")
    return [ds[i] for i in range(4)]


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_four_micro_batches_of_one_equal_one_batch_of_four(loaded, samples):
    model, processor, _ = loaded
    pad = processor.tokenizer.pad_token_id
    assert len({s.length for s in samples}) > 1  # different lengths, so the big batch really pads

    total = sum(s.supervised for s in samples)
    model.zero_grad()
    big = loss_sum(model, collate(samples, pad)) / total
    big.backward()
    big = big.detach()
    g_big = grads_of(model)

    model.zero_grad()
    small = 0.0
    for s in samples:
        loss = loss_sum(model, collate([s], pad)) / total
        loss.backward()
        small += float(loss.detach())
    g_small = grads_of(model)
    model.zero_grad()

    assert small == pytest.approx(big.item(), abs=1e-5)
    assert g_big.keys() == g_small.keys()
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], atol=1e-6, rtol=1e-4, msg=name)
    # And it is not the mean of per-batch means: that would differ when token counts differ.
    with torch.no_grad():
        mean_of_means = sum(float(loss_sum(model, collate([s], pad))) / s.supervised for s in samples) / 4
    assert abs(mean_of_means - float(big)) > 1e-4


@torch.no_grad()
def test_padding_and_positions_do_not_change_logits(loaded, samples):
    """A sample's logits are the same alone and right-padded in a batch beside a longer one (mRoPE positions)."""
    model, processor, _ = loaded
    model.eval()
    short, long_ = sorted(samples[:2], key=lambda s: s.length)
    pad = processor.tokenizer.pad_token_id
    inputs = {k: v for k, v in collate([short], pad).items() if isinstance(v, torch.Tensor) and k != "labels"}
    alone = model(**inputs).logits[0]
    both = {k: v for k, v in collate([short, long_], pad).items() if isinstance(v, torch.Tensor) and k != "labels"}
    batched = model(**both).logits[0, : short.length]
    model.train()
    torch.testing.assert_close(batched, alone, atol=2e-5, rtol=1e-4)


def test_micro_batching_does_not_change_the_run(tmp_path, tiny_model_dir, cord_dir):
    """The whole loop: 4 micro-batches of 1 vs 1 micro-batch of 4 give the same losses."""
    losses = {}
    for mb in (1, 4):
        tree = small_recipe(tiny_model_dir, cord_dir, tmp_path / f"mb{mb}", micro_batch_size=mb,
                            global_batch_size=4, max_steps=2)
        tree["data"]["validation"] = None
        finetune(build_recipe(tree))
        lines = [json.loads(x) for x in (tmp_path / f"mb{mb}" / "metrics.jsonl").read_text().splitlines()]
        losses[mb] = [x["loss"] for x in lines]
        assert [x["step"] for x in lines] == [1, 2]
    assert losses[1] == pytest.approx(losses[4], abs=1e-5)


def test_runs_are_deterministic_and_metrics_complete(tmp_path, tiny_model_dir, cord_dir):
    runs = []
    for name in ("a", "b"):
        finetune(build_recipe(small_recipe(tiny_model_dir, cord_dir, tmp_path / name, max_steps=3,
                                           val_every_steps=2)))
        runs.append([json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    strip = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in run] for run in runs]
    assert strip[0] == strip[1]
    steps = [r for r in runs[0] if "loss" in r]
    vals = [r for r in runs[0] if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in vals] == [2, 3]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_s"):
        assert key in steps[0]
    assert 0 < steps[0]["supervised_tokens"] < steps[0]["tokens"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped"] == {}


def test_saved_model_reloads_with_same_logits(tmp_path, loaded, samples):
    model, processor, _ = loaded
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # move the weights away from the saved init
    loss_sum(model, collate(samples[:1], processor.tokenizer.pad_token_id)).backward()
    opt.step()
    model.zero_grad()
    out = save_hf(model, processor, tmp_path / "final")
    for f in ("model.safetensors", "config.json", "processor_config.json", "tokenizer_config.json",
              "chat_template.jinja", "generation_config.json"):
        assert (out / f).is_file(), f
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    proc2 = AutoProcessor.from_pretrained(out)
    batch = collate(samples[:1], processor.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    model.train()
    assert proc2.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                     tokenize=False) == processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)


def test_demo_cli_end_to_end(tmp_path):
    """`vlmtune finetune` with no recipe, in a real process: builds the offline demo, trains, loss falls, writes a
    loadable model. (6 of the demo's 30 steps, validation every 3.)"""
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "vlmtune", "finetune", f"output_dir={out}", "train.max_steps=6",
                           "train.val_every_steps=3", "train.warmup_steps=1", "eval.every_steps=3",
                           "eval.max_new_tokens=8"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model: {out / 'final'}" in proc.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    # From ln(151936) = 11.9 at the random init: the loss falls by about 0.7 in 6 steps.
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5
    val = [(x["step"], x["val_loss"]) for x in lines if "val_loss" in x]
    assert [step for step, _ in val] == [3, 6] and val[1][1] < val[0][1]
    # The receipts of the validation split are generated and scored during training and after the last step.
    evals = [x for x in lines if "eval" in x]
    assert [x["step"] for x in evals] == [3, 6] and all(x["eval_samples"] == 8 for x in evals)
    assert all(set(x["eval"]) == {"cord_ted", "cord_f1", "exact_match"} for x in evals)
    assert (out / "eval" / "step-000006" / "predictions.jsonl").read_text().count("\n") == 8
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["train"]["max_steps"] == 6
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert model.config.model_type == "qwen2_5_vl"
