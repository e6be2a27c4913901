"""What the Gemma 3 / 3n and SmolVLM / Idefics3 rows rely on, beyond the family matrix (tests/test_families.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import cached_load_processor
from vlmtune.batching import collate
from vlmtune.config import ModelConfig
from vlmtune.encode import SampleEncoder
from vlmtune.families import family_for
from vlmtune.views import trained_runs


@pytest.fixture(scope="module")
def root(tiny_model):
    """`root(name)`: the tiny model's folder (tests/conftest.py builds each once per run)."""
    return tiny_model


def encoder(name, root):
    processor = cached_load_processor(ModelConfig(name_or_path=str(root(name))))
    return SampleEncoder(processor, family_for(name), max_length=4096), processor


def chat(images=(), question="What do you see?", answer="A red square.", system=None):
    user = [*({"type": "image", "image": Image.new("RGB", size, c)} for c, size in images),
            {"type": "text", "text": question}]
    return [*([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []),
            {"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


RED, BLUE = ("red", (64, 48)), ("blue", (48, 64))


def trained(processor, sample) -> list[str]:
    ids, labels = sample.tensors["input_ids"].tolist(), sample.tensors["labels"].tolist()
    return [processor.tokenizer.decode(t) for t, on in trained_runs(ids, labels) if on]


@pytest.mark.parametrize("name", ["gemma3", "gemma3n"])
def test_gemma_template_bos_is_not_doubled(name, root):
    """The template writes <bos> itself; the tokenizer adds one too unless told not to (as transformers does)."""
    enc, processor = encoder(name, root)
    ids = enc(chat([RED]), 0).tensors["input_ids"].tolist()
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("name", ["gemma3", "gemma3n"])
def test_gemma_system_text_goes_into_the_first_user_turn_untrained(name, root):
    enc, processor = encoder(name, root)
    sample = enc(chat([RED], system="Answer in five words."), 0)
    text = processor.tokenizer.decode(sample.tensors["input_ids"])
    assert "<start_of_turn>user\nAnswer in five words.\n\n" in text and "system" not in text
    assert trained(processor, sample) == ["A red square.<end_of_turn>"]


@pytest.mark.parametrize("name", ["gemma3", "gemma3n"])
def test_gemma_template_trims_answers_and_the_sample_still_trains(name, root):
    """Gemma's template trims message text: an answer with a trailing newline must not be rejected as a mismatch."""
    enc, processor = encoder(name, root)
    assert trained(processor, enc(chat([RED], answer="A red square.\n"), 0)) == ["A red square.<end_of_turn>"]


@pytest.mark.parametrize("name", ["smolvlm", "idefics3", "gemma3", "gemma3n"])
def test_mixed_batch_gives_each_sample_its_own_logits(name, root):
    """1-image, 2-image and text-only samples in one batch: each row's logits are those of the sample alone.
    SmolVLM / Idefics3 return (1, images, C, H, W) per sample; the collate pads the image axis with all-zero images."""
    enc, processor = encoder(name, root)
    family = family_for(name)
    model = AutoModelForImageTextToText.from_pretrained(root(name),
                                                        attn_implementation=family.attn_implementation).eval()
    samples = [enc(chat([RED]), 0), enc(chat([RED, BLUE], "Two?", "Blue, 2 px wide."), 1),
               enc(chat((), "Text only?", "Answer 2."), 2)]
    pad = processor.tokenizer.pad_token_id

    def logits(items):
        batch = collate(items, pad)
        return model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}).logits

    with torch.no_grad():
        together = logits(samples)
        for row, sample in enumerate(samples):
            torch.testing.assert_close(together[row, : sample.length], logits([sample])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gemma3", "gemma3n"])
def test_gemma_sdpa_default_matches_eager(name, root):
    """The rows default Gemma to sdpa: same logits and gradients as eager on a padded batch with image blocks
    (bidirectional attention) and a sliding window (32 tokens in the tiny configs) shorter than the longest row."""
    assert family_for(name).attn_implementation == "sdpa"
    enc, processor = encoder(name, root)
    long = " ".join(["What do you see?"] * 8)
    batch = collate([enc(chat([RED]), 0), enc(chat([RED, BLUE], long, "Blue, 2 px wide."), 1),
                     enc(chat((), "Text only?", "Answer 2."), 2)], processor.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    assert inputs["input_ids"].shape[1] > 32
    results = {}
    for attn in ("eager", "sdpa"):
        model = AutoModelForImageTextToText.from_pretrained(root(name), attn_implementation=attn)
        out = model(**inputs)
        out.loss.backward()
        results[attn] = out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(results["sdpa"][0][keep], results["eager"][0][keep], atol=1e-5, rtol=1e-4)
    assert results["sdpa"][1].keys() == results["eager"][1].keys()
    for n, grad in results["eager"][1].items():
        torch.testing.assert_close(results["sdpa"][1][n], grad, atol=1e-6, rtol=1e-3, msg=n)


def test_gemma3n_vision_tower_depth_cannot_shrink_through_timm_block_args():
    """Why tests/tiny/gemma.py keeps MobileNetV5's full depth (84 blocks, 8 channels wide) instead of passing fewer
    blocks as ``vision_config.model_args["block_args"]``: in transformers 5.24.0 TimmWrapperModel hands
    ``config.model_args`` to timm by reference and timm's EfficientNetBuilder edits the block dicts in place, so the
    config is no longer serialisable (save_pretrained fails). When this test fails, upstream copies model_args:
    shrink the tiny Gemma 3n's vision tower in depth too."""
    from timm.models._efficientnet_builder import decode_arch_def
    from transformers import TimmWrapperConfig, TimmWrapperModel

    blocks = decode_arch_def([["er_r1_k3_s2_e4_c8"], ["uir_r1_a3_k5_s2_e2_c8"], ["uir_r1_a5_k5_s2_e2_c8"],
                              ["uir_r1_a5_k5_s2_e2_c8", "mqa_r1_k3_h2_s1_d8_c8", "uir_r1_a0_k0_s1_e2_c8"]])
    config = TimmWrapperConfig(architecture="mobilenetv5_300m_enc", model_args={"block_args": blocks, "stem_size": 8},
                               do_pooling=False)
    TimmWrapperModel(config)
    with pytest.raises(TypeError, match="not JSON serializable"):
        json.dumps(config.to_dict())
