"""Variable-length attention (vlmtune/attention.py, vlmtune/vision.py): the kernel entry against a dense masked
reference, every swapped vision tower against transformers' stock one (outputs and gradients, precomputed inputs
really used), the host-side inputs, and what train.attention switches. Packed text rows per family:
tests/test_packing.py. The CUDA kernel path: bench/gpu_varlen.py on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vlmtune import vision
from vlmtune.attention import SEGMENT_SDPA, VARLEN, bucketed, host_inputs, packed_row_inputs, setup_attention
from vlmtune.config import ModelConfig
from vlmtune.model import load_model
from vlmtune.varlen import attend, varlen_kernel_usable
from vlmtune.vision import VISION_ATTENTIONS, VarlenVisionAttention, VisionInputs, qualname

CPU = torch.device("cpu")
VISION_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "kimi_vl"]


class Heads(torch.nn.Module):
    """The two attributes transformers' sdpa reads off an attention module."""

    def __init__(self, groups: int, causal: bool):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


def dense_reference(q, k, v, bounds, causal, window, scale):
    """One masked attention over all T tokens in float64: a token sees the tokens of its own segment (earlier ones
    only if causal, the last `window` only with a window)."""
    t = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())
    i = torch.arange(t)
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= i[None, :] <= i[:, None]
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    rep = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.double().transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
    out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize(("bounds", "causal", "window", "heads", "dv"), [
    ([0, 16, 32, 48], False, None, (4, 4), 8),  # equal windows, in order: one batched call, no gather
    ([0, 16, 20, 36, 45, 61], False, None, (4, 4), 8),  # three lengths, interleaved
    ([0, 7, 19, 20, 33], True, None, (4, 2), 8),  # causal text with GQA and a 1-token sample
    ([0, 30, 33, 50], True, 5, (2, 1), 8),  # sliding window shorter than some samples
    ([0, 9, 23], True, None, (2, 2), 4),  # MLA: value heads narrower than query / key heads
])
def test_attend_equals_a_dense_masked_reference(bounds, causal, window, heads, dv):
    torch.manual_seed(0)
    hq, hkv = heads
    t = bounds[-1]
    q = torch.randn(t, hq, 8, requires_grad=True)
    k = torch.randn(t, hkv, 8, requires_grad=True)
    v = torch.randn(t, hkv, dv, requires_grad=True)
    cu = torch.tensor(bounds, dtype=torch.int32)
    got = attend(q, k, v, cu, None, module=Heads(hq // hkv, causal), scale=0.3, causal=causal, window=window)
    want = dense_reference(q, k, v, bounds, causal, window, 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got.double() * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-5)


def test_the_cuda_kernel_is_only_taken_where_it_runs():
    q = torch.randn(4, 2, 8)
    assert not varlen_kernel_usable(q, q, q)  # CPU: the exact grouped path
    assert not varlen_kernel_usable(q.bfloat16(), q.bfloat16(), q.bfloat16())


def tower_and_inputs(model, name):
    """The model's vision tower, a call of it on three images (several window sizes, two frames in one), and the
    keywords the batcher would add for them."""
    tower = next(m for m in model.modules() if {c.__name__ for c in type(m).__mro__}
                 & set(vision.QWEN_TOWERS + vision.KIMI_TOWERS))
    cfg = tower.config
    if name == "kimi_vl":
        grid = torch.tensor([[6, 10], [4, 4], [14, 8]])
        pixels = torch.randn(int(grid.prod(-1).sum()), 3, cfg.patch_size, cfg.patch_size)
        return tower, lambda t, **kw: t(pixels, grid, **kw), {"image_grid_hws": grid}
    grid = torch.tensor([[1, 22, 30], [1, 8, 12], [2, 10, 14]])  # odd merged grids: Qwen2.5-VL edge windows
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2)
    return tower, lambda t, **kw: t(pixels, grid_thw=grid, **kw), {"image_grid_thw": grid}


def features(output) -> torch.Tensor:
    pooled = output.pooler_output
    return pooled if isinstance(pooled, torch.Tensor) else torch.cat(list(pooled))


@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_varlen_vision_tower_equals_stock(name, tiny_model, monkeypatch):
    """Same features and gradients as transformers' tower (sdpa window by window), with the segments, window order,
    positions and interpolation computed on the host and one attention call per block, each given its bound."""
    model, _, _ = load_model(ModelConfig(name_or_path=str(tiny_model(name))), CPU)
    tower, call, grids = tower_and_inputs(model, name)
    stock = copy.deepcopy(tower)
    names = [n for n, _ in tower.named_parameters()]
    swapped = vision.use_varlen_vision_attention(tower)
    assert swapped == len([m for m in stock.modules() if qualname(type(m)) in VISION_ATTENTIONS]) > 0
    assert [n for n, _ in tower.named_parameters()] == names  # checkpoints, PEFT targets, FSDP units unchanged
    inputs = {k.removeprefix("image_"): v for k, v in VisionInputs.of(tower)(grids).items()}
    calls = []
    real = vision.attend
    monkeypatch.setattr(vision, "attend", lambda *a, **kw: calls.append((a[3], a[4])) or real(*a, **kw))
    torch.manual_seed(1)
    got = features(call(tower, **inputs))
    want = features(call(stock))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert len(calls) == swapped
    expected = [inputs.get("cu_window_seqlens", inputs["cu_seqlens"]), inputs["cu_seqlens"]]
    for cu, longest in calls:
        assert any(cu is e for e in expected) and isinstance(longest, int)  # host-computed, nothing read back
    if name == "qwen2_5_vl":
        assert len({int(n) for n in inputs["cu_window_seqlens"].diff()}) > 2  # windows of several sizes
    weights = torch.randn_like(want)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for (n, p), q in zip(tower.named_parameters(), stock.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_packed_row_inputs_and_buckets():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    got = packed_row_inputs(positions)
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and got["cu_seq_lens_q"].dtype == torch.int32
    assert got["max_length_q"] == got["max_length_k"] == 4
    mrope = torch.cat([positions, positions.expand(3, -1) + 7])[:, None]  # Qwen: text row, then 3 mRoPE rows
    assert packed_row_inputs(mrope)["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    with pytest.raises(ValueError, match="one row"):
        packed_row_inputs(torch.zeros(2, 5, dtype=torch.long))
    assert [bucketed(n) for n in (1, 2, 3, 64, 65, 1000)] == [1, 2, 4, 64, 128, 1024]


def test_what_train_attention_switches(tiny_model):
    path = str(tiny_model("qwen2_5_vl"))
    model, _, _ = load_model(ModelConfig(name_or_path=path), CPU)
    assert setup_attention(model, "stock", packed=True) == {"vision_modules": 0, "text": SEGMENT_SDPA}
    assert host_inputs(model) is None
    model, _, _ = load_model(ModelConfig(name_or_path=path), CPU)
    assert setup_attention(model, "varlen", packed=False) == {"vision_modules": 2, "text": "stock"}
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    extras = host_inputs(model)
    assert extras.vision is not None and not extras.packed_text
    model, _, _ = load_model(ModelConfig(name_or_path=path), CPU)
    assert setup_attention(model, "varlen", packed=True) == {"vision_modules": 2, "text": VARLEN}
    assert model.config.vision_config._attn_implementation == "sdpa"  # the text model alone gets VARLEN
    assert all(isinstance(m, VarlenVisionAttention) for m in model.modules() if "VisionAttention" in type(m).__name__)
    # A chosen implementation is left alone
    model, _, _ = load_model(ModelConfig(name_or_path=path, attn_implementation="eager"), CPU)
    assert setup_attention(model, "varlen", packed=True) == {"vision_modules": 0, "text": "stock"}


def test_llama4_chunked_attention_keeps_segment_sdpa(tiny_model):
    model, _, _ = load_model(ModelConfig(name_or_path=str(tiny_model("llama4"))), CPU)
    assert setup_attention(model, "varlen", packed=True)["text"] == SEGMENT_SDPA
