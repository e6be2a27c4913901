"""Evaluation (vlmtune/evaluate.py): `vlmtune evaluate` on a model or an adapter, re-scoring a predictions file,
the best model during training, think blocks. The metrics themselves: tests/test_scores.py; the 2-rank run:
tests/test_distributed.py; every family: tests/test_families.py."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import small_recipe
from vlmtune.cli import main
from vlmtune.config import build_recipe
from vlmtune.evaluate import better, score
from vlmtune.families import family_for
from vlmtune.scores import score_rows
from vlmtune.train import finetune


@pytest.fixture(scope="module", autouse=True)
def _processors(cached_processors):
    """The tiny model's processor is parsed once for the module's in-process runs (tests/conftest.py)."""


def tree(tiny_model_dir, cord_dir, out, **over) -> dict:
    t = small_recipe(tiny_model_dir, cord_dir, out, max_steps=2)
    t["eval"] = {"max_samples": 3, "max_new_tokens": 6, "batch_size": 2}
    t.update(over)
    return t


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, cord_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-lora")
    t = tree(tiny_model_dir, cord_dir, out, peft={"method": "lora", "r": 4},
             checkpoint={"best": {"metric": "cord_ted"}})
    t["eval"]["every_steps"] = 1
    finetune(build_recipe(t))
    return out, t


def test_evaluation_during_training_writes_rows_metrics_and_the_best_model(lora_run):
    out, _ = lora_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval" in x]
    assert [x["step"] for x in evals] == [1, 2]
    rows = [json.loads(x) for x in (out / "eval" / "step-000002" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["reference"].startswith("<s_menu>") for r in rows)
    # The aggregate is the scores of those very rows (and each row carries its own).
    assert evals[-1]["eval"] == score_rows(rows, ["cord_ted", "cord_f1", "exact_match"])[1]
    timed = json.loads((out / "eval" / "step-000002" / "metrics.json").read_text())
    assert timed["seconds"] > 0 and timed["samples_per_s"] == pytest.approx(3 / timed["seconds"], rel=1e-2)
    summary = json.loads((out / "summary.json").read_text())
    best = json.loads((out / "best" / "best.json").read_text())
    values = {x["step"]: x["eval"]["cord_ted"] for x in evals}
    assert best["metric"] == "cord_ted" and best["value"] == max(values.values())
    assert values[best["step"]] == best["value"] and summary["best"]["step"] == best["step"]
    assert (out / "best" / "adapter_model.safetensors").is_file()  # a LoRA run keeps the adapter


def test_evaluate_an_adapter_then_rescore_the_file(lora_run, tmp_path, capsys):
    """`vlmtune evaluate -c RECIPE --model final/` (an adapter folder) writes rows and metrics; scoring its
    predictions again, with no model, gives the same numbers."""
    out, t = lora_run
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(t))
    assert main(["evaluate", "-c", str(recipe), "--model", str(out / "final"), "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert first["samples"] == 3 and set(first["metrics"]) == {"cord_ted", "cord_f1", "exact_match"}
    assert f"(3 samples in {first['seconds']:.1f} s)" in capsys.readouterr().out
    assert all(set(r) >= {"index", "prompt", "reference", "prediction", "scores"} for r in rows)
    assert main(["evaluate", "--predictions", str(tmp_path / "a" / "predictions.jsonl"),
                 "--metrics", "cord_ted,cord_f1,exact_match", "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["metrics"] == first["metrics"]
    assert "cord_ted" in capsys.readouterr().out


def test_unknown_metric_and_missing_metrics_are_clear(tiny_model_dir, cord_dir, tmp_path, capsys):
    with pytest.raises(Exception, match=r"eval.metrics: unknown metric 'rouge-l'; did you mean 'rouge_l'"):
        build_recipe(tree(tiny_model_dir, cord_dir, tmp_path, eval={"metrics": ["rouge-l"]}))
    assert main(["evaluate", "--predictions", "x.jsonl", "--out", str(tmp_path / "o")]) == 2
    assert "needs --metrics" in capsys.readouterr().err
    t = tree(tiny_model_dir, cord_dir, tmp_path, checkpoint={"best": {"metric": "bleu"}},
             eval={"metrics": ["cord_ted"]})
    with pytest.raises(Exception, match=r"checkpoint.best.metric: .bleu. is not among the eval metrics"):
        build_recipe(t)


def test_think_blocks_are_stripped_before_scoring():
    """A Thinking model's reasoning is not scored; Kimi-VL marks it with its own tags."""
    rows = [{"reference": "42", "prediction": "<think>6 x 7</think>42"},
            {"reference": "42", "prediction": "◁think▷6 x 7◁/think▷ 42"}]
    assert score([dict(r) for r in rows[:1]], ["exact_match"], family_for("qwen3_vl").think_tags) == {
        "exact_match": 1.0}
    assert score([dict(r) for r in rows[1:]], ["exact_match"], family_for("kimi_vl").think_tags) == {
        "exact_match": 1.0}
    assert score([dict(r) for r in rows[:1]], ["exact_match"], None) == {"exact_match": 0.0}


def test_better_follows_the_metric_direction():
    assert better(0.5, None, "cord_ted", None) and better(0.6, 0.5, "cord_ted", None)
    assert better(0.1, 0.2, "cer", None) and not better(0.3, 0.2, "cer", None)
    assert better(0.1, 0.2, "cord_ted", "min")


def test_generation_stops_at_the_family_end_of_turn(tiny_model_dir):
    """Generation ends at the family's end-of-turn token even where the model's generation config lacks it."""
    from vlmtune.config import ModelConfig
    from vlmtune.generate import Generator
    from vlmtune.model import load_model

    model, processor, family = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    model.generation_config.eos_token_id = 151643  # only <|endoftext|>
    gen = Generator(model.eval(), processor, family, max_new_tokens=4)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen.generation_config.eos_token_id and 151643 in gen.generation_config.eos_token_id
