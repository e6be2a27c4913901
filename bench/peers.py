"""One benchmark run per process: ``python bench/peers.py {prep|vlmtune|trl|trainer} SPEC.json RESULT.json``.

bench/compare.py writes SPEC.json, starts this script once per peer (so each run's peak RSS is its own) and
reads RESULT.json. Every run records, per optimizer step: the wall-clock time at the end of the step, the loss
the trainer reports, the learning rate the step used, and the tokens of its micro-batches (counted on the
collated batches with the same function for all three, benchlib.batch_stats).
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # bench/ is not a package: found through sys.path

# ---------------------------------------------------------------------------------------------------------
# prep: the model and the data, once, in their own process


def run_prep(spec: dict) -> dict:
    m = spec["model"]
    config = benchlib.bench_model_config(m["hidden_size"], m["layers"], m["vision_hidden"], m["vision_depth"])
    info = benchlib.build_model(Path(spec["model_dir"]), config, seed=spec["seed"], pixels=spec["pixels"])
    order = benchlib.vlmtune_order(spec["n_train"], spec["steps"] * spec["global_batch"], spec["seed"])
    if spec.get("workload") == "mixed":  # already in TRL's {images, messages} format: no rows to rebuild
        benchlib.write_mixed_data(Path(spec["data_dir"]), spec["n_train"], seed=spec["seed"])
        return {"model": info, "order": order, "rows": []}
    data_dir = benchlib.write_data(Path(spec["data_dir"]), spec["n_train"], seed=spec["seed"],
                                   image_size=tuple(spec["image_size"]))
    rows = benchlib.peer_rows(data_dir, order)
    return {"model": info, "order": order, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# vlmtune: the public entry point, finetune(build_recipe(tree)); two observation hooks, nothing else changed


def vlmtune_tree(spec: dict, out_dir: Path, packing: bool) -> dict:
    train = {"max_steps": spec["steps"], "micro_batch_size": spec["micro_batch"],
             "global_batch_size": spec["global_batch"], "lr": spec["lr"], "warmup_steps": spec["warmup"],
             "schedule": "cosine", "min_lr_ratio": spec["min_lr_ratio"], "weight_decay": 0.0,
             "max_grad_norm": spec["max_grad_norm"], "seed": spec["seed"], "max_length": spec["max_length"],
             "log_every_steps": 1, "device": "cpu"}
    if packing:
        train["packing"] = True
    return {"output_dir": str(out_dir), "model": {"name_or_path": spec["model_dir"], "dtype": "float32"},
            "data": {"train": {"source": spec["data_dir"], "split": "train",
                               "format": "messages" if spec.get("workload") == "mixed" else "cord_v2"},
                     "num_workers": 0},
            "train": train}


def run_vlmtune(spec: dict, packing: bool = False) -> dict:
    from vlmtune.config import RecipeError, build_recipe

    out_dir = Path(spec["workdir"]) / ("vlmtune-packed" if packing else "vlmtune")
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run (vlmtune refuses an output_dir with checkpoints)
    try:
        recipe = build_recipe(vlmtune_tree(spec, out_dir, packing))
    except RecipeError as e:
        return {"rejected": str(e)}

    import vlmtune.metrics
    import vlmtune.train

    # Hook 1: count every micro-batch as the loop moves it to the device (train.py looks `to_device` up at each
    # call; it runs in this process whatever data.num_workers is). Hook 2: a timestamp when the loop hands a
    # finished optimizer step to Metrics.step. Both only observe.
    batches: list[dict] = []
    step_ends: list[tuple[float, float]] = []
    hooks = []
    if hasattr(vlmtune.train, "to_device"):
        original_to_device = vlmtune.train.to_device

        def to_device(batch, *args, **kwargs):
            if "labels" in batch:
                batches.append(benchlib.batch_stats(batch))
            return original_to_device(batch, *args, **kwargs)

        vlmtune.train.to_device = to_device
        hooks.append("to_device")
    original_step = vlmtune.metrics.Metrics.step

    def timed_step(self, *args, **kwargs):
        step_ends.append((benchlib.now(), benchlib.cpu_now()))
        return original_step(self, *args, **kwargs)

    vlmtune.metrics.Metrics.step = timed_step
    hooks.append("Metrics.step")

    rss_before = benchlib.vm_rss_kib()  # imports only: vlmtune loads the model inside finetune
    t0 = benchlib.now()
    vlmtune.train.finetune(recipe)
    t_end = benchlib.now()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    summary = json.loads((out_dir / "summary.json").read_text())
    steps = []
    for i, r in enumerate(records):
        step = {"step": r["step"], "loss": r["loss"], "lr": r["lr"], "grad_norm": r.get("grad_norm"),
                "tokens_reported": r.get("tokens"), "supervised_reported": r.get("supervised_tokens"),
                # fallback clock: vlmtune's own step time (data fetch .. optimizer step)
                "elapsed_reported": r["tokens"] / r["tokens_per_s"] if r.get("tokens_per_s") else None}
        if i < len(step_ends):
            step["t_end"], step["cpu_end"] = step_ends[i]
        steps.append(step)
    return {"steps": steps, "batches": batches, "t_start": t0, "t_finish": t_end, "hooks": hooks,
            "rss_before_train_kib": rss_before, "rss_before_train_what": "after imports",
            "skipped": summary.get("skipped"), "final_loss_reported": summary.get("final_loss"),
            "config": {"optimizer": "torch.optim.AdamW via vlmtune (param groups by part; weight_decay 0)",
                       "loss": "sum of token losses over the step's supervised tokens / their count; logits only at "
                               "supervised positions (logits_to_keep)",
                       "labels": "answer + <|im_end|> (vlmtune SampleEncoder)"}}


# ---------------------------------------------------------------------------------------------------------
# transformers.Trainer and TRL's SFTTrainer: the same arguments, our optimizer and scheduler


def load_model_and_processor(spec: dict):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # As vlmtune loads it: fp32 weights, sdpa attention, train mode.
    model = AutoModelForImageTextToText.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                        attn_implementation="sdpa")
    model.train()
    processor = AutoProcessor.from_pretrained(spec["model_dir"])
    return model, processor


def optimizer_and_scheduler(model, spec: dict):
    """AdamW (torch, not fused: what vlmtune builds on CPU) + vlmtune's warmup/cosine schedule, per optimizer step."""
    import torch

    from vlmtune.train import lr_lambda  # the very schedule vlmtune uses

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_lambda, warmup=spec["warmup"], total=spec["steps"], schedule="cosine",
        min_ratio=spec["min_lr_ratio"]))
    return optimizer, scheduler


def normalisation(trainer) -> str:
    """How this trainer normalises the step's loss: Trainer counts and passes ``num_items_in_batch`` only to models
    that accept loss kwargs (Qwen2.5-VL's class sets ``accepts_loss_kwargs = False``); otherwise each micro-batch's
    loss is its own mean, divided by the accumulation steps."""
    if trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None:
        return "sum / num_items_in_batch (the step's supervised tokens over all micro-batches)"
    return ("a mean of micro-batch means (each micro-batch's mean / accumulation steps: the model class sets "
            "accepts_loss_kwargs=False, so Trainer passes no num_items_in_batch)")


def common_args(spec: dict, out_dir: Path) -> dict:
    return dict(output_dir=str(out_dir), per_device_train_batch_size=spec["micro_batch"],
                gradient_accumulation_steps=spec["global_batch"] // spec["micro_batch"], max_steps=spec["steps"],
                learning_rate=spec["lr"], weight_decay=0.0, max_grad_norm=spec["max_grad_norm"], seed=spec["seed"],
                data_seed=spec["seed"], train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                eval_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                gradient_checkpointing=False, dataloader_num_workers=0, dataloader_pin_memory=False,
                disable_tqdm=True)


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Per optimizer step: the lr it used (read at its start), its end time, the loss the trainer logs."""

        def __init__(self):
            self.steps: list[dict] = []
            self.lr = None

        def on_step_begin(self, args, state, control, **kwargs):
            scheduler = kwargs.get("lr_scheduler")
            self.lr = scheduler.get_last_lr()[0] if scheduler is not None else None

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append({"step": state.global_step, "t_end": benchlib.now(), "cpu_end": benchlib.cpu_now(),
                               "lr": self.lr})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.steps and self.steps[-1]["step"] == state.global_step:
                self.steps[-1]["loss"] = logs["loss"]
                self.steps[-1]["grad_norm"] = logs.get("grad_norm")

    return StepClock()


class AssistantSpanCollator:
    """The plain Trainer's collator, written here: render with the processor's own chat template, let the
    processor expand the image tokens and pad on the right, then label exactly each assistant answer and its
    <|im_end|> (found as the token runs after '<|im_start|>assistant\\n' up to the next '<|im_end|>');
    everything else, padding included, is -100."""

    def __init__(self, processor):
        self.processor = processor
        tok = processor.tokenizer
        self.start = tok(benchlib.ASSISTANT_START, add_special_tokens=False)["input_ids"]
        self.end = tok(benchlib.ASSISTANT_END, add_special_tokens=False)["input_ids"]

    @staticmethod
    def conversation(example: dict) -> list[dict]:
        user, assistant = example["messages"]
        return [{"role": "user", "content": [*({"type": "image"} for _ in example["images"]),
                                             {"type": "text", "text": user["content"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": assistant["content"]}]}]

    def spans(self, ids: list[int]) -> list[tuple[int, int]]:
        out, i, n, m = [], 0, len(self.start), len(self.end)
        while i <= len(ids) - n:
            if ids[i : i + n] == self.start:
                b = j = i + n
                while j <= len(ids) - m and ids[j : j + m] != self.end:
                    j += 1
                if j > len(ids) - m:
                    break  # an answer that never ends: not trained
                out.append((b, j + m))
                i = j + m
            else:
                i += 1
        return out

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        texts = [self.processor.apply_chat_template(self.conversation(ex), tokenize=False) for ex in examples]
        images = [list(ex["images"]) for ex in examples]  # the mixed workload: [] for a text-only sample
        batch = self.processor(text=texts, images=images if any(images) else None, padding=True,
                               padding_side="right", return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], benchlib.IGNORE)
        for row, ids in enumerate(batch["input_ids"].tolist()):
            found = self.spans(ids)
            if len(found) != 1:
                raise RuntimeError(f"expected one assistant turn, found {len(found)}")
            for b, e in found:
                labels[row, b:e] = batch["input_ids"][row, b:e]
        batch["labels"] = labels
        return dict(batch)


def run_hf(spec: dict, which: str) -> dict:
    model, processor = load_model_and_processor(spec)
    rows = json.loads(Path(spec["rows_file"]).read_text())
    dataset = benchlib.peer_dataset(Path(spec["data_dir"]), rows["order"], rows["rows"])
    optimizer, scheduler = optimizer_and_scheduler(model, spec)
    clock = step_clock()
    out_dir = Path(spec["workdir"]) / which
    shutil.rmtree(out_dir, ignore_errors=True)
    batches: list[dict] = []
    config: dict = {"optimizer": "torch.optim.AdamW (passed in), weight_decay 0",
                    "schedule": "LambdaLR with vlmtune's warmup + cosine multiplier (passed in)",
                    "sampler": "sequential over the dataset pre-ordered as vlmtune's sampler reads it"}
    if which == "trainer":
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(**common_args(spec, out_dir), remove_unused_columns=False)
        collator = AssistantSpanCollator(processor)
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=benchlib.CountingCollator(collator, batches),
                          optimizers=(optimizer, scheduler), callbacks=[clock])
        config.update(loss=f"the model's own loss (ForCausalLMLoss), full logits; {normalisation(trainer)}",
                      labels="answer + <|im_end|> (harness collator, spans located in the token ids)")
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common_args(spec, out_dir), assistant_only_loss=True, max_length=None, packing=False,
                         padding_free=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                             optimizers=(optimizer, scheduler), callbacks=[clock])
        from trl.chat_template_utils import qwen2_5_vl_training_chat_template

        swapped = trainer.chat_template
        config.update(
            loss=f"SFTTrainer nll, TRL's fused LM head (no full logits); {normalisation(trainer)}",
            labels="TRL assistant mask from {% generation %} markers: answer + <|im_end|> + '\\n'",
            chat_template=("TRL swapped in its qwen2_5_vl training template" if swapped is not None
                           and swapped == qwen2_5_vl_training_chat_template
                           else "no TRL template swap" if swapped is None else "TRL swapped in another template"),
        )
        trainer.data_collator = benchlib.CountingCollator(trainer.data_collator, batches)
    config["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
    rss_before = benchlib.vm_rss_kib()
    t0 = benchlib.now()
    trainer.train()
    t_end = benchlib.now()
    return {"steps": clock.steps, "batches": batches, "t_start": t0, "t_finish": t_end, "config": config,
            "rss_before_train_kib": rss_before, "rss_before_train_what": "after imports, model and data loaded"}


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("prep", "vlmtune", "vlmtune-packed", "trl", "trainer"):
        print(__doc__, file=sys.stderr)
        return 2
    which, spec_file, result_file = argv[0], Path(argv[1]), Path(argv[2])
    spec = json.loads(spec_file.read_text())
    try:
        import torch

        torch.manual_seed(spec.get("seed", 0))
        if which == "prep":
            result = run_prep(spec)
        elif which.startswith("vlmtune"):
            result = run_vlmtune(spec, packing=which == "vlmtune-packed")
        else:
            result = run_hf(spec, which)
        result["threads"] = torch.get_num_threads()
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    result["vm_hwm_kib"] = benchlib.vm_hwm_kib()
    benchlib.write_json(result_file, result)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
