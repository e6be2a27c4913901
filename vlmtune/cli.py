"""argv -> Recipe -> command. ``vlmtune finetune | inspect``."""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from vlmtune.config import RecipeError, apply_overrides, build_recipe, load_yaml, parse_override

USER_ERRORS: tuple[type[Exception], ...] = (RecipeError,)


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


def trained_runs(ids: list[int], labels: list[int]) -> list[tuple[list[int], bool]]:
    """Consecutive runs of (token ids, trained?)."""
    runs: list[tuple[list[int], bool]] = []
    for tok, lab in zip(ids, labels, strict=True):
        trained = lab != -100
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return runs


def render_runs(runs, decode, fmt: str) -> str:
    parts = []
    for toks, trained in runs:
        text = decode(toks)
        if fmt == "html":
            text = html.escape(text)
            parts.append(f'<mark title="trained">{text}</mark>' if trained else text)
        else:
            parts.append(f"\x1b[1;32m{text}\x1b[0m" if trained else text)
    body = "".join(parts)
    if fmt == "html":
        return ("<!doctype html><meta charset='utf-8'><title>vlmtune inspect</title><style>body{font-family:"
                "monospace;white-space:pre-wrap}mark{background:#b6f2b6}</style><p>Highlighted: trained tokens"
                f" (labels != -100).</p><div>{body}</div>\n")
    return body


def cmd_inspect(args: argparse.Namespace) -> int:
    from vlmtune.collate import SampleEncoder, Skipped
    from vlmtune.data.dataset import SFTDataset
    from vlmtune.families import family_for
    from vlmtune.model import load_config, load_processor

    recipe = recipe_from_args(args)
    processor = load_processor(recipe.model)
    family = family_for(load_config(recipe.model).model_type)
    spec = recipe.data.train if args.split == "train" else recipe.data.validation
    if spec is None:
        raise RecipeError("inspect --split validation: the recipe has no data.validation")
    encoder = SampleEncoder(processor, family, recipe.train.max_length, recipe.train.overlong)
    ds = SFTDataset(spec, encoder, f"data.{args.split}")
    if not 0 <= args.index < len(ds):
        raise RecipeError(f"--index {args.index} is out of range: data.{args.split} has {len(ds)} rows")
    item = ds[args.index]
    if isinstance(item, Skipped):
        print(f"sample {args.index} would be skipped ({item.reason}): {item.message}", file=sys.stderr)
        return 1
    ids, labels = item.tensors["input_ids"].tolist(), item.tensors["labels"].tolist()
    decode = processor.tokenizer.decode
    runs = trained_runs(ids, labels)
    if args.format == "json":
        out = json.dumps({"input_ids": ids, "labels": labels, "text": decode(ids),
                          "trained_spans": [decode(t) for t, trained in runs if trained]}, ensure_ascii=False)
    else:
        out = render_runs(runs, decode, args.format)
    if args.out:
        Path(args.out).write_text(out + ("\n" if not out.endswith("\n") else ""))
    else:
        print(out)
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
    return p


def user_errors() -> tuple[type[Exception], ...]:
    from vlmtune.data.formats import DataError
    from vlmtune.families import FamilyError
    from vlmtune.model import ModelLoadError

    return (*USER_ERRORS, DataError, ModelLoadError, FamilyError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"vlmtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
