"""Samples as a person checks them: the tokens with the trained ones marked, each image as decoded, and each video
as sampled (frames, where they sit in the source) with the span the processor gave it (frames x tokens).

`vlmtune inspect` prints these views; a training run writes the first few to ``label_samples.jsonl`` for
`vlmtune report`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path

from vlmtune.data.media import image_summary
from vlmtune.data.video import video_summary
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
    decoded (size, mean per channel 0-255, a thumbnail when `thumbnail` > 0), before the processor resizes them;
    its videos as sampled, and ``media``: each image and video as the processor expanded it, in order (``tokens``;
    a video's ``frames``: after ``train.overlong=fewer_frames``, the frames it kept)."""
    ids, labels = sample.tensors[sample.ids_key].tolist(), sample.tensors["labels"].tolist()
    runs = [[decode(toks), trained] for toks, trained in trained_runs(ids, labels)]
    videos = [video_summary(v, thumbnail) for v in media_of(conversation, "video")]
    return {"index": sample.index, "input_ids": ids, "labels": labels, "text": decode(ids), "runs": runs,
            "trained_spans": [text for text, trained in runs if trained],
            "images": [image_summary(im, thumbnail) for im in media_of(conversation, "image")],
            "videos": videos, "media": [dict(m) for m in sample.media], "shortened": sample.shortened}


def media_lines(view: dict) -> list[str]:
    """One line per video: its span as the model sees it (frames x tokens) and where its frames come from."""
    spans = iter(m for m in view.get("media", ()) if m["type"] == "video")
    lines = []
    for i, v in enumerate(view.get("videos", ())):
        span = next(spans, {})
        frames = span.get("frames", v["frames"])
        seconds = f"{v['seconds'][0]:g}-{v['seconds'][-1]:g} s" if v["seconds"] else "no frames"
        lines.append(f"video {i}: {frames} frames x {v['width']}x{v['height']} -> {span.get('tokens', '?')} tokens "
                     f"(sampled {v['frames']} of {v['source_frames']} source frames at {v['fps']:g} fps, {seconds})")
    return lines


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
    """The sample for a terminal: its videos' spans, then the text with the trained part in bold green."""
    head = "".join(f"\x1b[2m{line}\x1b[0m\n" for line in media_lines(view))
    return head + "".join(f"\x1b[1;32m{text}\x1b[0m" if trained else text for text, trained in view["runs"])


def _video_figure(i: int, video: dict, caption: str) -> str:
    frames = "".join(f'<img src="{src}" alt="video {i} frame {k}">'
                     for k, src in enumerate(video.get("thumbnails", ())) if src.startswith("data:image/png"))
    return f'<figure class="video">{frames}<figcaption>{html.escape(caption)}</figcaption></figure>'


def render_html(view: dict) -> str:
    """The sample as a page: trained text highlighted, the images as thumbnails with their size and means."""
    body = "".join(f'<mark title="trained">{html.escape(text)}</mark>' if trained else html.escape(text)
                   for text, trained in view["runs"])
    images = "".join(f'<figure><img src="{im["thumbnail"]}" alt="image {i}"><figcaption>{im["width"]} x '
                     f'{im["height"]}, mean RGB {", ".join(f"{m:.0f}" for m in im["mean"])}</figcaption></figure>'
                     for i, im in enumerate(view["images"]) if im.get("thumbnail", "").startswith("data:image/png"))
    videos = "".join(_video_figure(i, v, line)
                     for i, (v, line) in enumerate(zip(view.get("videos", ()), media_lines(view), strict=True)))
    return ("<!doctype html><meta charset='utf-8'><title>vlmtune inspect</title><style>body{font-family:monospace}"
            "#text{white-space:pre-wrap}mark{background:#b6f2b6}figure{display:inline-block;margin:4px}"
            "img{border:1px solid #999;max-width:256px}.video img{max-width:96px}</style>"
            f"<div id='images'>{images}</div><div id='videos'>{videos}</div>"
            "<p>Highlighted: trained tokens (labels != -100).</p>"
            f"<div id='text'>{body}</div>\n")
