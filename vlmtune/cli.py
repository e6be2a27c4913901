"""argv -> Recipe -> command. ``vlmtune finetune | inspect | export | generate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlmtune.config import EvalConfig, apply_overrides, build_recipe, load_yaml, parse_override
from vlmtune.errors import GenerateError, RecipeError, VlmtuneError


def recipe_from_args(args: argparse.Namespace, build_demo: bool = True):
    """The recipe file (or, without one, the embedded demo) plus ``key=value`` overrides."""
    if args.config:
        tree = load_yaml(args.config)
    else:
        out = "runs/demo"
        for item in args.overrides:  # the demo inputs live under output_dir, so read it first
            path, value = parse_override(item)
            if path == ["output_dir"]:
                out = str(value)
        from vlmtune.demo import default_recipe

        tree = default_recipe(Path(out)) if build_demo else {}
    return build_recipe(apply_overrides(tree, args.overrides))


def cmd_finetune(args: argparse.Namespace) -> int:
    from vlmtune.train import finetune

    finetune(recipe_from_args(args))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vlmtune.encode import EncodedDataset, Skipped, make_encoder
    from vlmtune.families import family_for
    from vlmtune.model import load_config, load_processor
    from vlmtune.views import render_html, render_text, sample_view

    recipe = recipe_from_args(args)
    processor = load_processor(recipe.model)
    family = family_for(load_config(recipe.model).model_type)
    spec = recipe.data.train if args.split == "train" else recipe.data.validation
    if spec is None:
        raise RecipeError("inspect --split validation: the recipe has no data.validation")
    encoder = make_encoder(processor, family, recipe.train.max_length, recipe.train.overlong)
    ds = EncodedDataset.of(spec, encoder, f"data.{args.split}", max_image_pixels=recipe.data.max_image_pixels,
                           video=recipe.data.video)
    if not 0 <= args.index < len(ds):
        raise RecipeError(f"--index {args.index} is out of range: data.{args.split} has {len(ds)} rows")
    item = ds[args.index]
    if isinstance(item, Skipped):
        print(f"sample {args.index} would be skipped ({item.reason}): {item.message}", file=sys.stderr)
        return 1
    view = sample_view(item, ds.conversations.conversation(args.index), processor.tokenizer.decode,
                       thumbnail=256 if args.format == "html" else 0)
    if args.format == "json":
        out = json.dumps({k: view[k] for k in ("input_ids", "labels", "text", "trained_spans", "images", "videos",
                                               "media")},
                         ensure_ascii=False)
    else:
        out = render_html(view) if args.format == "html" else render_text(view)
    if args.out:
        Path(args.out).write_text(out + ("\n" if not out.endswith("\n") else ""))
    else:
        print(out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vlmtune.evaluate import evaluate_recipe, rescore

    if args.predictions:
        if args.config or args.model or args.adapter:
            raise RecipeError("evaluate --predictions scores a file again, with no model: drop -c / --model / "
                              "--adapter, or drop --predictions to generate anew")
        if not args.metrics:
            raise RecipeError("evaluate --predictions needs --metrics m1,m2 (e.g. --metrics exact_match,anls)")
        record = rescore(args.predictions, args.metrics.split(","), args.out)
    else:
        recipe = recipe_from_args(args)
        if args.metrics:
            recipe.eval = (recipe.eval or EvalConfig()).model_copy(update={"metrics": args.metrics.split(",")})
        record = evaluate_recipe(recipe, args.out, args.split, args.model, args.adapter, args.limit)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
    took = f" ({record['samples']} samples in {record['seconds']:.1f} s)" if "seconds" in record else ""
    print(f"vlmtune evaluate: {shown}{took}\n  predictions and metrics: {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vlmtune.report import build_report

    out = build_report(args.run_dir, args.out, png=args.png)
    print(f"vlmtune report: {out}" + (" (and PNG plots beside it)" if args.png else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vlmtune.export import describe, export

    out = export(args.checkpoint, args.out, merge=args.merge, dtype=args.dtype, base=args.base,
                 trust_remote_code=args.trust_remote_code)
    print(f"vlmtune export: {describe(out)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from vlmtune.config import ModelConfig
    from vlmtune.generate import default_model, generate_one, generate_split

    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--limit", args.limit)):
        if value is not None and value < 1:
            raise GenerateError(f"{flag} must be >= 1 (got {value})")
    if args.split:
        if args.prompt is not None or args.image is not None or args.video is not None:
            raise GenerateError("--split generates for a data split, --prompt / --image / --video for one prompt; "
                                "pick one")
        if not args.out:
            raise GenerateError("--split needs --out PREDICTIONS.jsonl")
        recipe = recipe_from_args(args)
        if args.device:
            recipe.train.device = args.device
        if args.dtype:
            recipe.model.dtype = args.dtype
        out, n, skipped = generate_split(recipe, args.split, args.out, args.model, args.adapter, args.limit,
                                         args.batch_size, args.max_new_tokens, args.temperature)
        print(f"vlmtune generate: {n} prediction(s) -> {out}" + (f"; {skipped} unreadable sample(s) skipped"
                                                                   if skipped else ""))
        return 0
    if args.prompt is None:
        raise GenerateError("give --prompt (and --image / --video) for one answer, or --split and --out for a data "
                            "split")
    model, model_cfg, device, video_cfg = args.model, None, args.device, None
    if model is None:
        if not args.config:
            raise GenerateError("--model is required (or -c RECIPE to use that run's model)")
        recipe = recipe_from_args(args)
        model, model_cfg, device = default_model(recipe), recipe.model, device or recipe.train.device
        video_cfg = recipe.data.video
    if args.dtype:
        model_cfg = (model_cfg or ModelConfig(name_or_path=model)).model_copy(update={"dtype": args.dtype})
    print(generate_one(model, args.image, args.prompt, args.adapter, args.max_new_tokens, args.temperature,
                       device or "auto", model_cfg, args.video, video_cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune", description="Fine-tune vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("-c", "--config", help="recipe YAML (default: the embedded offline demo)")
        sp.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=100")
        return sp

    with_recipe("finetune", "train a model (SFT) from a recipe").set_defaults(func=cmd_finetune)
    sp = with_recipe("inspect", "show one processed sample with its trained tokens marked")
    sp.add_argument("--index", type=int, default=0)
    sp.add_argument("--split", choices=["train", "validation"], default="train")
    sp.add_argument("--format", choices=["text", "json", "html"], default="text")
    sp.add_argument("--out", help="write to this file instead of stdout")
    sp.set_defaults(func=cmd_inspect)

    sp = with_recipe("evaluate", "generate on a data split and score it with task metrics (or score a predictions "
                                 "file again)")
    sp.add_argument("--out", required=True, help="folder for predictions.jsonl and metrics.json")
    sp.add_argument("--model", help="model folder or hub id, or an adapter folder whose config names its base "
                                    "(default: output_dir/final if it exists, else model.name_or_path)")
    sp.add_argument("--adapter", help="a PEFT adapter folder to load on top of --model")
    sp.add_argument("--split", choices=["train", "validation"], help="default: the recipe's eval.split (validation)")
    sp.add_argument("--limit", type=int, help="only the first N samples of the split")
    sp.add_argument("--metrics", help="comma-separated metrics (default: the recipe's eval.metrics, else the data "
                                      "format's defaults)")
    sp.add_argument("--predictions", help="score this predictions.jsonl again (rows with reference and prediction)")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("report", help="one self-contained HTML page of a run (curves, samples, evaluation)")
    sp.add_argument("run_dir", help="a run's output_dir")
    sp.add_argument("--out", help="the HTML file (default: RUN_DIR/report.html)")
    sp.add_argument("--png", action="store_true", help="also PNG plots of the curves beside it")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("export", help="write a trained model (or adapter) as a complete Hugging Face folder")
    sp.add_argument("--checkpoint", required=True,
                    help="a run's final/ folder (full model or PEFT adapter) or a checkpoints/step-N folder")
    sp.add_argument("--out", required=True, help="destination folder (new or empty)")
    sp.add_argument("--merge", action="store_true", help="merge LoRA weights into the base (merge_and_unload)")
    sp.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="dtype of the saved weights (auto: as the input, or the base's for a merge)")
    sp.add_argument("--base", help="base model of an adapter (default: adapter_config.json's)")
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="run the model's own Python code (only this flag turns it on, never a file in the checkpoint)")
    sp.set_defaults(func=cmd_export)

    sp = with_recipe("generate", "answer one image / video + prompt, or write predictions for a data split (JSONL)")
    sp.add_argument("--model", help="model folder or hub id, or an adapter folder whose config names its base "
                                    "(default with -c: output_dir/final if it exists, else model.name_or_path)")
    sp.add_argument("--adapter", help="a PEFT adapter folder to load on top of --model")
    sp.add_argument("--image", help="image file (single-prompt mode)")
    sp.add_argument("--video", help="video file or folder of frames (single-prompt mode; frames sampled as the "
                                    "recipe's data.video says, else as the model's video processor does)")
    sp.add_argument("--prompt", help="prompt text (single-prompt mode)")
    sp.add_argument("--split", choices=["train", "validation"], help="generate for this data split of the recipe")
    sp.add_argument("--out", help="predictions JSONL (with --split)")
    sp.add_argument("--limit", type=int, help="only the first N samples of the split")
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                    help="default: the recipe's train.device, else auto")
    sp.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                    help="weights dtype (default: the recipe's model.dtype, else auto = fp32 + bf16 autocast on CUDA)")
    sp.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VlmtuneError as e:  # every error a user can cause (vlmtune/errors.py): one message, exit code 2
        print(f"vlmtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
