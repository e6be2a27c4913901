"""Task metrics (vlmtune/scores.py) against published values and independent implementations.

Independent references written here: a dynamic-programming Levenshtein distance, a memoised recursive forest edit
distance (the textbook recursion, not Zhang-Shasha), an LCS-based ROUGE-L and the BLEU formula of Papineni et al.
Published or reference-computed values: the ANLS "Coca-Cola" worked example, Donut's flatten docstring example, and
cord_ted / cord_f1 values computed by clovaai/donut's own JSONParseEvaluator (see DONUT_VALUES).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from vlmtune import scores
from vlmtune.data.formats import FORMAT_NAMES, json_to_tokens, tokens_to_json
from vlmtune.scores import METRICS, ScoreError, rescore_file, score_rows, strip_thinking

# ---------------------------------------------------------------------------------------------------------
# Independent references


def lev(a, b) -> int:
    """Levenshtein distance over any two sequences (unit insert, delete, substitute)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def tree(data, label=("root", "")):
    """Donut's tree of a normalised JSON value as nested tuples (label, children)."""
    if isinstance(data, dict):
        kids = tuple(tree(v, ("key", k)) for k, v in data.items())
    elif all(isinstance(x, dict) for x in data):
        kids = tuple(tree(x, ("item", "")) for x in data)
    else:
        kids = tuple((("leaf", x), ()) for x in data)
    return (label, kids)


def _node_cost(node) -> int:
    kind, text = node[0]
    return len(text) if kind == "leaf" else 1


def _rename_cost(v, w) -> int:
    (ka, ta), (kb, tb) = v[0], w[0]
    if ka == "leaf" and kb == "leaf":
        return lev(ta, tb)
    if "leaf" in (ka, kb):
        return 1 + len(ta if ka == "leaf" else tb)
    return int(v[0] != w[0])


@cache
def forest_distance(f: tuple, g: tuple) -> int:
    """Edit distance between ordered forests by the recursion on their rightmost roots (Tai; Zhang & Shasha §2)."""
    if not f and not g:
        return 0
    if not g:
        return forest_distance(f[:-1] + f[-1][1], ()) + _node_cost(f[-1])
    if not f:
        return forest_distance((), g[:-1] + g[-1][1]) + _node_cost(g[-1])
    v, w = f[-1], g[-1]
    return min(forest_distance(f[:-1] + v[1], g) + _node_cost(v),
               forest_distance(f, g[:-1] + w[1]) + _node_cost(w),
               forest_distance(v[1], w[1]) + forest_distance(f[:-1], g[:-1]) + _rename_cost(v, w))


def ted_accuracy(gt, pred) -> float:
    d = forest_distance((tree(pred),), (tree(gt),))
    size = forest_distance((tree({}),), (tree(gt),))
    return max(0.0, 1 - d / size)


def lcs_f1(ref: list[str], hyp: list[str]) -> float:
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, x in enumerate(ref, 1):
        for j, y in enumerate(hyp, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    lcs = table[-1][-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(pairs: list[tuple[list[str], str]]) -> float:
    """Papineni et al. 2002 with whitespace tokens; valid where every n-gram precision is non-zero (no smoothing)."""
    matched, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for refs, hyp in pairs:
        h = hyp.split()
        hyp_len += len(h)
        ref_len += min((abs(len(r.split()) - len(h)), len(r.split())) for r in refs)[1]  # closest, shorter on ties
        for n in range(1, 5):
            counts = ngrams(h, n)
            best = Counter()
            for r in refs:
                best |= ngrams(r.split(), n)
            matched[n - 1] += sum((counts & best).values())
            total[n - 1] += sum(counts.values())
    assert all(matched), "the crafted pairs must have every n-gram order matched"
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / 4)


def one(metric: str, reference, prediction: str) -> float:
    per_row, _ = score_rows([{"reference": reference, "prediction": prediction}], [metric])
    return per_row[0][metric]


# ---------------------------------------------------------------------------------------------------------
# ANLS, exact match, relaxed accuracy

# The worked example of the ANLS definition (Biten et al., ST-VQA, used by DocVQA): answers "Coca Cola" and
# "Coca Cola Company", the similarity to each and the resulting ANLS, as reproduced in the tests of the `anls`
# package (shunk031/ANLS tests/metrics/score_test.py), two decimals.
COCA_COLA = [("The Coca", 0.44, 0.29, 0.00), ("CocaCola", 0.89, 0.47, 0.89), ("Coca cola", 1.00, 0.53, 1.00),
             ("Cola", 0.44, 0.23, 0.00), ("Cat", 0.22, 0.12, 0.00)]


@pytest.mark.parametrize(("output", "sim1", "sim2", "published"), COCA_COLA)
def test_anls_published_coca_cola_example(output, sim1, sim2, published):
    answers = ["Coca Cola", "Coca Cola Company"]
    sims = [1 - lev(a.lower(), output.lower()) / max(len(a), len(output)) for a in answers]
    assert sims == pytest.approx([sim1, sim2], abs=0.01)  # the table's two decimals (0.235 is printed 0.23)
    expected = max(s if s >= 0.5 else 0.0 for s in sims)
    assert one("anls", answers, output) == pytest.approx(expected, abs=1e-12)
    assert one("anls", answers, output) == pytest.approx(published, abs=0.01)


def test_anls_normalisation_threshold_and_edges():
    assert one("anls", "  New   YORK ", "new york") == 1.0  # case and whitespace runs do not count
    assert one("anls", "ab", "ax") == 0.5  # exactly at the threshold: kept, as the official RRC script does
    assert one("anls", "abc", "axy") == 0.0  # similarity 1/3 < 0.5
    assert one("anls", "", "") == 1.0
    assert one("anls", "answer", "") == 0.0
    assert one("anls", "café", "cafe") == pytest.approx(0.75)  # one substitution in four characters
    assert one("anls", "東京都", "東京") == pytest.approx(1 - 1 / 3)
    assert one("anls", ["1999", "nineteen ninety-nine"], "1998") == pytest.approx(0.75)  # the best reference


def test_exact_match():
    assert one("exact_match", "Total  Price\n", "total price") == 1.0
    assert one("exact_match", "ÉCOLE", "école") == 1.0
    assert one("exact_match", "12", "12.0") == 0.0
    assert one("exact_match", ["yes", "Yes."], "yes.") == 1.0
    assert one("exact_match", "", " ") == 1.0
    assert one("exact_match", "a", "") == 0.0


@pytest.mark.parametrize(("reference", "prediction", "expected"), [
    ("100", "105", 1.0), ("100", "95", 1.0), ("200", "210", 1.0),  # exactly 5 %
    ("200", "210.1", 0.0), ("100", "94.9", 0.0),
    ("5%", "0.05", 1.0), ("12.5", "12.5%", 0.0),  # "%" divides by 100 on either side
    ("Yes", "yes", 1.0), ("Yes", "yes.", 0.0),  # not numbers: equal ignoring case
    ("0", "0", 1.0), ("0", "0.0", 0.0),  # pix2struct: a zero target falls back to string equality
    ("-40", "-41", 1.0), (" 1000\n", "1049 ", 1.0), ("1,000", "1000", 0.0),
    (["12", "twelve"], "Twelve", 1.0), ("7", "", 0.0),
])
def test_relaxed_accuracy(reference, prediction, expected):
    assert one("relaxed_accuracy", reference, prediction) == expected


# ---------------------------------------------------------------------------------------------------------
# CER / WER

ERROR_PAIRS = [("the cat sat on the mat", "the cat sit on mat"), ("héllo wörld", "hello world"),
               ("東京タワー", "東京タワ"), ("receipt total 93,500", "receipt total 93.500 IDR"), ("a", "a")]


def test_cer_wer_against_levenshtein():
    rows = [{"reference": r, "prediction": p} for r, p in ERROR_PAIRS]
    per_row, agg = score_rows(rows, ["cer", "wer"])
    for (ref, pred), got in zip(ERROR_PAIRS, per_row, strict=True):
        assert got["cer"] == lev(ref, pred) / len(ref)
        assert got["wer"] == lev(ref.split(), pred.split()) / len(ref.split())
    assert agg["cer"] == sum(lev(r, p) for r, p in ERROR_PAIRS) / sum(len(r) for r, _ in ERROR_PAIRS)
    assert agg["wer"] == (sum(lev(r.split(), p.split()) for r, p in ERROR_PAIRS)
                          / sum(len(r.split()) for r, _ in ERROR_PAIRS))


def test_cer_wer_edges_follow_jiwer():
    import jiwer

    refs, preds = ["abc", "", "x y"], ["", "ab", "x  y "]
    _, agg = score_rows([{"reference": r, "prediction": p} for r, p in zip(refs, preds, strict=True)], ["cer", "wer"])
    assert agg == {"cer": jiwer.cer(refs, preds), "wer": jiwer.wer(refs, preds)}
    assert one("cer", "abc", "") == 1.0
    assert one("cer", "", "") == 0.0
    assert one("cer", "", "ab") == 2.0  # jiwer: an empty reference scores its insertions
    assert one("cer", ["kitten", "sitting"], "sitting") == 0.0  # the closest reference


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L and BLEU


def test_rouge_l_against_lcs():
    pairs = [("the quick brown fox jumps over the lazy dog", "the quick brown dog jumps on the log"),
             ("A man rides a horse.", "a man is riding a horse"), ("one two three", "three two one")]
    for ref, pred in pairs:
        ref_words, pred_words = (s.lower().replace(".", " ").split() for s in (ref, pred))
        assert one("rouge_l", ref, pred) == pytest.approx(lcs_f1(ref_words, pred_words), abs=1e-12)


def test_rouge_l_unicode_and_edges():
    from rouge_score.rouge_scorer import RougeScorer

    ascii_pair = ("The cat, sat on the mat!", "the cat sat on a mat")
    default = RougeScorer(["rougeL"]).score(*ascii_pair)["rougeL"].fmeasure
    assert one("rouge_l", *ascii_pair) == default  # same tokens as rouge-score's default on ASCII
    assert one("rouge_l", "Crème brûlée au café", "crème brûlée") == pytest.approx(lcs_f1(
        ["crème", "brûlée", "au", "café"], ["crème", "brûlée"]))
    assert RougeScorer(["rougeL"]).score("東京タワー", "東京タワー")["rougeL"].fmeasure == 0  # why ours exists
    assert one("rouge_l", "東京タワー", "東京タワー") == 1.0
    tokyo = ("東京タワーに行く", "東京に行く")  # Han and kana: one token per character
    assert one("rouge_l", *tokyo) == pytest.approx(lcs_f1(list(tokyo[0]), list(tokyo[1])))
    assert one("rouge_l", "", "") == 0.0  # rouge-score: no tokens, no score
    assert one("rouge_l", ["a red car", "the blue car"], "the blue car") == 1.0


BLEU_PAIRS = [(["the cat is on the mat"], "the cat is on the mat today"),
              (["there is a cat on the mat", "a cat is on the mat"], "a cat is on the red mat"),
              (["we need to read the total of this receipt"], "we need to read the total on the receipt"),
              (["an apple a day keeps the doctor away"], "an apple a day keeps doctors away")]


def test_bleu_against_papineni():
    rows = [{"reference": refs, "prediction": hyp} for refs, hyp in BLEU_PAIRS]
    _, agg = score_rows(rows, ["bleu"])
    assert agg["bleu"] == pytest.approx(corpus_bleu(BLEU_PAIRS), abs=1e-12)


def test_bleu_aggregate_is_sacrebleu_corpus_score():
    from sacrebleu.metrics import BLEU

    pairs = [*BLEU_PAIRS, (["Short."], "A much longer, wordier answer."), (["x"], ""), ([""], "y"),
             (["Ünïcödé text, too"], "Unicode text too")]
    _, agg = score_rows([{"reference": r, "prediction": h} for r, h in pairs], ["bleu"])
    streams = [[refs[k] if k < len(refs) else None for refs, _ in pairs] for k in range(2)]
    assert agg["bleu"] == BLEU().corpus_score([h for _, h in pairs], streams).score / 100
    per_row, _ = score_rows([{"reference": BLEU_PAIRS[0][0], "prediction": BLEU_PAIRS[0][1]}], ["bleu"])
    sentence = BLEU(effective_order=True).sentence_score(BLEU_PAIRS[0][1], BLEU_PAIRS[0][0]).score / 100
    assert per_row[0]["bleu"] == sentence


# ---------------------------------------------------------------------------------------------------------
# CORD: Donut's JSONParseEvaluator semantics

ITEM1 = {"nm": "Nasi Campur Bali", "cnt": "1 x", "price": "75,000"}
ITEM2 = {"nm": "Es Teh", "cnt": "2 x", "price": "10,000"}
GT1 = {"menu": [ITEM1, ITEM2], "sub_total": {"subtotal_price": "85,000", "tax_price": "8,500"},
       "total": {"total_price": "93,500"}}
CORD_PAIRS = {  # name: (ground truth, prediction)
    "drop_item_and_digit": (GT1, {"menu": ITEM1, "sub_total": {"subtotal_price": "85,000", "tax_price": "8,600"},
                                  "total": {"total_price": "93,500"}}),
    "identical_reordered": (GT1, {"total": {"total_price": "93,500"}, "menu": [ITEM1, ITEM2],
                                  "sub_total": {"tax_price": "8,500", "subtotal_price": "85,000"}}),
    "single_item_dict_vs_list": ({"menu": {"nm": "Kopi", "price": "20,000"}},
                                 {"menu": [{"nm": "Kopi", "price": "20,000"}]}),
    "sub_items_and_leaf_lists": ({"menu": {"nm": ["AYAM", "BAKAR"], "price": "30,000",
                                           "sub": [{"nm": "Extra Cheese", "price": "5,000"}, {"nm": "Sambal"}]}},
                                 {"menu": {"nm": "AYAM BAKAR", "price": "30.000",
                                           "sub": {"nm": "Extra Cheese", "price": "5,000"}}}),
    "unicode": ({"menu": [{"nm": "Café Crème", "price": "4,50€"}, {"nm": "拿铁", "price": "￥28"}]},
                {"menu": [{"nm": "Cafe Creme", "price": "4,50€"}, {"nm": "拿铁咖啡", "price": "￥28"}]}),
    "extra_and_empty_fields": ({"menu": {"nm": "A", "price": "3"}, "total": {"total_price": "1"}},
                               {"menu": {"nm": "A", "price": ""}, "void_menu": [],
                                "total": {"total_price": "1", "cashprice": "5"}}),
    "leaf_for_subtree": ({"menu": {"nm": "Nasi"}}, {"menu": "Nasi"}),
    "empty_prediction": (GT1, {}),
}
# (cal_acc, cal_f1) of each pair, the mean cal_acc and the corpus cal_f1 of all pairs, computed by clovaai/donut's
# own JSONParseEvaluator (donut/util.py at commit 4cfcf97, with zss 1.2.0 and nltk 3.10.4) on the dicts above.
DONUT_VALUES = {"drop_item_and_digit": (0.726027397260274, 0.6666666666666666), "identical_reordered": (1.0, 1.0),
                "single_item_dict_vs_list": (1.0, 1.0), "sub_items_and_leaf_lists": (0.625, 0.4),
                "unicode": (0.8518518518518519, 0.5), "extra_and_empty_fields": (0.6, 0.6666666666666666),
                "leaf_for_subtree": (0.7142857142857143, 0.0), "empty_prediction": (0.0, 0.0)}
DONUT_MEAN_TED, DONUT_CORPUS_F1 = 0.68964562042473, 0.6111111111111112


@pytest.mark.parametrize("target", ["tokens", "json"])
def test_cord_matches_donut_evaluator(target):
    write = json_to_tokens if target == "tokens" else lambda d: json.dumps(d, ensure_ascii=False)
    rows = [{"reference": write(gt), "prediction": write(pred)} for gt, pred in CORD_PAIRS.values()]
    per_row, agg = score_rows(rows, ["cord_ted", "cord_f1"])
    for name, got in zip(CORD_PAIRS, per_row, strict=True):
        assert (got["cord_ted"], got["cord_f1"]) == pytest.approx(DONUT_VALUES[name], abs=1e-12), name
    assert agg == pytest.approx({"cord_ted": DONUT_MEAN_TED, "cord_f1": DONUT_CORPUS_F1}, abs=1e-12)


RECEIPT_A = ("<s_menu><s_nm>Es Jeruk</s_nm><s_cnt>1</s_cnt><s_price>{price}</s_price><sep/><s_nm>Donut</s_nm>"
             "<s_cnt>1</s_cnt><s_price>20,500</s_price></s_menu><s_sub_total><s_subtotal_price>26,500"
             "</s_subtotal_price><s_tax_price>2,650</s_tax_price></s_sub_total><s_total><s_total_price>29,150"
             "</s_total_price></s_total>")
RECEIPT_B = ("<s_menu><s_nm>Sate</s_nm><s_cnt>1</s_cnt><s_price>12,000</s_price>{sub}</s_menu><s_sub_total>"
             "<s_subtotal_price>20,000</s_subtotal_price><s_tax_price>2,000</s_tax_price></s_sub_total><s_total>"
             "<s_total_price>22,000</s_total_price></s_total>")


def test_worked_receipt_example_in_docs_metrics():
    """The numbers docs/metrics.md works through by hand: one price changed, one sub-item dropped, six exact."""
    price_ref, price_pred = RECEIPT_A.format(price="6,000"), RECEIPT_A.format(price="6,500")
    sub_ref = RECEIPT_B.format(sub="<s_sub><s_nm>Rice</s_nm><s_price>8,000</s_price></s_sub>")
    sub_pred = RECEIPT_B.format(sub="")
    rows = [{"reference": price_ref, "prediction": price_pred}, {"reference": sub_ref, "prediction": sub_pred}]
    rows += [{"reference": price_ref, "prediction": price_ref}] * 6
    per_row, run = score_rows(rows, ["cord_ted", "cord_f1", "exact_match"])
    # Building the first reference costs 59 (30 nodes at 1, 29 leaf characters); the changed price is 1 edit.
    # Dropping the sub-item removes 13 of the second reference's 53.
    assert per_row[0]["cord_ted"] == pytest.approx(1 - 1 / 59) and per_row[0]["cord_f1"] == pytest.approx(8 / 9)
    assert per_row[1]["cord_ted"] == pytest.approx(1 - 13 / 53) and per_row[1]["cord_f1"] == pytest.approx(6 / 7)
    for (ref, pred), got in zip([(price_ref, price_pred), (sub_ref, sub_pred)], per_row[:2], strict=True):
        norm_ref, norm_pred = scores._normalize(tokens_to_json(ref)), scores._normalize(tokens_to_json(pred))
        assert got["cord_ted"] == pytest.approx(ted_accuracy(norm_ref, norm_pred))
    # Run F1 is micro: 9 + 8 + 6 * 9 reference fields, 2 + 2 of them missed or wrong.
    assert run["cord_f1"] == pytest.approx(2 * 68 / (2 * 68 + 1 + 1 + 2))
    assert run["cord_ted"] == pytest.approx((2 - 1 / 59 - 13 / 53 + 6) / 8)
    assert run["exact_match"] == 0.75


def test_cord_ted_against_forest_recursion():
    for name, (gt, pred) in CORD_PAIRS.items():
        expected = ted_accuracy(scores._normalize(gt), scores._normalize(pred))
        assert one("cord_ted", json.dumps(gt), json.dumps(pred)) == pytest.approx(expected, abs=1e-12), name


def _random_value(rng: random.Random, depth: int):
    words = ["7", "x", "ab", "Nasi", "é", "拿铁", "1,000", "a b", " "]  # " ": an empty leaf (a Donut quirk)
    kind = rng.random()
    if depth == 0 or kind < 0.4:
        return rng.choice(words)
    if kind < 0.6:
        return rng.sample(words, rng.randint(1, 2))
    if kind < 0.8:
        return [_random_dict(rng, depth - 1) for _ in range(rng.randint(1, 2))]
    return _random_dict(rng, depth - 1)


def _random_dict(rng: random.Random, depth: int) -> dict:
    return {k: _random_value(rng, depth) for k in rng.sample(["nm", "cnt", "price", "sub"], rng.randint(1, 2))}


def test_tree_edit_distance_against_forest_recursion_random():
    rng = random.Random(0)
    for _ in range(60):
        a, b = scores._normalize(_random_dict(rng, 2)), scores._normalize(_random_dict(rng, 2))
        assert scores.tree_edit_distance(a, b) == forest_distance((tree(a),), (tree(b),)), (a, b)


def test_cord_normalisation_published_examples():
    # Donut's flatten docstring example
    data = {"menu": [{"name": ["cake"], "count": ["2"]}, {"name": ["juice"], "count": ["1"]}]}
    assert scores._flatten(data) == [("menu.name", "cake"), ("menu.count", "2"), ("menu.name", "juice"),
                                     ("menu.count", "1")]
    # Donut's normalize_dict on its quirks (output of donut/util.py at 4cfcf97): a blank scalar becomes an empty
    # leaf, a scalar 0 and an empty nested dict are dropped, a list keeps its non-blank str/int/float items.
    messy = {"a": " ", "b": 0, "c": [0, True, None, " x "], "d": {"e": ""}}
    assert scores._normalize(messy) == {"a": [""], "c": ["0", "x"]}
    # keys sorted by (length, name), every value a list
    assert list(scores._normalize({"total": "1", "nm": "a", "cnt": "2"})) == ["nm", "cnt", "total"]


def test_cord_unparsable_and_odd_predictions():
    gt = json_to_tokens(GT1)
    n_fields = 9  # 2 menu items x 3 fields, 2 sub_total fields, 1 total field
    for bad in ["I cannot read this receipt", "", "<s_menu>unclosed", "{\"menu\": "]:
        assert one("cord_ted", gt, bad) == 0.0
        pieces = scores.score_pieces([{"reference": gt, "prediction": bad}], ["cord_f1"])
        assert pieces[0]["cord_f1"] == (0.0, (0, n_fields))  # every gt field missed, none predicted
    # JSON targets: a fenced answer is read, invalid JSON is an empty tree, tokens do not count as JSON
    ref = json.dumps(GT1)
    assert one("cord_ted", ref, "```json\n" + json.dumps(GT1, indent=2) + "\n```") == 1.0
    assert one("cord_ted", ref, json.dumps(GT1)[:-1]) == 0.0
    assert one("cord_ted", ref, gt) == 0.0
    # tokens_to_json reads a field across line breaks (Donut's token2json drops such a field: its regex has no DOTALL)
    assert one("cord_ted", json_to_tokens({"menu": {"nm": "Kopi"}}), "<s_menu>\n<s_nm>Kopi</s_nm>\n</s_menu>") == 1.0


def test_cord_empty_ground_truth_and_several_references():
    empty = json_to_tokens({})
    assert empty == ""
    assert (one("cord_ted", empty, ""), one("cord_f1", empty, "")) == (1.0, 1.0)
    assert (one("cord_ted", "{}", '{"nm": "a"}'), one("cord_f1", empty, "<s_nm>a</s_nm>")) == (0.0, 0.0)
    refs = [json_to_tokens({"nm": "Kopi"}), json_to_tokens({"nm": "Teh"})]
    assert one("cord_ted", refs, "<s_nm>Teh</s_nm>") == 1.0
    assert one("cord_f1", refs, "<s_nm>Teh</s_nm>") == 1.0
    with pytest.raises(ScoreError, match=r"row 0: reference 'just words' is neither a Donut token sequence"):
        one("cord_ted", "just words", "<s_nm>a</s_nm>")


# ---------------------------------------------------------------------------------------------------------
# Think blocks


@pytest.mark.parametrize(("text", "tags", "expected"), [
    ("<think>\nadd 2 and 2\n</think>\n\n4", "think", "4"),
    ("add 2 and 2\n</think>\n\n4", "think", "4"),  # Qwen3 Thinking: <think> was in the generation prompt
    ("<think>\n\n</think>\n\nParis", "think", "Paris"),  # thinking switched off in the template
    ("<think>a</think>X <think>b</think>Y", "think", "X Y"),
    ("<think>still thinking when max_new_tokens ran out", "think", ""),
    ("◁think▷收据◁/think▷ 93,500", "kimi", "93,500"),
    ("<think>x</think> 4", "kimi", "<think>x</think> 4"),  # other markers are left alone
    ("  no think block  ", "think", "  no think block  "),
])
def test_strip_thinking(text, tags, expected):
    assert strip_thinking(text, *scores.THINK_TAGS[tags]) == expected


def test_score_rows_strips_thinking_when_asked():
    row = {"reference": "4", "prediction": "<think>2+2</think>\n4"}
    assert score_rows([row], ["exact_match"])[1] == {"exact_match": 0.0}
    assert score_rows([row], ["exact_match"], think_tags=scores.THINK_TAGS["think"])[1] == {"exact_match": 1.0}


# ---------------------------------------------------------------------------------------------------------
# API: several metrics, exact aggregation across ranks, re-scoring a file, errors


def _mixed_rows() -> list[dict]:
    rng = random.Random(1)
    words = ["receipt", "total", "93,500", "Kopi", "café", "東京", "a", "the", "tax"]
    rows = []
    for i in range(40):
        ref = " ".join(rng.choices(words, k=rng.randint(1, 8)))
        pred = " ".join(rng.choices(words, k=rng.randint(0, 8))) if i % 3 else ref
        rows.append({"index": i, "reference": [ref, ref.upper()] if i % 5 == 0 else ref, "prediction": pred})
    return rows


TEXT_METRICS = ["exact_match", "anls", "relaxed_accuracy", "cer", "wer", "rouge_l", "bleu"]


def test_two_rank_aggregate_equals_one_rank_exactly():
    rows = _mixed_rows()
    _, single = score_rows(rows, TEXT_METRICS)
    shards = [rows[rank::2] for rank in range(2)]  # DistributedSampler's split
    gathered = [p for rank in (1, 0) for p in scores.score_pieces(shards[rank], TEXT_METRICS)]  # any order
    assert scores.aggregate(gathered, TEXT_METRICS) == single  # bit-for-bit, not approximately
    cord_rows = [{"reference": json_to_tokens(g), "prediction": json_to_tokens(p)} for g, p in CORD_PAIRS.values()]
    _, cord_single = score_rows(cord_rows, ["cord_ted", "cord_f1"])
    cord_gathered = [p for rank in (1, 0) for p in scores.score_pieces(cord_rows[rank::2], ["cord_ted", "cord_f1"])]
    assert scores.aggregate(cord_gathered) == cord_single


def test_rescore_file_reproduces_score_rows(tmp_path: Path):
    rows = _mixed_rows()
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({**r, "prompt": "p", "scores": {"old": 1}}) + "\n" for r in rows) + "\n")
    per_row, agg = score_rows(rows, TEXT_METRICS)
    rescored, agg2 = rescore_file(path, TEXT_METRICS)
    assert agg2 == agg
    assert [r["scores"] for r in rescored] == per_row
    assert [r["index"] for r in rescored] == list(range(len(rows))) and rescored[0]["prompt"] == "p"
    assert all(isinstance(v, float) for r in rescored for v in r["scores"].values())
    assert json.loads(json.dumps(agg)) == agg  # plain JSON numbers


def test_rescore_file_errors(tmp_path: Path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"reference": "a", "prediction": "a"}\n\n{"reference": "b"}\n')
    with pytest.raises(ScoreError, match=r"preds\.jsonl:3: the row has no 'prediction'; every row needs"):
        rescore_file(path, ["anls"])
    path.write_text('{"reference": "a", "prediction": "a"}\n{"reference": "b", prediction: "b"}\n')
    with pytest.raises(ScoreError, match=r"preds\.jsonl:2: not valid JSON"):
        rescore_file(path, ["anls"])
    path.write_text('{"reference": [], "prediction": "a"}\n')
    with pytest.raises(ScoreError, match=r"preds\.jsonl:1: 'reference' must be a string or a non-empty list"):
        rescore_file(path, ["anls"])
    with pytest.raises(ScoreError, match=r"no such predictions file"):
        rescore_file(tmp_path / "missing.jsonl", ["anls"])
    with pytest.raises(ScoreError, match=r"unknown metric 'rouge-l'; did you mean 'rouge_l'\?; unknown metric 'f1'"):
        score_rows([{"reference": "a", "prediction": "a"}], ["rouge-l", "f1"])
    with pytest.raises(ScoreError, match=r"row 1: 'prediction' must be a string"):
        score_rows([{"reference": "a", "prediction": "a"}, {"reference": "a", "prediction": None}], ["anls"])


def test_metric_table_and_format_defaults():
    assert set(scores.DEFAULT_METRICS) == set(FORMAT_NAMES)
    assert all(name in METRICS for names in scores.DEFAULT_METRICS.values() for name in names)
    assert {m for m, spec in METRICS.items() if not spec.higher_is_better} == {"cer", "wer"}
    # every metric scores the empty and the unicode edge cases without error, within its range
    rows = [{"reference": "", "prediction": ""}, {"reference": "ünï 東京", "prediction": ""},
            {"reference": "x", "prediction": "ünï 東京"}]
    per_row, agg = score_rows(rows, TEXT_METRICS)
    assert all(0.0 <= v <= 1.0 or k in ("cer", "wer") for r in [*per_row, agg] for k, v in r.items())


def test_import_is_light():
    heavy = "('nltk', 'sacrebleu', 'jiwer', 'zss', 'rouge_score')"
    code = f"import sys, vlmtune.scores; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"
