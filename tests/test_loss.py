"""vlmtune.loss: the chunked, fused loss equals the plain one (value and every trainable gradient) on every family.

Each family's tiny model (tests/tiny/) is built and loaded once for this module. The loss value is checked on all
of them, the gradients (full fine-tune and LoRA) on a subset: Gemma 3 (tied head), Gemma 3n (final logit
soft-capping), Qwen2.5-VL, LLaVA and Llama 4.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import build, chat_specs

from vlmtune import loss as vloss
from vlmtune.batching import collate
from vlmtune.config import FreezeConfig, ModelConfig, PeftConfig
from vlmtune.encode import IGNORE, SampleEncoder
from vlmtune.families import Family
from vlmtune.loss import fusable_head, linear_cross_entropy, loss_sum, plain_loss_sum
from vlmtune.model import load_model
from vlmtune.peft import apply_lora
from vlmtune.train import to_device

SPECS = chat_specs()
NAMES = sorted(SPECS)
GRAD_FAMILIES = ["gemma3", "gemma3n", "llama4", "llava", "qwen2_5_vl"]
BIG = 1_000_000  # more tokens per chunk than any batch here has
LOSS_RTOL = 1e-5
GRAD_RTOL = 2e-5  # per tensor, of its largest entry; the chunk-by-chunk weight gradient sums in another order


@dataclass
class Case:
    path: Path
    model: torch.nn.Module
    family: Family
    padded: dict  # two rows of different lengths, both supervised
    partly: dict  # the same, second row without supervised tokens


def conversation(n_images: int, answers: list[str]) -> list[dict]:
    """A chat with `n_images` images in the first user turn and one user + assistant turn per answer."""
    images = [{"type": "image", "image": Image.new("RGB", (64, 48), c)} for c in ("red", "blue")[:n_images]]
    turns = []
    for i, answer in enumerate(answers):
        turns.append({"role": "user", "content": [*(images if i == 0 else []), {"type": "text", "text": "Colour?"}]})
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def batches(processor, family: Family, name: str) -> tuple[dict, dict]:
    spec = SPECS[name]
    encode = SampleEncoder(processor, family, max_length=4096)
    long = encode(conversation(1, ["A red square.", "Blue, 2 px wide."]), 0)
    short = encode(conversation(0 if spec.text_only else 1, ["Answer 1."]), 1)
    pad = processor.tokenizer.pad_token_id
    padded = collate([long, short], pad if pad is not None else processor.tokenizer.eos_token_id)
    padded = to_device(padded, torch.device("cpu"), torch.float32, family.cast_to_model_dtype)
    assert padded["input_ids"].shape[0] == 2 and (padded["attention_mask"] == 0).any(), "not a padded batch"
    partly = dict(padded, labels=padded["labels"].clone())
    partly["labels"][1] = IGNORE
    return padded, partly


@pytest.fixture(scope="module")
def case(request, tmp_path_factory):
    try:  # conftest's run-wide builder, where there is one: the folders other modules built already
        model_dir = request.getfixturevalue("tiny_model")
    except pytest.FixtureLookupError:
        model_dir = partial(build, root=tmp_path_factory.mktemp("tiny"))
    cache = {}

    def get(name: str) -> Case:
        if name not in cache:
            path = model_dir(name)
            model, processor, family = load_model(ModelConfig(name_or_path=str(path)), torch.device("cpu"))
            cache[name] = Case(path, model, family, *batches(processor, family, name))
        return cache[name]

    yield get
    cache.clear()


def supervised(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def odd_chunk(batch: dict) -> int:
    """A chunk size that leaves a shorter last chunk."""
    return next(c for c in (7, 11, 13) if supervised(batch) % c)


def run(model: torch.nn.Module, batch: dict, chunk: int | None, backward: bool = False):
    """The loss, and with `backward` the gradient of every trainable parameter (dropout masks seeded alike)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = loss_sum(model, batch, chunk) if chunk is not None else plain_loss_sum(model, batch)
    if not backward:
        return loss.detach(), None
    (loss * 0.37).backward()  # a grad_output other than 1 checks the scaling in backward
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_grads_close(got: dict, want: dict, every: bool = True, rtol: float = GRAD_RTOL,
                       atol_of_largest: float = 1e-6) -> None:
    """Same gradients; with `every`, each trainable parameter has one (the batches here carry an image)."""
    assert [n for n, g in got.items() if g is None] == [n for n, g in want.items() if g is None]
    assert not every or all(g is not None for g in want.values()), "a trainable parameter got no gradient"
    want = {n: g for n, g in want.items() if g is not None}
    scale = max(float(g.abs().max()) for g in want.values())
    for name, g in want.items():
        # Some gradients are zero in exact arithmetic (an attention key bias): judge those against the largest one.
        tol = rtol * float(g.abs().max()) + atol_of_largest * scale
        err = float((got[name] - g).abs().max())
        assert err <= tol, f"{name}: max |chunked - plain| = {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------------------------
# The fused cross-entropy on its own, against float64 autograd


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 6, BIG])
def test_linear_cross_entropy_matches_autograd(softcap, bias, chunk):
    torch.manual_seed(0)
    hidden, weight = torch.randn(23, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    b = torch.randn(50, dtype=torch.float64) if bias else None
    targets = torch.randint(0, 50, (23,))
    leaves = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    logits = hidden @ weight.T + (b if bias else 0)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits, targets, reduction="sum")
    got = linear_cross_entropy(hidden, weight, b, targets, chunk, softcap)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got * 0.5, leaves), torch.autograd.grad(want * 0.5, leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_frozen_weight_and_no_grad():
    """Gradient work only for what needs it: none under no_grad, none for a frozen weight."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(9, 4, requires_grad=True), torch.randn(30, 4), torch.randint(0, 30, (9,))
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, None, targets, 4)
    assert value.grad_fn is None
    loss = linear_cross_entropy(hidden, weight, None, targets, 4)
    torch.testing.assert_close(loss.detach(), value)
    loss.backward()
    ref = hidden.detach().clone().requires_grad_()
    F.cross_entropy(ref @ weight.T, targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, ref.grad)
    assert weight.grad is None


def test_linear_cross_entropy_under_cpu_autocast():
    """bf16 autocast: matmuls in bf16 as the head's own would be, softmax in fp32; close to the plain head."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, None, targets, 16, dtype=vloss.compute_dtype(weight))
        want = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    g_got, g_want = torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(want, [hidden, weight])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for g, w in zip(g_got, g_want, strict=True):
        assert g.dtype == torch.float32 and float((g - w).abs().max()) <= 2e-2 * float(w.abs().max())


# ---------------------------------------------------------------------------------------------------------
# Every family: same loss, fused path taken, the head computes one position per row


def head_inputs(model: torch.nn.Module) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    shapes: list = []
    handle = fusable_head(model).register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    return shapes, handle


@pytest.mark.parametrize("name", NAMES)
def test_loss_value_every_family(name, case):
    c = case(name)
    head = fusable_head(c.model)
    assert isinstance(head, torch.nn.Linear), f"{name}: the output head is not a plain nn.Linear"
    for batch in (c.padded, c.partly):
        want, _ = run(c.model, batch, None)
        for chunk in ((1, odd_chunk(batch), BIG) if batch is c.padded else (odd_chunk(batch),)):
            shapes, handle = head_inputs(c.model)
            try:
                got, _ = run(c.model, batch, chunk)
            finally:
                handle.remove()
            torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=0, msg=f"{name}, chunk_tokens={chunk}")
            # The fused path ran (the probe agreed with the model's logits) and the model's own logits were tiny.
            assert vloss._CHECKED.get(head) is True
            assert shapes == [(batch["input_ids"].shape[0], 1, head.out_features)]
        with torch.no_grad():  # validation
            torch.testing.assert_close(loss_sum(c.model, batch, 5), want, rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("name", GRAD_FAMILIES)
def test_gradients_full_fine_tune(name, case):
    """Every chunk size on the padded batch; the head weight (tied to the embeddings in Gemma) trains too."""
    c = case(name)
    want_loss, want = run(c.model, c.padded, None, backward=True)
    for chunk in (1, odd_chunk(c.padded), BIG):
        got_loss, got = run(c.model, c.padded, chunk, backward=True)
        torch.testing.assert_close(got_loss, want_loss, rtol=LOSS_RTOL, atol=0)
        assert_grads_close(got, want)


@pytest.mark.parametrize("name", GRAD_FAMILIES)
def test_gradients_lora(name, case):
    """Adapters everywhere (language model, vision tower, projector), head frozen; both batches."""
    c = case(name)
    pcfg = PeftConfig(method="lora", dropout=0.0, vision=True, projector=True)
    model, _ = apply_lora(copy.deepcopy(c.model), c.family, pcfg, FreezeConfig(), str(c.path))
    with torch.no_grad():  # peft starts lora_B at zero: make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    assert fusable_head(model) is not None, "the head should stay a plain nn.Linear under LoRA"
    for batch, chunk in ((c.padded, odd_chunk(c.padded)), (c.partly, 1)):
        want_loss, want = run(model, batch, None, backward=True)
        got_loss, got = run(model, batch, chunk, backward=True)
        torch.testing.assert_close(got_loss, want_loss, rtol=LOSS_RTOL, atol=0)
        assert_grads_close(got, want)


# ---------------------------------------------------------------------------------------------------------
# Fallbacks and batch shapes


def test_softcap_the_model_does_not_apply_falls_back(case):
    """Gemma 3's VLM class ignores final_logit_softcapping (transformers 5.24): the probe sees that, and the loss
    takes the plain path (same value and gradients) from then on."""
    c = case("gemma3")
    model = copy.deepcopy(c.model)
    model.config.text_config.final_logit_softcapping = 30.0
    want_loss, want = run(model, c.padded, None, backward=True)
    got_loss, got = run(model, c.padded, 7, backward=True)
    assert vloss._CHECKED[fusable_head(model)] is False
    torch.testing.assert_close(got_loss, want_loss, rtol=LOSS_RTOL, atol=0)
    assert_grads_close(got, want)


def test_bf16_autocast(case):
    """As the loop runs on CUDA (fp32 weights, bf16 autocast), here on CPU: the probe passes within bf16 rounding,
    and loss and gradients match the plain path's bf16 head."""
    c = case("qwen2_5_vl")
    model = copy.deepcopy(c.model)  # a head the probe has not seen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = run(model, c.padded, None, backward=True)
        got_loss, got = run(model, c.padded, 7, backward=True)
    assert vloss._CHECKED[fusable_head(model)] is True
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=0)
    # bf16: a one-ulp difference in a head-input gradient element carries through the model (about 1% seen)
    assert_grads_close(got, want, rtol=5e-2, atol_of_largest=1e-3)


def test_lora_on_the_head_falls_back(case):
    """A LoRA-wrapped head is not a plain nn.Linear: the plain path, same loss."""
    import peft

    c = case("llava")
    model = peft.get_peft_model(copy.deepcopy(c.model), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    assert fusable_head(model) is None
    want, _ = run(model, c.padded, None)
    torch.testing.assert_close(run(model, c.padded, 7)[0], want, rtol=LOSS_RTOL, atol=0)


def test_packed_row(case):
    """One row of two samples with restarting position_ids and no attention_mask: passed through as is."""
    c = case("llava")
    n = int(c.padded["attention_mask"][1].sum())  # the text-only row, twice
    ids, labels = c.padded["input_ids"][1, :n].repeat(2)[None], c.padded["labels"][1, :n].repeat(2)[None]
    packed = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(n).repeat(2)[None]}
    assert (labels[0, n:] != IGNORE).any() and labels[0, n] == IGNORE  # both samples supervised, each from its own
    want, grads = run(c.model, packed, None, backward=True)
    for chunk in (1, 9):
        got_loss, got = run(c.model, packed, chunk, backward=True)
        torch.testing.assert_close(got_loss, want, rtol=LOSS_RTOL, atol=0)
        assert_grads_close(got, grads, every=False)  # text only: no vision gradients


def test_no_supervised_tokens(case):
    c = case("llava")
    batch = dict(c.padded, labels=torch.full_like(c.padded["labels"], IGNORE))
    loss = loss_sum(c.model, batch, 7)
    assert float(loss.detach()) == 0.0
    loss.backward()
    c.model.zero_grad(set_to_none=True)


def test_bad_chunk_size(case):
    with pytest.raises(ValueError, match="chunk_tokens"):
        loss_sum(case("llava").model, case("llava").padded, 0)
