"""The run report, checked as a person sees it: rendered by headless Chromium (vlmtune/browser.py), read back from
the page's DOM after its script ran, with the console watched for errors; plus the PNG plots and the screenshot.

Chromium is required (CI installs Debian's `chromium`): without it these tests fail and say how to install it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.browser import BrowserError, Chromium, find_chromium
from vlmtune.report import MAX_POINTS, build_report, read_run

ROOT = Path(__file__).resolve().parents[1]
PWN = "window.__pwned=1"
EVIL = f'<img src=x onerror="{PWN}"></td></pre><script>{PWN}</script>'  # must show as text, never run
N_STEPS, NAN_STEP = 12, 7
VAL_STEPS, EVAL_STEPS = (4, 8, 12), (6, 12)


def _png_data_url(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_run(root: Path) -> Path:
    """A run folder of the documented layout: 12 steps (step 7 a skipped NaN step), validation at 4/8/12,
    evaluation at 6 and 12, skipped samples, label samples with thumbnails, predictions full of HTML."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, N_STEPS + 1):
        nan = step == NAN_STEP
        lines.append({"step": step, "loss": None if nan else 12.0 - 0.4 * step, "lr": 1e-4 * min(1, step / 3),
                      "grad_norm": None if nan else 3.0 / step, "tokens": 4000 + step, "supervised_tokens": 900,
                      "tokens_per_s": 1500.0 + 10 * step, "padding_fraction": 0.3 - 0.01 * step, "micro_batches": 2,
                      "epoch": step / N_STEPS, **({"skipped_nonfinite": True} if nan else {})})
        if step in VAL_STEPS:
            lines.append({"step": step, "val_loss": 11.0 - 0.3 * step, "val_tokens": 800})
        if step in EVAL_STEPS:
            lines.append({"step": step, "eval_samples": 3, "eval": {"cer": 1.0 - step / 20, "exact_match": step / 24}})
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "summary.json").write_text(json.dumps({
        "steps": N_STEPS, "total_steps": N_STEPS, "final_loss": 7.2, "final_val_loss": 7.4, "samples_seen": 96,
        "skipped": {"too_long": 3, "unreadable_image": 1},
        "skip_examples": {"too_long": "sample 17: 4100 tokens > max_length 2048 <b>",
                          "unreadable_image": f"sample 5: cannot identify image file {EVIL}"},
        "nonfinite_steps": 1, "final_model": "runs/x/final", "wall_s": 93.5, "custom_note": EVIL}))
    (root / "recipe.yaml").write_text(f"output_dir: runs/x\nmodel:\n  name_or_path: tiny\ndata:\n  train:\n"
                                      f"    prompt: '{EVIL}'\ntrain:\n  max_steps: {N_STEPS}\n")
    prompt = "<|im_start|>user\n<|image_pad|>What is total?<|im_end|>\n"
    image = {"width": 640, "height": 480, "mean": [200.0, 190.5, 180.0], "thumbnail": _png_data_url((250, 0, 0))}
    samples = [
        {"index": 0, "split": "train", "images": [image],
         "runs": [[prompt, False], ["<s_total>12.00</s_total>", True], ["<|im_end|>", True], ["\n", False]]},
        {"index": 3, "split": "train", "runs": [[f"user: {EVIL}\n", False], [f"answer {EVIL}", True]],
         "images": [{"width": 10, "height": 10, "mean": [1, 2, 3], "thumbnail": f'x" onerror="{PWN}'}]},
    ]
    (root / "label_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    for name, step in (("step-000006", 6), ("final", 12)):
        folder = root / "eval" / name
        folder.mkdir(parents=True)
        preds = [{"index": i, "prompt": f"Read the receipt {i} <image>", "reference": f"<s_total>{i}.00</s_total>",
                  "prediction": EVIL if i == 1 else f"<s_total>{i}.50</s_total> & more",
                  "scores": {"cer": 0.1 * i, "exact_match": float(i == 0)}} for i in range(3)]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        (folder / "metrics.json").write_text(json.dumps({"step": step, "samples": 3,
                                                         "metrics": {"cer": 0.1, "exact_match": 1 / 3}}))
    return root


def expected_points(root: Path) -> dict[tuple[str, str], int]:
    """(chart, series) -> finite points, counted from the files the test wrote (not through vlmtune.report)."""
    rows = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]

    def finite(rs, key):
        return sum(1 for r in rs if isinstance(r.get(key), float) and math.isfinite(r[key]))

    out = {("loss", "train"): finite(steps, "loss"), ("loss", "validation"): finite(rows, "val_loss"),
           ("lr", "lr"): finite(steps, "lr"), ("grad_norm", "grad norm"): finite(steps, "grad_norm"),
           ("tokens_per_s", "tokens/s"): finite(steps, "tokens_per_s"),
           ("padding_fraction", "padding"): finite(steps, "padding_fraction")}
    for name in ("cer", "exact_match"):
        out[(f"Evaluation: {name}", name)] = sum(1 for r in rows if name in r.get("eval", {}))
    return out


@pytest.fixture(scope="module")
def browser():
    try:
        find_chromium()
    except BrowserError as e:
        pytest.fail(f"the report tests need headless Chromium: {e}")
    with Chromium() as b:
        yield b


# Everything a person would read off the page, collected in the browser after the page's own script ran.
READ_PAGE = r"""(() => {
  const text = (el) => el ? el.innerText : null;
  const charts = [...document.querySelectorAll('figure[data-chart]')].map(fig => {
    const svg = fig.querySelector('svg');
    const box = svg ? svg.viewBox.baseVal : null;
    const series = [...fig.querySelectorAll('g.series')].map(g => {
      const pts = [...g.querySelectorAll('polyline')].flatMap(pl => [...Array(pl.points.numberOfItems).keys()]
        .map(i => pl.points.getItem(i)));
      return {name: g.getAttribute('data-series'), points: pts.length,
              segments: g.querySelectorAll('polyline').length,
              inside: pts.every(p => isFinite(p.x) && isFinite(p.y) && p.x >= 0 && p.x <= box.width && p.y >= 0
                                      && p.y <= box.height)};
    });
    return {id: fig.dataset.chart, title: fig.querySelector('figcaption').innerText, series,
            width: svg ? svg.getBoundingClientRect().width : 0,
            legend: [...fig.querySelectorAll('.legend span')].map(s => s.innerText)};
  });
  const sections = Object.fromEntries([...document.querySelectorAll('section')].map(s =>
    [s.id, {title: text(s.querySelector('h2')), visible: s.getBoundingClientRect().height > 0}]));
  const table = (sel) => [...document.querySelectorAll(sel + ' tbody tr')].map(tr =>
    [...tr.children].map(td => td.innerText));
  return {charts, sections, skipped: table('#skipped table'), predictions: table('#prediction-rows'),
          recipe: text(document.querySelector('#recipe pre')),
          trained: [...document.querySelectorAll('#samples mark.trained')].map(m => m.innerText),
          images: [...document.querySelectorAll('#samples img')].map(i => [i.naturalWidth, i.complete]),
          noThumbnail: document.querySelectorAll('#samples .noimg').length,
          summary: text(document.querySelector('#summary')),
          missing: [...document.querySelectorAll('.missing')].map(m => m.innerText),
          injected: document.querySelectorAll('main script, main img[src="x"]').length,
          pwned: window.__pwned === 1};
})()"""


def render(browser: Chromium, html_path: Path) -> tuple[dict, list[str], list[str]]:
    page = browser.open(html_path.resolve().as_uri())
    return page.evaluate(READ_PAGE), page.errors, page.requests


def test_report_renders_what_a_person_should_see(tmp_path, browser):
    run = make_run(tmp_path / "run")
    seen, errors, requests = render(browser, build_report(run))

    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests  # nothing from the network
    assert set(seen["sections"]) == {"summary", "curves", "skipped", "samples", "predictions", "recipe"}
    assert all(s["visible"] for s in seen["sections"].values())

    drawn = {(c["title"] if c["id"].startswith("eval") else c["id"], s["name"]): s for c in seen["charts"]
             for s in c["series"]}
    expected = expected_points(run)
    assert {k: v["points"] for k, v in drawn.items()} == expected
    assert drawn[("loss", "train")]["segments"] == 2  # the NaN step is a gap, not a point and not a zero
    assert drawn[("grad_norm", "grad norm")]["segments"] == 2
    assert all(s["inside"] for s in drawn.values())
    assert all(c["width"] > 200 for c in seen["charts"])
    assert next(c for c in seen["charts"] if c["id"] == "loss")["legend"] == ["train", "validation"]

    # skipped samples by reason, with the example shown as text
    assert sorted(r[:2] for r in seen["skipped"]) == [["too_long", "3"], ["unreadable_image", "1"]]
    assert any(EVIL in r[2] for r in seen["skipped"])
    # label-mask view: the trained runs highlighted, the valid thumbnail decoded, the bad one refused
    assert seen["trained"] == ["<s_total>12.00</s_total>", "<|im_end|>", f"answer {EVIL}"]
    assert seen["images"] == [[8, True]]
    assert seen["noThumbnail"] == 1
    # predictions of the latest evaluation (final) beside their references, scores per sample
    preds = [json.loads(x) for x in (run / "eval/final/predictions.jsonl").read_text().splitlines()]
    assert [r[0] for r in seen["predictions"]] == [str(p["index"]) for p in preds]
    assert [r[2] for r in seen["predictions"]] == [p["reference"] for p in preds]
    assert [r[3] for r in seen["predictions"]] == [p["prediction"] for p in preds]
    assert [float(r[4]) for r in seen["predictions"]] == pytest.approx([p["scores"]["cer"] for p in preds])
    # recipe and summary as text; nothing from the run folder ran or became an element
    assert seen["recipe"].rstrip("\n") == (run / "recipe.yaml").read_text().rstrip("\n")
    assert EVIL in seen["summary"] and "93.5" in seen["summary"]
    assert seen["injected"] == 0 and seen["pwned"] is False
    assert seen["missing"] == []


def test_report_of_a_run_that_stopped_early(tmp_path, browser):
    """Only metrics.jsonl (two steps, one unreadable line): the report says what is missing and still draws."""
    run = tmp_path / "early"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 0.1}) + "\n{not json\n"
                                       + json.dumps({"step": 2, "loss": 2.5, "lr": 0.1}) + "\n")
    seen, errors, _ = render(browser, build_report(run, out=tmp_path / "out" / "r.html"))
    assert errors == []
    assert {c["id"]: [s["points"] for s in c["series"]] for c in seen["charts"]} == {"loss": [2], "lr": [2]}
    missing = "\n".join(seen["missing"])
    for name in ("summary.json", "recipe.yaml", "label_samples.jsonl", "eval/", "1 line(s) are not JSON"):
        assert name in missing
    assert seen["predictions"] == [] and seen["skipped"] == []


def test_malformed_files_do_not_stop_the_report(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "summary.json").write_text(json.dumps({"steps": 2, "skipped": ["too_long"], "skip_examples": "x"}))
    (run / "label_samples.jsonl").write_text(json.dumps({"index": 0, "runs": "text", "images": "none"}) + "\n[1, 2]\n")
    (run / "eval/final/predictions.jsonl").write_text(json.dumps({"index": 0, "scores": [1], "prediction": 3}) + "\n")
    (run / "eval/final/metrics.json").write_text("{broken")
    text = build_report(run).read_text()
    assert "No sample was skipped" in text and "label_samples.jsonl: 1 line(s) are not JSON objects" in text
    assert "eval/final/metrics.json is not valid JSON" in text


def test_png_plots(tmp_path):
    run = make_run(tmp_path / "run")
    html_path = build_report(run, out=tmp_path / "site" / "demo.html", png=True)
    pngs = sorted(p.name for p in html_path.parent.glob("*.png"))
    assert pngs == sorted(f"demo-{c}.png" for c in ("loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction",
                                                     "eval-0", "eval-1"))
    with Image.open(html_path.parent / "demo-loss.png") as im:
        assert im.format == "PNG" and im.width >= 640
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 20  # lines, text and axes drawn, not a blank canvas


def test_screenshot_script(tmp_path, browser):
    run = make_run(tmp_path / "run")
    out = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/screenshot_report.py"), str(run), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.width == 1280 and im.height > 1500  # the whole page, not one window
        colors = im.convert("RGB").getcolors(maxcolors=1 << 22)
        # the loss chart's blue (#2563eb) is in the picture: the charts were drawn before the shot
        assert any(abs(r - 0x25) < 12 and abs(g - 0x63) < 12 and abs(b - 0xEB) < 12 for _, (r, g, b) in colors)
        # and nothing is a black blot (an SVG path left with its default fill): dark pixels are text and lines
        dark = sum(n for n, (r, g, b) in colors if max(r, g, b) < 60)
        assert dark < 0.02 * im.width * im.height
    assert (run / "report.html").is_file()


def test_missing_chromium_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on it
    monkeypatch.delenv("VLMTUNE_CHROMIUM", raising=False)
    with pytest.raises(BrowserError, match=r"apt-get install -y chromium"):
        find_chromium()
    monkeypatch.setenv("VLMTUNE_CHROMIUM", str(tmp_path / "chrome"))
    with pytest.raises(BrowserError, match=r"VLMTUNE_CHROMIUM.*not an executable"):
        find_chromium()


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="output_dir"):
        build_report(tmp_path)


def test_long_runs_are_thinned(tmp_path):
    run = tmp_path / "long"
    run.mkdir()
    n = MAX_POINTS * 2 + 7
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, n + 1)))
    from vlmtune.report import curves

    (loss,) = curves(read_run(run))
    points = loss.series[0]["points"]
    assert len(points) == MAX_POINTS and points[0][0] == 1 and points[-1][0] == n and loss.series[0]["thinned"]
    assert "at most" in build_report(run).read_text()
