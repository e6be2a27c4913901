"""Task metrics: score (reference, prediction) pairs and aggregate them exactly across ranks.

Each metric is one row of :data:`METRICS`: how to score one pair (a :class:`Piece`: the per-sample value and,
where the run's number is not a mean of those values, the additive statistics it is computed from) and how to
aggregate all pieces of a run. Every aggregate is a function of the multiset of pieces alone: integer statistics
are summed exactly and float values with :func:`math.fsum` (exactly rounded, so independent of order). A 2-rank
run that gathers every rank's pieces and calls :func:`aggregate` therefore gets bit-for-bit the 1-rank number.

A reference is a string or a non-empty list of strings (several accepted answers); per sample, the best
reference counts. Values are on a 0..1 scale (BLEU too: sacrebleu's score / 100), except that the error rates
``cer`` / ``wer`` exceed 1 when there are more edits than reference characters or words.

Where the numbers come from (library where one does the job, hand-written where none does):

- ``cord_ted`` / ``cord_f1``: Donut's ``JSONParseEvaluator`` semantics (clovaai/donut ``donut/util.py``,
  commit 4cfcf97): the same ``normalize_dict`` normalisation, tree and costs; the tree edit distance is
  ``zss`` (Zhang-Shasha, the library Donut uses), leaf costs are Levenshtein distances from ``rapidfuzz``
  (Donut uses ``nltk.edit_distance``: the same unit-cost distance). Hand-written around them: parsing,
  normalisation and the field matching (no library implements Donut's semantics; ``donut-python`` pulls timm
  and a whole model stack). Token targets are parsed with vlmtune's ``tokens_to_json``, JSON targets with
  ``json.loads``; a prediction that does not parse is an empty tree. Deviations from Donut, all at
  degenerate inputs: an empty ground truth scores 1.0 against an empty prediction and 0.0 otherwise (Donut
  divides 0 by 0 and returns 0); an untagged prediction is an empty tree (Donut scores its
  ``{"text_sequence": ...}`` fallback as a tree, which can earn partial credit); node kinds are explicit
  rather than a ``<leaf>`` text prefix.
- ``anls``: DocVQA's ANLS with threshold 0.5, hand-written (a few lines) on ``rapidfuzz``'s Levenshtein (the
  ``anls`` package, last released in 2022, is a pure-Python Levenshtein plus the same few lines). Follows the
  official RRC evaluation script (lower-cased, whitespace collapsed, similarity kept when >= 0.5) except that
  the length is that of the compared (normalised) strings, as in the ANLS paper.
- ``exact_match``: hand-written; equal after lower-casing and collapsing whitespace.
- ``relaxed_accuracy``: ChartQA's relaxed correctness, hand-written after pix2struct ``metrics.py`` (5 %
  relative tolerance for numbers, ``%`` read as /100, case-insensitive string equality otherwise, including
  its quirk that a zero target falls back to string equality); both strings are stripped first.
- ``cer`` / ``wer``: ``jiwer`` (its default transforms; its corpus rate = total edits / total reference
  length, and its convention for an empty reference: the number of insertions).
- ``rouge_l``: ``rouge-score`` (Google's re-implementation of ROUGE-1.5.5) ROUGE-L F-measure, no stemming,
  with a Unicode tokenizer: the default one keeps only ``[a-z0-9]`` and so scores any non-ASCII word as
  absent; on ASCII text both give the same tokens. Han and kana characters are one token each. Mean of the
  per-sample F-measures.
- ``bleu``: ``sacrebleu`` BLEU with its defaults (13a tokenizer, exp smoothing, case-sensitive). The run's
  number is corpus BLEU from the summed n-gram statistics (exactly ``corpus_score`` on all rows); the
  per-sample value is sacrebleu's sentence BLEU (effective order), which does not average to it.

The heavy libraries are imported inside the functions that use them, so ``import vlmtune.scores`` stays cheap
for the CLI (nltk, pulled in by rouge-score, alone takes 0.3 s).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import regex
from rapidfuzz.distance import Levenshtein

from vlmtune.data.formats import tokens_to_json
from vlmtune.errors import VlmtuneError

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05

# Think-block markers of the Thinking templates: Qwen3 / Qwen3.5 / GLM write <think>, Kimi-VL ◁think▷.
THINK_TAGS: dict[str, tuple[str, str]] = {"think": ("<think>", "</think>"), "kimi": ("◁think▷", "◁/think▷")}


class ScoreError(VlmtuneError, ValueError):
    """Bad scoring input: an unknown metric, a row without reference or prediction, an unreadable file."""


class Piece(NamedTuple):
    """One sample's contribution to a metric."""

    value: float  # the per-sample score (written to predictions.jsonl)
    stats: tuple[int, ...] = ()  # additive counts for metrics whose aggregate is not the mean of values


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool  # for checkpoint selection: cer / wer are error rates
    score: Callable[[list[str], str], Piece]  # (references, prediction) -> Piece
    aggregate: Callable[[list[Piece]], float]  # all pieces of a run -> the run's value
    summary: str


# ---------------------------------------------------------------------------------------------------------
# Think blocks


def strip_thinking(text: str, open: str = "<think>", close: str = "</think>") -> str:
    """The answer part of a Thinking model's output: think blocks removed, then stripped.

    A template that opens the block in the generation prompt (Qwen3 Thinking ends it with ``<think>\\n``)
    leaves only the closing tag in the output: everything up to it is thinking. A block still open at the end
    (generation stopped while thinking) leaves no answer. Text without either tag is returned unchanged.
    """
    if open not in text and close not in text:
        return text
    text = re.sub(re.escape(open) + ".*?" + re.escape(close), "", text, flags=re.DOTALL)
    if close in text:
        text = text[text.rfind(close) + len(close):]
    if open in text:
        text = text[: text.find(open)]
    return text.strip()


# ---------------------------------------------------------------------------------------------------------
# Short-answer metrics


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def _exact_match(refs: list[str], pred: str) -> Piece:
    p = _squash(pred)
    return Piece(float(any(_squash(r) == p for r in refs)))


def _anls(refs: list[str], pred: str) -> Piece:
    p = _squash(pred)
    best = 0.0
    for ref in refs:
        r = _squash(ref)
        length = max(len(r), len(p))
        similarity = 1.0 - (Levenshtein.distance(r, p) / length if length else 0.0)
        best = max(best, similarity if similarity >= ANLS_THRESHOLD else 0.0)
    return Piece(best)


def _to_float(text: str) -> float | None:
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def _relaxed_correct(ref: str, pred: str) -> bool:
    ref, pred = ref.strip(), pred.strip()
    r, p = _to_float(ref), _to_float(pred)
    if p is not None and r:  # a zero target falls through to string equality, as in pix2struct
        return abs(p - r) / abs(r) <= RELAXED_TOLERANCE
    return pred.lower() == ref.lower()


def _relaxed_accuracy(refs: list[str], pred: str) -> Piece:
    return Piece(float(any(_relaxed_correct(r, pred) for r in refs)))


def _mean(pieces: list[Piece]) -> float:
    return math.fsum(p.value for p in pieces) / len(pieces)


# ---------------------------------------------------------------------------------------------------------
# Error rates (jiwer)


def _error_rate(words: bool) -> Callable[[list[str], str], Piece]:
    def one(ref: str, pred: str) -> Piece:
        import jiwer

        out = (jiwer.process_words if words else jiwer.process_characters)(ref, pred)
        edits = out.substitutions + out.deletions + out.insertions
        ref_len = out.hits + out.substitutions + out.deletions
        return Piece(float(out.wer if words else out.cer), (edits, ref_len))

    def score(refs: list[str], pred: str) -> Piece:
        return min((one(r, pred) for r in refs), key=lambda p: p.value)  # the closest reference; first on ties

    return score


def _corpus_error_rate(pieces: list[Piece]) -> float:
    edits = sum(p.stats[0] for p in pieces)
    ref_len = sum(p.stats[1] for p in pieces)
    # jiwer's corpus rate; with no reference tokens at all it reports the insertion count
    return edits / ref_len if ref_len else float(edits)


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L (rouge-score) and BLEU (sacrebleu)


class UnicodeTokenizer:
    """rouge-score tokenizer: lower-cased runs of letters and digits; each Han or kana character is a token.

    On ASCII text it gives exactly rouge-score's default tokens (``[a-z0-9]+`` runs, stemming off).
    """

    _TOKEN = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]|[^\W_\p{Han}\p{Hiragana}\p{Katakana}]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.lower())


def _rouge_l(refs: list[str], pred: str) -> Piece:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    return Piece(float(scorer.score_multi(refs, pred)["rougeL"].fmeasure))


def _bleu(refs: list[str], pred: str) -> Piece:
    from sacrebleu.metrics import BLEU

    stats = BLEU().corpus_score([pred], [[r] for r in refs])
    sentence = BLEU(effective_order=True).sentence_score(pred, refs)
    return Piece(sentence.score / 100.0, (*stats.counts, *stats.totals, stats.sys_len, stats.ref_len))


def _corpus_bleu(pieces: list[Piece]) -> float:
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    n = bleu.max_ngram_order
    sums = [sum(p.stats[i] for p in pieces) for i in range(2 * n + 2)]
    score = BLEU.compute_bleu(sums[:n], sums[n:2 * n], sums[2 * n], sums[2 * n + 1],
                              smooth_method=bleu.smooth_method, smooth_value=bleu.smooth_value,
                              effective_order=bleu.effective_order, max_ngram_order=n)
    return score.score / 100.0


# ---------------------------------------------------------------------------------------------------------
# CORD: Donut's JSONParseEvaluator semantics

_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.DOTALL)


def _json_value(text: str) -> Any:
    """The JSON object or array in `text` (a surrounding ``` fence allowed), or None if there is none."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, (dict, list)) else None


def _is_json_target(reference: str) -> bool:
    return reference.lstrip()[:1] in ("{", "[") and _json_value(reference) is not None


def _parse_reference(reference: str) -> Any:
    if _is_json_target(reference):
        return _json_value(reference)
    parsed = tokens_to_json(reference)
    if set(parsed) == {"text_sequence"}:
        if parsed["text_sequence"].strip():
            raise ScoreError(f"reference {reference[:80]!r} is neither a Donut token sequence (<s_key>...</s_key>) "
                             "nor a JSON object; cord_ted / cord_f1 score cord_v2 targets (use e.g. anls, "
                             "rouge_l for other data)")
        return {}  # an empty gt_parse serialises to ""
    return parsed


def _parse_prediction(prediction: str, json_target: bool) -> Any:
    """The prediction as JSON, read the way its reference is written; {} (an empty tree) if it does not parse."""
    if json_target:
        value = _json_value(prediction)
        return {} if value is None else value
    parsed = tokens_to_json(prediction)
    return {} if set(parsed) == {"text_sequence"} else parsed


def _normalize(data: Any) -> Any:
    """Donut's ``normalize_dict``: keys sorted by (length, name), every value a list, empty values dropped.

    Scalars become stripped strings; a list mixing dicts and scalars keeps only its str/int/float scalars.
    Donut's quirks are kept on purpose, e.g. a whitespace-only scalar value becomes an empty leaf while a
    whitespace-only list item is dropped.
    """
    if not data:
        return {}
    if isinstance(data, dict):
        out = {}
        for key in sorted(data, key=lambda k: (len(k), k)):
            value = _normalize(data[key])
            if value:
                out[key] = value if isinstance(value, list) else [value]
        return out
    if isinstance(data, list):
        if all(isinstance(item, dict) for item in data):
            return [d for d in map(_normalize, data) if d]
        return [str(item).strip() for item in data if type(item) in (str, int, float) and str(item).strip()]
    return [str(data).strip()]


# Node labels: (kind, text). Kinds are explicit where Donut marks leaves with a "<leaf>" text prefix.
_ROOT, _ITEM = ("root", ""), ("item", "")


def _tree(data: Any, label: tuple[str, str] = _ROOT) -> Any:
    """Donut's tree of normalised data: key nodes, an item node per dict in a list, leaf nodes for strings."""
    import zss

    node = zss.Node(label)
    if isinstance(data, dict):
        for key, value in data.items():
            node.addkid(_tree(value, ("key", key)))
    elif all(isinstance(item, dict) for item in data):
        for item in data:
            node.addkid(_tree(item, _ITEM))
    else:
        for leaf in data:
            node.addkid(zss.Node(("leaf", leaf)))
    return node


def _insert_remove_cost(node: Any) -> int:
    kind, text = node.label
    return len(text) if kind == "leaf" else 1


def _update_cost(a: Any, b: Any) -> int:
    (kind_a, text_a), (kind_b, text_b) = a.label, b.label
    if kind_a == "leaf" and kind_b == "leaf":
        return Levenshtein.distance(text_a, text_b)
    if kind_a == "leaf" or kind_b == "leaf":
        return 1 + len(text_a if kind_a == "leaf" else text_b)
    return int(a.label != b.label)


def tree_edit_distance(a: Any, b: Any) -> float:
    """Donut's tree edit distance between two normalised JSON values (see :func:`_normalize`)."""
    import zss

    return float(zss.distance(_tree(a), _tree(b), get_children=zss.Node.get_children,
                              insert_cost=_insert_remove_cost, remove_cost=_insert_remove_cost,
                              update_cost=_update_cost))


def _ted_accuracy(gt: Any, pred: Any) -> float:
    gt, pred = _normalize(gt), _normalize(pred)
    distance = tree_edit_distance(pred, gt)
    size = tree_edit_distance({}, gt)  # the cost of building gt from nothing
    if size == 0:
        return float(distance == 0)
    return max(0.0, 1.0 - distance / size)


def _flatten(data: Any, path: str = "") -> list[tuple[str, str]]:
    """Donut's ``flatten``: (dotted key path, leaf) for every leaf; list items share their parent's path."""
    if isinstance(data, dict):
        return [f for k, v in data.items() for f in _flatten(v, f"{path}.{k}" if path else k)]
    if isinstance(data, list):
        return [f for item in data for f in _flatten(item, path)]
    return [(path, data)]


def field_counts(gt: Any, pred: Any) -> tuple[int, int]:
    """(true positives, false positives + false negatives) of the fields of two JSON values, Donut's cal_f1."""
    gt_fields, pred_fields = Counter(_flatten(_normalize(gt))), Counter(_flatten(_normalize(pred)))
    tp = sum((gt_fields & pred_fields).values())
    return tp, gt_fields.total() + pred_fields.total() - 2 * tp


def _f1(tp: int, misses: int) -> float:
    return tp / (tp + misses / 2) if tp + misses else 1.0  # nothing to find and nothing found


def _cord_ted(refs: list[str], pred: str) -> Piece:
    return Piece(max(_ted_accuracy(_parse_reference(r), _parse_prediction(pred, _is_json_target(r)))
                     for r in refs))


def _cord_f1(refs: list[str], pred: str) -> Piece:
    counts = [field_counts(_parse_reference(r), _parse_prediction(pred, _is_json_target(r))) for r in refs]
    best = max(counts, key=lambda c: _f1(*c))
    return Piece(_f1(*best), best)


def _micro_f1(pieces: list[Piece]) -> float:
    return _f1(sum(p.stats[0] for p in pieces), sum(p.stats[1] for p in pieces))


# ---------------------------------------------------------------------------------------------------------
# The table

METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("cord_ted", True, _cord_ted, _mean,
           "Donut's normalised tree-edit-distance accuracy of the parsed JSON, mean over samples"),
    Metric("cord_f1", True, _cord_f1, _micro_f1,
           "Donut's field-level F1 of the parsed JSON, micro-averaged over all fields of all samples"),
    Metric("exact_match", True, _exact_match, _mean, "equal after lower-casing and collapsing whitespace"),
    Metric("anls", True, _anls, _mean, "DocVQA average normalised Levenshtein similarity, threshold 0.5"),
    Metric("relaxed_accuracy", True, _relaxed_accuracy, _mean,
           "ChartQA: numbers within 5% of the answer, other answers equal ignoring case"),
    Metric("cer", False, _error_rate(words=False), _corpus_error_rate,
           "character error rate (jiwer): total edits / total reference characters"),
    Metric("wer", False, _error_rate(words=True), _corpus_error_rate,
           "word error rate (jiwer): total edits / total reference words"),
    Metric("rouge_l", True, _rouge_l, _mean, "ROUGE-L F-measure (rouge-score), mean over samples"),
    Metric("bleu", True, _bleu, _corpus_bleu, "corpus BLEU (sacrebleu defaults) / 100"),
]}

# The metrics `vlmtune evaluate` and in-training evaluation use for a data format when the recipe names none.
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "cord_v2": ("cord_ted", "cord_f1", "exact_match"),
    "rdr": ("rouge_l", "bleu", "cer"),
    "messages": ("exact_match", "anls", "rouge_l"),
    "llava": ("exact_match", "anls", "rouge_l"),
    "sharegpt": ("exact_match", "anls", "rouge_l"),
    "columns": ("exact_match", "anls", "rouge_l"),
    # Whole pages in Nemotron-Parse's syntax (text with box and class tokens): character error rate and ROUGE-L.
    "nemotron_parse": ("cer", "rouge_l", "exact_match"),
}


# ---------------------------------------------------------------------------------------------------------
# API


def check_metrics(names: Iterable[str]) -> list[str]:
    """`names` as a list without repeats, or a ScoreError naming each unknown one (with a close match)."""
    names = list(dict.fromkeys(names))
    problems = []
    for name in names:
        if name not in METRICS:
            close = difflib.get_close_matches(name, METRICS, n=1)
            problems.append(f"unknown metric {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    if problems:
        raise ScoreError("; ".join(problems) + f" (metrics: {', '.join(METRICS)})")
    if not names:
        raise ScoreError(f"no metrics given; choose from {', '.join(METRICS)}")
    return names


def _references(value: Any, where: str) -> list[str]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise ScoreError(f"{where}: 'reference' must be a string or a non-empty list of strings, "
                         f"got {json.dumps(value, ensure_ascii=False)[:80]}")
    return refs


def _pair(row: Any, where: str, think_tags: tuple[str, str] | None) -> tuple[list[str], str]:
    if not isinstance(row, dict):
        raise ScoreError(f"{where}: a row must be a JSON object with 'reference' and 'prediction', "
                         f"got {type(row).__name__}")
    missing = [k for k in ("reference", "prediction") if k not in row]
    if missing:
        raise ScoreError(f"{where}: the row has no {' or '.join(map(repr, missing))}; every row needs "
                         "'reference' (a string or a list of strings) and 'prediction' (a string), as "
                         "`vlmtune evaluate` writes them")
    pred = row["prediction"]
    if not isinstance(pred, str):
        raise ScoreError(f"{where}: 'prediction' must be a string, got {type(pred).__name__}")
    if think_tags is not None:
        pred = strip_thinking(pred, *think_tags)
    return _references(row["reference"], where), pred


def score_pieces(rows: Sequence[dict], metrics: Sequence[str], *, think_tags: tuple[str, str] | None = None,
                 where: Callable[[int], str] = lambda i: f"row {i}") -> list[dict[str, Piece]]:
    """Per row, each metric's Piece. Under data parallelism each rank scores its own rows; gather the pieces
    of every sample (each once) and pass them all to :func:`aggregate`."""
    names = check_metrics(metrics)
    out = []
    for i, row in enumerate(rows):
        refs, pred = _pair(row, where(i), think_tags)
        try:
            out.append({name: METRICS[name].score(refs, pred) for name in names})
        except ScoreError as e:
            raise ScoreError(f"{where(i)}: {e}") from e
    return out


def aggregate(pieces: Sequence[dict[str, Piece]], metrics: Sequence[str] | None = None) -> dict[str, float]:
    """The run's value of each metric from all samples' pieces (any order, any split across ranks)."""
    if not pieces:
        raise ScoreError("no scored rows to aggregate")
    names = check_metrics(metrics if metrics is not None else pieces[0])
    return {name: METRICS[name].aggregate([p[name] for p in pieces]) for name in names}


def score_rows(rows: Sequence[dict], metrics: Sequence[str], *,
               think_tags: tuple[str, str] | None = None) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(per-row ``{metric: value}``, aggregate ``{metric: value}``) for rows with 'reference' and 'prediction'.

    `think_tags` (open, close), e.g. ``THINK_TAGS["think"]``, strips think blocks from predictions first.
    """
    pieces = score_pieces(rows, metrics, think_tags=think_tags)
    return [{k: p.value for k, p in row.items()} for row in pieces], aggregate(pieces, metrics)


def read_predictions(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, row) of each non-blank line of a predictions JSONL file, with file:line errors."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such predictions file (write one with `vlmtune evaluate`)")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ScoreError(f"{path}:{line_no}: not valid JSON ({e.msg}); each line must be one JSON object "
                             "with 'reference' and 'prediction'") from e
    if not rows:
        raise ScoreError(f"{path}: the file has no rows to score")
    return rows


def rescore_file(predictions_jsonl: str | Path, metrics: Sequence[str], *,
                 think_tags: tuple[str, str] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Score a predictions file again: (its rows with 'scores' replaced by the new per-row values, aggregate)."""
    numbered = read_predictions(predictions_jsonl)
    rows = [row for _, row in numbered]
    pieces = score_pieces(rows, metrics, think_tags=think_tags,
                          where=lambda i: f"{predictions_jsonl}:{numbered[i][0]}")
    scored = [{**row, "scores": {k: p.value for k, p in piece.items()}}
              for row, piece in zip(rows, pieces, strict=True)]
    return scored, aggregate(pieces, metrics)
