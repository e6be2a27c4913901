"""Packing and token-budget batching (vlmtune/batching.py): packed logits and losses equal the padded ones for
every family that accepts packing, the refusal is warranted where it refuses, and whole runs do not change."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny import chat_specs

from conftest import small_recipe
from vlmtune import attention
from vlmtune.attention import VARLEN, host_inputs, setup_attention, use_segment_attention
from vlmtune.attention import segments as real_segments
from vlmtune.batching import Batcher, check_packing, equalize, filler_sample, group, micro_batch, rope_index_module
from vlmtune.config import ModelConfig, build_recipe
from vlmtune.encode import IGNORE, Encoded, SampleEncoder
from vlmtune.errors import PackingError
from vlmtune.loss import loss_sum, model_inputs
from vlmtune.model import load_model
from vlmtune.train import finetune, to_device

SPECS = chat_specs()
NAMES = sorted(SPECS)
CPU = torch.device("cpu")


def turn(role, *parts):
    return {"role": role, "content": list(parts)}


def text(t):
    return {"type": "text", "text": t}


def picture(colour, size=(64, 48)):
    return {"type": "image", "image": Image.new("RGB", size, colour)}


def conversations(spec) -> list[list[dict]]:
    """Three samples of different lengths: one image; two images (or one of another shape) over two turns;
    text only, or a video, or one image."""
    second = [picture("blue"), picture("green", (48, 64))] if spec.multi_image else [picture("green", (48, 64))]
    if spec.text_only:
        third = [text("Say hi.")]
    elif spec.video:
        third = [{"type": "video", "video": [Image.new("RGB", (64, 64), "red")] * 4}, text("What moves?")]
    else:
        third = [picture("yellow"), text("Colour?")]
    return [
        [turn("user", picture("red"), text("What colour?")), turn("assistant", text("Red."))],
        [turn("user", *second, text("Compare them.")), turn("assistant", text("Blue, then green, both small.")),
         turn("user", text("Sure?")), turn("assistant", text("Yes."))],
        [turn("user", *third), turn("assistant", text("Hi there, nothing else."))],
    ]



@pytest.mark.parametrize("name", NAMES)
def test_packed_logits_and_loss_equal_padded(name, tiny_model, monkeypatch):
    spec = SPECS[name]
    model, processor, family = load_model(ModelConfig(name_or_path=str(tiny_model(name))), CPU)
    model.eval()
    encoder = SampleEncoder(processor, family, max_length=4096)
    samples = [encoder(c, i) for i, c in enumerate(conversations(spec))]
    assert len({s.length for s in samples}) == 3  # the padded batch really pads
    pad = processor.tokenizer.pad_token_id
    pad = processor.tokenizer.eos_token_id if pad is None else pad
    cast = family.cast_to_model_dtype
    padded = to_device(micro_batch(samples, pad), CPU, torch.float32, cast)
    packed = to_device(micro_batch(samples, pad, packed=True, rope=rope_index_module(model)), CPU, torch.float32,
                       cast)
    assert packed["input_ids"].shape == (1, sum(s.length for s in samples)) and "attention_mask" not in packed
    with torch.no_grad():
        want = model(**model_inputs(padded), use_cache=False).logits[padded["attention_mask"].bool()]
        got = model(**model_inputs(packed), use_cache=False).logits[0]
        loss_padded, loss_packed = float(loss_sum(model, padded)), float(loss_sum(model, packed))
    check_plan_counts(samples, pad, rope_index_module(model), filler_sample(encoder))
    if family.no_packing:
        with pytest.raises(PackingError, match=r"train\.packing"):
            check_packing(family)
        # The refusal is warranted: if this starts to hold, packing became exact and the refusal can go.
        assert not torch.allclose(got, want, atol=1e-4)
        return
    check_packing(family)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)

    # What training runs: attention per sample (vlmtune/attention.py) instead of the masked whole row.
    taken = []
    monkeypatch.setattr(attention, "segments", lambda mask: taken.append(real_segments(mask)) or taken[-1])
    assert use_segment_attention(model)
    with torch.no_grad():
        got = model(**model_inputs(packed), use_cache=False).logits[0]
        loss_packed = float(loss_sum(model, packed))
        again = model(**model_inputs(padded), use_cache=False).logits[padded["attention_mask"].bool()]
    lengths = [s.length for s in samples]
    assert [e - s for s, e in next(t for t in taken if t)] == lengths  # the samples, read off the mask
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    torch.testing.assert_close(again, want, atol=0, rtol=0)  # a padded batch still takes plain sdpa


def check_plan_counts(samples, pad, rope, filler) -> None:
    """The loop counts a step's supervised and pad tokens before collating it (Batcher.plan): the collated
    micro-batches (streamed, as training takes them; a filler row where one has no image) hold those counts."""
    for packed in (False, True):
        batcher = Batcher(pad, 2, None, packed, rope if packed else None, filler)
        plan = batcher.plan(samples)
        batches = list(batcher.stream(plan))
        masks = [b.tensors.get("attention_mask", b.tensors.get("decoder_attention_mask")) for b in batches]
        assert plan.padding == sum(0 if m is None else int((m == 0).sum()) for m in masks), packed
        assert plan.supervised == sum(int((b.tensors["labels"][:, 1:] != IGNORE).sum()) for b in batches), packed
        assert [b.indices for b in batches] == [[0, 1], [2]]
        assert plan.padding > 0 if not packed else plan.padding == 0


def text_sample(index: int, length: int) -> Encoded:
    ids = torch.arange(1, length + 1)
    labels = ids.masked_fill(ids <= length // 2, IGNORE)
    return Encoded(index, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                   ("input_ids", "attention_mask", "labels"))


def test_stream_collates_ahead_on_a_helper_thread_in_order():
    """Batcher.stream: the same micro-batches as collating them all at once, in order, collated on another
    thread at most `ahead` before the loop takes them; a collation error is raised in the loop."""
    import threading

    samples = [text_sample(i, 3 + i) for i in range(7)]
    batcher = Batcher(0, 2, None, False, None, None)
    want = batcher(samples)
    started, threads = [], set()

    def collate(rows):
        started.append(len(rows))
        threads.add(threading.current_thread().name)
        if rows[0].index == 4 and fail:
            raise ValueError("bad sample 4")
        return Batcher.collate(batcher, rows)

    batcher.collate = collate
    for ahead in (1, 2, 3):
        fail, started[:] = False, []
        got = []
        for i, b in enumerate(batcher.stream(batcher.plan(samples), ahead=ahead)):
            assert len(started) <= i + 1 + ahead
            got.append(b)
        assert [b.indices for b in got] == [b.indices for b in want] == [[0, 1], [2, 3], [4, 5], [6]]
        assert all(torch.equal(g.tensors[k], w.tensors[k]) for g, w in zip(got, want, strict=True) for k in w.tensors)
    assert {t.split("_")[0] for t in threads} == {"vlmtune-collate"}
    fail = True
    taken = []
    with pytest.raises(ValueError, match="bad sample 4"):
        for b in batcher.stream(batcher.plan(samples)):
            taken.append(b.indices)
    assert taken == [[0, 1], [2, 3]]


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_sum(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# Families that pack (the refusals are checked above) and whose text attention VARLEN serves: Llama 4's chunked
# layers keep segment_sdpa (tests/test_varlen.py checks the choice, the test above the result).
VARLEN_PACKING = [n for n in NAMES if n not in ("gemma3", "qwen3_5", "qwen3_5_moe", "llama4")]


@pytest.mark.parametrize("name", VARLEN_PACKING)
def test_varlen_packed_rows_equal_padded(name, tiny_model, monkeypatch):
    """train.attention=varlen (the default) with packing: the batcher's boundaries, one variable-length call per
    text layer with no mask built, and (Qwen, Kimi-VL) the swapped vision towers give the padded stock model's
    logits, loss and gradients."""
    from transformers import AttentionInterface

    spec = SPECS[name]
    path = str(tiny_model(name))
    model, processor, family = load_model(ModelConfig(name_or_path=path), CPU)
    encoder = SampleEncoder(processor, family, max_length=4096)
    samples = [encoder(c, i) for i, c in enumerate(conversations(spec))]
    pad = processor.tokenizer.pad_token_id
    pad = processor.tokenizer.eos_token_id if pad is None else pad
    cast = family.cast_to_model_dtype
    padded = to_device(micro_batch(samples, pad), CPU, torch.float32, cast)
    with torch.no_grad():
        want = model(**model_inputs(padded), use_cache=False).logits[padded["attention_mask"].bool()]
    want_grads = gradients(model, padded)

    model, _, _ = load_model(ModelConfig(name_or_path=path), CPU)  # the same weights, fresh
    assert setup_attention(model, "varlen", packed=True)["text"] == VARLEN
    packed = to_device(micro_batch(samples, pad, packed=True, rope=rope_index_module(model),
                                   extras=host_inputs(model)), CPU, torch.float32, cast)
    assert packed["cu_seq_lens_q"].tolist() == [0, *torch.tensor([s.length for s in samples]).cumsum(0).tolist()]
    calls = []
    real = AttentionInterface._global_mapping[VARLEN]
    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN, lambda module, q, k, v, mask, **kw: calls.append(
        (mask is None, kw.get("cu_seq_lens_q") is packed["cu_seq_lens_q"])) or real(module, q, k, v, mask, **kw))
    with torch.no_grad():
        got = model(**model_inputs(packed), use_cache=False).logits[0]
    layers = model.config.get_text_config().num_hidden_layers
    assert calls == [(True, True)] * layers  # no N x N mask, the batcher's boundaries, every layer
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_grads = gradients(model, packed)
    assert got_grads.keys() == want_grads.keys()
    for n, g in got_grads.items():
        # Absolute tolerance scaled by the tensor's largest gradient: the tiny Gemma 3n vision tower's reach 2e4, and
        # summing in another order alone (the padded path on 1 vs 2 threads) moves them by up to 1e-5 of that.
        scale = max(1.0, float(want_grads[n].abs().max()))
        torch.testing.assert_close(g, want_grads[n], atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("rows_per_check", [1024, 2])
def test_segments_only_from_an_exact_block_causal_mask(rows_per_check, monkeypatch):
    monkeypatch.setattr(attention, "ROWS_PER_CHECK", rows_per_check)
    sample = torch.tensor([0, 0, 0, 1, 1, 2])
    block = (sample[:, None] == sample[None, :]).tril()[None, None]
    assert real_segments(block) == [(0, 3), (3, 5), (5, 6)]
    assert real_segments(torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()) == [(0, 4)]
    padded = block.clone()
    padded[..., 4] = False  # a padding column
    window = block.clone()
    window[0, 0, 2, 0] = False  # a sliding window of 2
    for mask in (None, padded, window, block.repeat(2, 1, 1, 1), torch.ones(1, 1, 6, 6, dtype=torch.bool),
                 block.float()):
        assert real_segments(mask) is None


def test_packed_labels_never_cross_samples(encoder, cord_dir):
    from vlmtune.config import DataSource
    from vlmtune.encode import EncodedDataset

    ds = EncodedDataset.of(DataSource(source=str(cord_dir), format="cord_v2"), encoder, "data.train")
    samples = [ds[i] for i in range(3)]
    packed = micro_batch(samples, 151643, packed=True)
    starts = torch.tensor([0, *torch.tensor([s.length for s in samples]).cumsum(0)[:-1].tolist()])
    assert (packed["labels"][0, starts] == IGNORE).all()  # no sample's first token is a target of the one before
    assert (packed["position_ids"][0, starts] == 0).all()
    n_sup = sum(int((s.tensors["labels"][1:] != IGNORE).sum()) for s in samples)
    assert int((packed["labels"][0, 1:] != IGNORE).sum()) == n_sup


def test_group_by_token_budget():
    lengths = [300, 50, 200, 120, 80, 500, 40]
    for packed in (True, False):
        groups = group(lengths, size=2, budget=600, packed=packed)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            cost = sum(lengths[i] for i in g) if packed else max(lengths[i] for i in g) * len(g)
            assert cost <= 600 or len(g) == 1
    assert len(group(lengths, 2, 600, packed=True)) == 3  # 500+80 | 300+200+50+40 | 120
    assert group(lengths, 3, None, packed=False) == [[0, 1, 2], [3, 4, 5], [6]]


def test_equalize_splits_then_fills():
    assert sorted(map(len, equalize([[0, 1, 2, 3]], 3))) == [1, 1, 2]
    assert equalize([[0]], 3) == [[0], [], []]
    assert equalize([], 2) == [[], []]


def test_qwen3_5_packing_is_refused_with_a_clear_message():
    from vlmtune.families import family_for

    with pytest.raises(PackingError, match=r"Gated DeltaNet.*train\.packing=false"):
        check_packing(family_for("qwen3_5_moe"))


def losses(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_packing_and_token_budget_do_not_change_the_run(tiny_model_dir, cord_dir, tmp_path):
    """Same data, same steps: padded micro-batches of 2, packed micro-batches, and token-budget batches (packed
    and padded) give the same per-step losses; packing removes all padding."""
    runs = {"padded": {}, "packed": {"packing": True}, "budget_packed": {"packing": True, "micro_batch_tokens": 1500},
            "budget_padded": {"micro_batch_tokens": 1500}}
    results = {}
    for name, extra in runs.items():
        t = small_recipe(tiny_model_dir, cord_dir, tmp_path / name, max_steps=2, micro_batch_size=2,
                         global_batch_size=4, **extra)
        del t["data"]["validation"]
        finetune(build_recipe(t))
        results[name] = losses(tmp_path / name)
    base = [r["loss"] for r in results["padded"]]
    for name, rows in results.items():
        assert [r["loss"] for r in rows] == pytest.approx(base, abs=1e-5), name
    assert all(r["padding_fraction"] > 0 for r in results["padded"])
    assert all(r["padding_fraction"] == 0 for r in results["packed"] + results["budget_packed"])
    assert all(r["micro_batches"] == 2 for r in results["packed"])
