"""The run report: one self-contained HTML file from a run folder (and PNG plots of its curves).

Usage::

    from vlmtune.report import build_report
    html_path = build_report("runs/demo")                        # runs/demo/report.html
    build_report("runs/demo", out="demo.html", png=True)         # + demo-loss.png, demo-lr.png, ... beside it
    screenshot("runs/demo", "docs/report.png")                   # a PNG of the whole page (headless Chromium)

What it reads (each file may be missing: the report says so): ``metrics.jsonl`` (step, validation and evaluation
lines), ``summary.json``, ``recipe.yaml``, ``label_samples.jsonl`` and ``eval/<name>/{metrics.json,
predictions.jsonl}``. The page needs no network: styles and the small chart script are inlined, the data is a JSON
block the script draws as SVG, and every text from the run folder is escaped (tables are built here with
``html.escape``; the script only ever sets ``textContent`` and attributes).
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError

MAX_POINTS = 5000  # per series in the page; longer runs are thinned evenly (first and last step kept)
MAX_PREDICTIONS = 500  # rows of the predictions table
IMAGE_URL = re.compile(r"data:image/(png|jpeg|webp|gif);base64,[A-Za-z0-9+/=\s]+")

# (chart id, title, y label, [(series label, record key)]); the x axis is the optimizer step.
STEP_CHARTS = [
    ("loss", "Loss", "loss", [("train", "loss"), ("validation", "val_loss")]),
    ("lr", "Learning rate", "lr", [("lr", "lr")]),
    ("grad_norm", "Gradient norm", "grad norm", [("grad norm", "grad_norm")]),
    ("tokens_per_s", "Throughput", "tokens / s", [("tokens/s", "tokens_per_s")]),
    ("padding_fraction", "Padding", "fraction of tokens", [("padding", "padding_fraction")]),
]


class ReportError(VlmtuneError, FileNotFoundError):
    """A folder that is not a run, or a report that is not there."""


@dataclass
class Chart:
    id: str
    title: str
    y_label: str
    series: list[dict[str, Any]]  # {"name", "points": [[step, value or None], ...], "thinned": bool}

    def finite_points(self, name: str) -> int:
        series = next(s for s in self.series if s["name"] == name)
        return sum(1 for _, y in series["points"] if y is not None)


@dataclass
class Run:
    """What a run folder holds, read leniently: problems become ``notes`` instead of exceptions."""

    path: Path
    steps: list[dict] = field(default_factory=list)
    validations: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    summary: dict | None = None
    recipe: str | None = None
    samples: list[dict] | None = None
    eval_name: str | None = None
    eval_metrics: dict | None = None
    eval_others: list[tuple[str, dict]] = field(default_factory=list)
    predictions: list[dict] | None = None
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ reading the run folder


def _read_jsonl(path: Path, run: Run) -> list[dict] | None:
    if not path.is_file():
        run.missing.append(str(path.relative_to(run.path)))
        return None
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        run.notes.append(f"{path.relative_to(run.path)}: {bad} line(s) are not JSON objects and were left out")
    return rows


def _read_json(path: Path, run: Run) -> dict | None:
    if not path.is_file():
        run.missing.append(str(path.relative_to(run.path)))
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        run.notes.append(f"{path.relative_to(run.path)} is not valid JSON ({e}); left out")
        return None
    return value if isinstance(value, dict) else None


def _eval_order(name: str) -> tuple[int, int]:
    """final last, then step-000100 by its step; other names first."""
    if name == "final":
        return (2, 0)
    match = re.fullmatch(r"step-(\d+)", name)
    return (1, int(match.group(1))) if match else (0, 0)


def read_run(run_dir: str | Path) -> Run:
    """Everything the report shows, from a run folder (``output_dir`` of a run).

    Usage: ``run = read_run("runs/demo"); run.steps[-1]["loss"], run.missing, run.notes``. Raises only when the
    folder does not exist or holds none of a run's files.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run folder {str(path)!r} does not exist (give a run's output_dir)")
    known = ("metrics.jsonl", "summary.json", "recipe.yaml", "label_samples.jsonl", "eval")
    if not any((path / name).exists() for name in known):
        raise ReportError(f"{str(path)!r} holds none of {', '.join(known)}: is it a vlmtune run's output_dir?")
    run = Run(path)
    for row in _read_jsonl(path / "metrics.jsonl", run) or []:
        if "eval" in row and isinstance(row["eval"], dict):
            run.evaluations.append(row)
        elif "val_loss" in row:
            run.validations.append(row)
        elif "step" in row:
            run.steps.append(row)
    run.summary = _read_json(path / "summary.json", run)
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        run.recipe = recipe.read_text(encoding="utf-8", errors="replace")
    else:
        run.missing.append("recipe.yaml")
    run.samples = _read_jsonl(path / "label_samples.jsonl", run)
    evals = sorted((p for p in (path / "eval").glob("*") if p.is_dir()), key=lambda p: _eval_order(p.name))
    if not evals:
        run.missing.append("eval/")
        return run
    for folder in evals:
        metrics = _read_json(folder / "metrics.json", run)
        if metrics is not None:
            run.eval_others.append((folder.name, metrics))
    latest = evals[-1]
    run.eval_name = latest.name
    run.eval_metrics = dict(run.eval_others).get(latest.name)
    run.predictions = _read_jsonl(latest / "predictions.jsonl", run)
    return run


# ------------------------------------------------------------------ curves


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _thin(points: list[list]) -> tuple[list[list], bool]:
    if len(points) <= MAX_POINTS:
        return points, False
    stride = (len(points) - 1) / (MAX_POINTS - 1)
    return [points[round(i * stride)] for i in range(MAX_POINTS)], True


def _series(name: str, rows: list[dict], key: str) -> dict | None:
    points = [[row["step"], _number(row.get(key))] for row in rows
              if key in row and _number(row.get("step")) is not None]
    if not any(y is not None for _, y in points):
        return None
    points, thinned = _thin(points)
    return {"name": name, "points": points, "thinned": thinned}


def curves(run: Run) -> list[Chart]:
    """The charts of a run: loss (train + validation), lr, grad norm, tokens/s, padding, one per eval metric.

    Usage: ``[c.id for c in curves(read_run("runs/demo"))]`` -> ``["loss", "lr", ...]``; a curve with no finite
    value is left out; a missing value (a skipped NaN step) is a ``None`` point, drawn as a gap.
    """
    charts = []
    for chart_id, title, y_label, keys in STEP_CHARTS:
        series = [_series(label, run.validations if key == "val_loss" else run.steps, key) for label, key in keys]
        series = [s for s in series if s is not None]
        if series:
            charts.append(Chart(chart_id, title, y_label, series))
    names = sorted({k for row in run.evaluations for k in row["eval"]})
    for i, name in enumerate(names):
        rows = [{"step": row.get("step"), name: row["eval"].get(name)} for row in run.evaluations]
        series = _series(name, rows, name)
        if series is not None:
            charts.append(Chart(f"eval-{i}", f"Evaluation: {name}", name, [series]))
    return charts


# ------------------------------------------------------------------ HTML


def _e(value: Any) -> str:
    return html.escape(value if isinstance(value, str) else json.dumps(value, default=str), quote=True)


def _value_cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return f"<pre>{_e(json.dumps(value, indent=2, default=str))}</pre>"
    if isinstance(value, float):
        return _e(f"{value:.6g}")
    return _e(value)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _missing(name: str, why: str) -> str:
    return f'<p class="missing">No <code>{_e(name)}</code> in this run folder: {_e(why)}</p>'


def _section_summary(run: Run) -> str:
    s = run.summary
    if s is None:
        return _missing("summary.json", "the run has not finished (it is written at the end, or on a stop by signal)")
    done = f"{s.get('steps', '?')}" + (f" of {s['total_steps']}" if "total_steps" in s else "")
    facts = [("steps", done), ("final loss", s.get("final_loss")), ("final validation loss", s.get("final_val_loss")),
             ("samples seen", s.get("samples_seen")), ("stopped by", s.get("stopped_by")),
             ("wall time (s)", s.get("wall_s")), ("model", s.get("final_model"))]
    cards = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_value_cell(v)}</div></div>'
                    for k, v in facts if v is not None)
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value_cell(v)}</td></tr>" for k, v in s.items()
                   if k not in ("skipped", "skip_examples"))
    return f'<div class="cards">{cards}</div><table class="kv">{rows}</table>'


def _section_curves(run: Run, charts: list[Chart]) -> str:
    if not charts:
        why = "no metrics.jsonl" if "metrics.jsonl" in run.missing else "metrics.jsonl has no step with numbers yet"
        return f'<p class="missing">No curves: {_e(why)}.</p>'
    out = []
    for c in charts:
        thinned = any(s["thinned"] for s in c.series)
        note = f'<p class="note">Every step is not drawn: at most {MAX_POINTS} points per curve.</p>' if thinned else ""
        out.append(f'<figure class="chart" id="chart-{_e(c.id)}" data-chart="{_e(c.id)}"><figcaption>{_e(c.title)}'
                   f"</figcaption>{note}</figure>")
    return '<div class="charts">' + "".join(out) + "</div>"


def _section_recipe(run: Run) -> str:
    if run.recipe is None:
        return _missing("recipe.yaml", "it is written when a run starts")
    return f'<pre class="recipe">{_e(run.recipe)}</pre>'


def _section_skipped(run: Run) -> str:
    s = run.summary
    if s is None:
        return _missing("summary.json", "the skipped samples are counted in it at the end of the run")
    skipped = _dict(s.get("skipped"))
    examples = _dict(s.get("skip_examples"))
    nonfinite = s.get("nonfinite_steps")
    extra = f"<p>Steps skipped for a non-finite loss: {_e(nonfinite)}.</p>" if nonfinite else ""
    if not skipped:
        return f"<p>No sample was skipped.</p>{extra}"
    total = sum(v for v in skipped.values() if isinstance(v, int))
    seen = s.get("samples_seen")
    of = f" of {_e(seen)} seen" if seen is not None else ""
    rows = "".join(f"<tr><td>{_e(reason)}</td><td class='num'>{_e(n)}</td><td>{_e(examples.get(reason, ''))}</td></tr>"
                   for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1] if isinstance(kv[1], int) else 0))
    return (f"<p>{total} sample(s) skipped{of}, by reason (one example each):</p><table class='grid'><thead><tr>"
            f"<th>reason</th><th>count</th><th>example</th></tr></thead><tbody>{rows}</tbody></table>{extra}")


def _thumbnail(image: dict) -> str:
    url = str(image.get("thumbnail", ""))
    w, h = image.get("width"), image.get("height")
    mean = image.get("mean")
    caption = f"{w}x{h}" + (f", mean RGB {', '.join(f'{m:.0f}' for m in mean)}"
                             if isinstance(mean, list) and all(_number(m) is not None for m in mean) else "")
    if not IMAGE_URL.fullmatch(url):  # only inline images: no network at view time, nothing to inject
        return (f'<figure class="thumb"><div class="noimg">no thumbnail</div><figcaption>{_e(caption)}</figcaption>'
                "</figure>")
    return (f'<figure class="thumb"><img src="{_e(url)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption>'
            "</figure>")


def _section_samples(run: Run) -> str:
    if run.samples is None:
        return _missing("label_samples.jsonl", "a few training samples are written there when a run starts")
    if not run.samples:
        return "<p>label_samples.jsonl is empty.</p>"
    out = ['<p class="note">Highlighted: the tokens the loss trains (labels &ne; -100); everything else is masked.'
           "</p>"]
    for sample in run.samples:
        runs = [(str(r[0]), bool(r[1])) for r in sample.get("runs") or [] if isinstance(r, list) and len(r) == 2]
        text = "".join(f'<mark class="trained">{_e(t)}</mark>' if trained else _e(t) for t, trained in runs)
        images = sample.get("images") if isinstance(sample.get("images"), list) else []
        images = "".join(_thumbnail(i) for i in images if isinstance(i, dict))
        n_trained = sum(len(t) for t, trained in runs if trained)
        n_all = sum(len(t) for t, _ in runs)
        out.append(f'<article class="sample"><h3>sample {_e(sample.get("index", "?"))} '
                   f'<span class="muted">({_e(sample.get("split", "train"))}; {n_trained} of {n_all} characters '
                   f'trained)</span></h3><div class="thumbs">{images}</div><div class="tokens">{text}</div></article>')
    return "".join(out)


def _section_predictions(run: Run) -> str:
    if run.eval_name is None:
        return '<p class="missing">No evaluation ran (no <code>eval/</code> folder in this run folder).</p>'
    out = []
    if run.eval_others:
        names = sorted({k for _, m in run.eval_others for k in _dict(m.get("metrics"))})
        head = "".join(f"<th>{_e(n)}</th>" for n in names)
        rows = "".join(f"<tr><td>{_e(folder)}</td><td class='num'>{_e(m.get('step', ''))}</td><td class='num'>"
                       f"{_e(m.get('samples', ''))}</td>"
                       + "".join(f"<td class='num'>{_value_cell(_dict(m.get('metrics')).get(n, ''))}</td>"
                                 for n in names) + "</tr>"
                       for folder, m in run.eval_others)
        out.append(f"<table class='grid'><thead><tr><th>evaluation</th><th>step</th><th>samples</th>{head}</tr>"
                   f"</thead><tbody>{rows}</tbody></table>")
    if run.predictions is None:
        out.append(_missing(f"eval/{run.eval_name}/predictions.jsonl", "this evaluation wrote no predictions"))
        return "".join(out)
    rows = run.predictions[:MAX_PREDICTIONS]
    score_names = sorted({k for r in rows for k in _dict(r.get("scores"))})
    head = "".join(f"<th>{_e(n)}</th>" for n in score_names)
    body = "".join(
        f"<tr><td class='num'>{_e(r.get('index', ''))}</td><td><details><summary>prompt</summary><pre>"
        f"{_e(str(r.get('prompt', '')))}</pre></details></td><td><pre>{_e(str(r.get('reference', '')))}</pre></td>"
        f"<td><pre>{_e(str(r.get('prediction', '')))}</pre></td>"
        + "".join(f"<td class='num'>{_value_cell(_dict(r.get('scores')).get(n, ''))}</td>" for n in score_names)
        + "</tr>" for r in rows)
    more = (f"<p class='note'>The first {MAX_PREDICTIONS} of {len(run.predictions)} predictions.</p>"
            if len(run.predictions) > MAX_PREDICTIONS else "")
    out.append(f"<h3>Predictions of <code>eval/{_e(run.eval_name)}</code></h3>{more}<table class='grid preds' "
               f"id='prediction-rows'><thead><tr><th>#</th><th>prompt</th><th>reference</th><th>prediction</th>{head}"
               f"</tr></thead><tbody>{body}</tbody></table>")
    return "".join(out)


def _json_for_script(value: Any) -> str:
    # Inside <script>, "</" would end the element: every <, > and & goes in as a JSON \u escape.
    text = json.dumps(value, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


STYLE = """
:root{--fg:#1d2430;--muted:#667085;--line:#d0d5dd;--bg:#fff;--soft:#f6f7f9;--accent:#2563eb}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}header{padding:18px 28px;border-bottom:1px solid var(--line);
background:var(--soft)}
header h1{margin:0;font-size:20px}header .muted{margin-top:2px}nav{margin-top:8px}nav a{margin-right:14px;
color:var(--accent);text-decoration:none}main{padding:4px 28px 40px;max-width:1400px}section{margin-top:26px}
h2{font-size:17px;border-bottom:1px solid var(--line);padding-bottom:4px}h3{font-size:14px;margin:14px 0 6px}
.muted,.note{color:var(--muted)}.missing{color:#9a3412;background:#fff7ed;padding:8px 10px;border-radius:6px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:12px}.card{border:1px solid var(--line);border-radius:8px;
padding:8px 12px;min-width:130px}.card .k{color:var(--muted);font-size:12px}.card .v{font-size:16px;font-weight:600}
.card pre{font-size:12px;font-weight:400}table{border-collapse:collapse}th,td{border:1px solid var(--line);
padding:4px 8px;text-align:left;vertical-align:top}table.kv th{background:var(--soft);font-weight:600}
.grid thead th{background:var(--soft)}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
pre.recipe{background:var(--soft);padding:10px;border-radius:6px}.charts{display:grid;
grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}figure.chart{margin:0;border:1px solid var(--line);
border-radius:8px;padding:8px}figure.chart figcaption{font-weight:600}figure.chart svg{width:100%;height:auto;
display:block}svg text{font:11px system-ui,sans-serif;fill:var(--muted)}svg .grid line{stroke:#eef0f3}
svg .axis line,svg .axis path{stroke:#98a2b3;fill:none}svg polyline{fill:none;stroke-width:1.6}
.legend span{display:inline-block;margin-right:12px;font-size:12px}.legend i{display:inline-block;width:14px;
height:3px;margin:0 4px 3px 0;vertical-align:middle}.sample{border:1px solid var(--line);border-radius:8px;
padding:8px 12px;margin:10px 0}.tokens{white-space:pre-wrap;font:12px/1.5 ui-monospace,Menlo,Consolas,monospace;
background:var(--soft);padding:8px;border-radius:6px}mark.trained{background:#b6f2b6;color:inherit}
.thumbs{display:flex;gap:10px;flex-wrap:wrap;margin-bottom:6px}figure.thumb{margin:0}
figure.thumb img{height:96px;width:auto;max-width:240px;object-fit:contain;border:1px solid var(--line)}
figure.thumb figcaption{font-size:11px;color:var(--muted)}
.noimg{width:90px;height:60px;border:1px dashed var(--line);font-size:11px;color:var(--muted);display:flex;
align-items:center;justify-content:center}table.preds td{max-width:420px}details summary{cursor:pointer;
color:var(--accent)}
"""

# Draws every <figure data-chart> from the JSON block: SVG polylines (a gap where a value is missing), axes with
# round ticks, a legend, a title per point. DOM nodes and textContent only, never innerHTML.
SCRIPT = r"""
(function(){
"use strict";
var NS="http://www.w3.org/2000/svg",COLORS=["#2563eb","#dc2626","#16a34a","#9333ea","#ea580c","#0891b2"];
var data=JSON.parse(document.getElementById("vlmtune-data").textContent);
function el(name,attrs,parent){var n=document.createElementNS(NS,name);for(var k in attrs){n.setAttribute(k,attrs[k]);}
  if(parent){parent.appendChild(n);}return n;}
function ticks(lo,hi,n){if(!(hi>lo)){var d=Math.abs(lo)||1;lo-=d/2;hi+=d/2;}var raw=(hi-lo)/n,
  p=Math.pow(10,Math.floor(Math.log10(raw))),m=raw/p,step=(m<1.5?1:m<3?2:m<7?5:10)*p,out=[];
  var first=Math.floor(lo/step+1e-9),last=Math.ceil(hi/step-1e-9);
  for(var i=first;i<=last;i++){out.push(Math.abs(i)<1e-9?0:i*step);}
  return {lo:out[0],hi:out[out.length-1],values:out};}
function fmt(v){var a=Math.abs(v);if(a===0){return "0";}if(a>=1e4||a<1e-3){return v.toExponential(1);}
  return String(Number(v.toPrecision(4)));}
function draw(fig,chart){
  var W=520,H=250,L=62,R=12,T=10,B=34,xs=[],ys=[];
  chart.series.forEach(function(s){s.points.forEach(function(p){if(p[1]!==null){xs.push(p[0]);ys.push(p[1]);}});});
  if(!xs.length){return;}
  var xt=ticks(Math.min.apply(null,xs),Math.max.apply(null,xs),6),
    yt=ticks(Math.min.apply(null,ys),Math.max.apply(null,ys),5);
  function X(v){return L+(v-xt.lo)/(xt.hi-xt.lo)*(W-L-R);}function Y(v){return T+(yt.hi-v)/(yt.hi-yt.lo)*(H-T-B);}
  var svg=el("svg",{viewBox:"0 0 "+W+" "+H,role:"img","aria-label":chart.title});
  var grid=el("g",{"class":"grid"},svg),axis=el("g",{"class":"axis"},svg);
  yt.values.forEach(function(v){el("line",{x1:L,x2:W-R,y1:Y(v),y2:Y(v)},grid);
    el("text",{x:L-6,y:Y(v)+4,"text-anchor":"end"},axis).textContent=fmt(v);});
  xt.values.forEach(function(v){if(v!==Math.round(v)){return;}el("line",{x1:X(v),x2:X(v),y1:H-B,y2:H-B+4},axis);
    el("text",{x:X(v),y:H-B+16,"text-anchor":"middle"},axis).textContent=fmt(v);});
  el("path",{d:"M"+L+","+T+"V"+(H-B)+"H"+(W-R)},axis);
  el("text",{x:(L+W-R)/2,y:H-4,"text-anchor":"middle"},axis).textContent="step";
  el("text",{x:12,y:(T+H-B)/2,"text-anchor":"middle",transform:"rotate(-90 12 "+(T+H-B)/2+")"},axis)
    .textContent=chart.y_label;
  var legend=document.createElement("div");legend.className="legend";
  chart.series.forEach(function(s,i){
    var color=COLORS[i%COLORS.length],g=el("g",{"class":"series","data-series":s.name},svg),run=[];
    function flush(){if(run.length){el("polyline",{points:run.join(" "),stroke:color,"data-series":s.name},g);}run=[];}
    s.points.forEach(function(p){if(p[1]===null){flush();return;}run.push(X(p[0]).toFixed(2)+","+Y(p[1]).toFixed(2));
      if(s.points.length<=300){var c=el("circle",{cx:X(p[0]).toFixed(2),cy:Y(p[1]).toFixed(2),
        r:s.points.length<=40?2.5:1.2,fill:color},g);
        el("title",{},c).textContent=s.name+" @ step "+p[0]+": "+fmt(p[1]);}});
    flush();
    var item=document.createElement("span"),swatch=document.createElement("i");swatch.style.background=color;
    item.appendChild(swatch);item.appendChild(document.createTextNode(s.name));legend.appendChild(item);});
  fig.appendChild(svg);fig.appendChild(legend);}
data.charts.forEach(function(chart){var fig=document.querySelector('figure[data-chart="'+chart.id+'"]');
  if(fig){draw(fig,chart);}});
document.documentElement.setAttribute("data-charts-drawn",String(data.charts.length));
})();
"""


def render_html(run: Run, charts: list[Chart]) -> str:
    """The report page of ``run`` as one HTML string: ``render_html(run, curves(run))`` (what build_report writes)."""
    sections = [("summary", "Run summary", _section_summary(run)), ("curves", "Curves", _section_curves(run, charts)),
                ("skipped", "Skipped samples", _section_skipped(run)),
                ("samples", "Training samples as the model sees them", _section_samples(run)),
                ("predictions", "Evaluation", _section_predictions(run)), ("recipe", "Recipe", _section_recipe(run))]
    notes = "".join(f'<p class="missing">{_e(n)}</p>' for n in run.notes)
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
    data = {"charts": [{"id": c.id, "title": c.title, "y_label": c.y_label, "series": c.series} for c in charts]}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>vlmtune report: {_e(run.path.resolve().name)}'
            f"</title><style>{STYLE}</style></head><body><header><h1>vlmtune run report: {_e(run.path.resolve().name)}"
            f'</h1><div class="muted">{_e(str(run.path.resolve()))} &middot; built {when}</div><nav>{nav}</nav>'
            f'</header><main>{notes}{body}</main><script type="application/json" id="vlmtune-data">'
            f"{_json_for_script(data)}</script><script>{SCRIPT}</script></body></html>\n")


# ------------------------------------------------------------------ PNG plots


def write_pngs(charts: list[Chart], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per chart (``<stem>-<chart id>.png``), drawn by matplotlib's Agg canvas (no pyplot state).

    Usage: ``write_pngs(curves(read_run("runs/demo")), Path("docs"), "demo")`` -> ``[docs/demo-loss.png, ...]``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for chart in charts:
        fig = Figure(figsize=(6.4, 3.6), dpi=150, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for series in chart.series:
            xs = [x for x, _ in series["points"]]
            ys = [math.nan if y is None else y for _, y in series["points"]]  # NaN: a gap in the line
            ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, linewidth=1.4, label=series["name"])
        ax.set_title(chart.title)
        ax.set_xlabel("step")
        ax.set_ylabel(chart.y_label)
        ax.grid(True, alpha=0.3)
        if len(chart.series) > 1:
            ax.legend()
        path = out_dir / f"{stem}-{chart.id}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def build_report(run_dir: str | Path, out: str | Path | None = None, png: bool = False) -> Path:
    """Write the run report of ``run_dir`` (default ``<run_dir>/report.html``) and return its path.

    ``png=True`` also writes one PNG per curve beside it (``<name>-loss.png``, ``<name>-lr.png``, ...). A missing
    file of the run folder becomes a line in the report; a folder that is not a run at all is an error.
    """
    run = read_run(run_dir)
    charts = curves(run)
    out_path = Path(out) if out is not None else run.path / "report.html"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_html(run, charts), encoding="utf-8")
    if png:
        write_pngs(charts, out_path.parent, out_path.stem)
    return out_path


def screenshot(report: str | Path, out_png: str | Path, width: int = 1280) -> Path:
    """A PNG of a whole report page, as headless Chromium renders it (vlmtune/browser.py).

    ``report`` is a report's HTML file, or a run folder: its report is (re)built first (``<run>/report.html``).
    Raises if the page logs a script error, so a screenshot never shows a half-drawn page.
    """
    from vlmtune.browser import BrowserError, Chromium

    path = Path(report)
    html_path = build_report(path) if path.is_dir() else path
    if not html_path.is_file():
        raise ReportError(f"no report at {str(html_path)!r}")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Chromium() as browser:
        page = browser.open(html_path.resolve().as_uri(), width=width)
        if page.errors:
            raise BrowserError(f"{html_path} logged errors in Chromium: {page.errors}")
        return page.screenshot(out, width=width)
