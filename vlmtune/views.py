"""Samples as a person checks them: the tokens with the trained ones marked, and each image as decoded.

`vlmtune inspect` prints these views; a training run writes the first few to ``label_samples.jsonl`` for
`vlmtune report`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path

from vlmtune.data.media import image_summary
from vlmtune.encode import IGNORE, Encoded, EncodedDataset, media_of


def trained_runs(ids: list[int], labels: list[int]) -> list[tuple[list[int], bool]]:
    """Consecutive runs of (token ids, trained?)."""
    runs: list[tuple[list[int], bool]] = []
    for tok, lab in zip(ids, labels, strict=True):
        trained = lab != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return runs


def sample_view(sample: Encoded, conversation: list[dict], decode: Callable[[list[int]], str],
                thumbnail: int = 0) -> dict:
    """One encoded sample as JSON: its ids and labels, the text as runs of (text, trained?), and its images as
    decoded (size, mean per channel 0-255, a thumbnail when `thumbnail` > 0), before the processor resizes them."""
    ids, labels = sample.tensors[sample.ids_key].tolist(), sample.tensors["labels"].tolist()
    runs = [[decode(toks), trained] for toks, trained in trained_runs(ids, labels)]
    return {"index": sample.index, "input_ids": ids, "labels": labels, "text": decode(ids), "runs": runs,
            "trained_spans": [text for text, trained in runs if trained],
            "images": [image_summary(im, thumbnail) for im in media_of(conversation, "image")]}


def write_label_samples(path: Path, ds: EncodedDataset, decode: Callable[[list[int]], str], n: int = 3) -> None:
    """The first `n` usable samples of `ds` as :func:`sample_view` rows (with thumbnails), one JSON per line."""
    lines = []
    for index in range(len(ds)):
        if len(lines) == n:
            break
        sample = ds[index]
        if isinstance(sample, Encoded):
            view = sample_view(sample, ds.conversations.conversation(index), decode, thumbnail=160)
            lines.append(json.dumps({k: view[k] for k in ("index", "runs", "images")} | {"split": "train"},
                                    ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines))


def render_text(view: dict) -> str:
    """The sample for a terminal: trained text in bold green."""
    return "".join(f"\x1b[1;32m{text}\x1b[0m" if trained else text for text, trained in view["runs"])


def render_html(view: dict) -> str:
    """The sample as a page: trained text highlighted, the images as thumbnails with their size and means."""
    body = "".join(f'<mark title="trained">{html.escape(text)}</mark>' if trained else html.escape(text)
                   for text, trained in view["runs"])
    images = "".join(f'<figure><img src="{im["thumbnail"]}" alt="image {i}"><figcaption>{im["width"]} x '
                     f'{im["height"]}, mean RGB {", ".join(f"{m:.0f}" for m in im["mean"])}</figcaption></figure>'
                     for i, im in enumerate(view["images"]) if im.get("thumbnail", "").startswith("data:image/png"))
    return ("<!doctype html><meta charset='utf-8'><title>vlmtune inspect</title><style>body{font-family:monospace}"
            "#text{white-space:pre-wrap}mark{background:#b6f2b6}figure{display:inline-block;margin:4px}"
            "img{border:1px solid #999;max-width:256px}</style>"
            f"<div id='images'>{images}</div><p>Highlighted: trained tokens (labels != -100).</p>"
            f"<div id='text'>{body}</div>\n")
