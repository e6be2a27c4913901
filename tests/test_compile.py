"""Regional torch.compile (vlmtune/compile.py, ``train.compile``): the compiled layers give eager's loss and
gradients, and a run whose packed rows and images change length does not recompile after its first step.

The compiles here use the ``aot_eager`` backend: dynamo's capture, guards and recompilation and AOT autograd's
forward / backward graphs, exactly as with inductor, without generating kernels (inductor takes ~100 s per cold
compile of the tiny model on one CPU core; docs/benchmarks.md). Inductor runs on the GPU: bench/gpu_all.sh."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from vlmtune import compile as regional
from vlmtune.attention import host_inputs, setup_attention
from vlmtune.batching import micro_batch, rope_index_module
from vlmtune.config import ModelConfig, build_recipe
from vlmtune.encode import SampleEncoder
from vlmtune.errors import KernelError
from vlmtune.loss import loss_sum
from vlmtune.model import load_model
from vlmtune.train import to_device

CPU = torch.device("cpu")


def conversation(i: int) -> list[dict]:
    """Sample i: an image of its own size and a question and answer of their own length."""
    image = Image.new("RGB", (28 * (2 + i % 4), 28 * (2 + (3 * i) % 5)), (40 * i % 255, 90, 0))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q " * (1 + i)}]},
            {"role": "assistant", "content": [{"type": "text", "text": "answer " * (3 + 2 * i)}]}]


def unique_graphs() -> int:
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_layers_equal_eager_and_do_not_recompile(tiny_model):
    import torch._dynamo

    torch._dynamo.reset()
    model, processor, family = load_model(ModelConfig(name_or_path=str(tiny_model("qwen2_5_vl"))), CPU)
    setup_attention(model, "varlen", packed=True)
    eager = copy.deepcopy(model)
    regions = regional.compile_regions(model, backend="aot_eager")
    text, tower = model.config.text_config, model.config.vision_config
    assert regions == text.num_hidden_layers + tower.depth
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]
    encoder = SampleEncoder(processor, family, max_length=1024)
    extras, rope = host_inputs(model, bucket=True), rope_index_module(model)
    graphs, lengths = [], set()
    for step in range(4):
        samples = [encoder(conversation(2 * step + j), j) for j in range(2)]
        batch = to_device(micro_batch(samples, processor.tokenizer.pad_token_id, packed=True, rope=rope,
                                      extras=extras), CPU, torch.float32, family.cast_to_model_dtype)
        lengths.add((batch["input_ids"].shape[1], tuple(batch["image_grid_thw"].flatten().tolist())))
        losses = []
        for m in (model, eager):
            m.zero_grad(set_to_none=True)
            loss = loss_sum(m, batch)
            loss.backward()
            losses.append(float(loss.detach()))
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
        graphs.append(unique_graphs())
    assert len(lengths) == 4  # every step another row length and other image sizes
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 3  # compiled once, then reused


def test_a_model_without_regions_is_refused():
    with pytest.raises(KernelError, match=r"train\.compile=false"):
        regional.compile_regions(torch.nn.Linear(2, 2))


def test_train_compile_runs_through_the_loop(tiny_model_dir, cord_dir, tmp_path, monkeypatch):
    """train.compile=true compiles the loaded model's layers in setup (here with aot_eager) and trains."""
    from conftest import small_recipe
    from vlmtune.train import finetune

    compiled = []
    real = regional.compile_regions
    monkeypatch.setattr("vlmtune.train.compile_regions",
                        lambda model: compiled.append(real(model, backend="aot_eager")) or compiled[-1])
    tree = small_recipe(tiny_model_dir, cord_dir, tmp_path / "run", max_steps=1, packing=True, compile=True)
    del tree["data"]["validation"]
    assert build_recipe(tree).train.compile
    finetune(build_recipe(tree))
    assert compiled and compiled[0] > 0
    assert (tmp_path / "run" / "final").is_dir()
