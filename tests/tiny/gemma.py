"""Gemma 3 and Gemma 3n tiny models: the real configs shrunk, the real processors and chat templates.

No Gemma tokenizer can be had offline (tokenizer.model is 4.7 MB, gated, and no PyPI package ships one), so
:func:`gemma_tokenizer` builds a tiny one of the real class (``GemmaTokenizer``: BPE with byte fallback, spaces
as ``▁``, no prefix space) that carries every functional added token of the real tokenizer (specials, turn
markers, newline/space/tab runs, HTML tags, image and audio tokens) in the real order, plus a few hundred BPE
pieces learned from a small corpus. Token ids are therefore compact, not the real ones: every id in the
config is looked up in the tiny tokenizer.

Gemma 3n's vision tower is a timm MobileNetV5 (``mobilenetv5_300m_enc``, 294M parameters whatever the config's
sizes say). ``vision_config.model_args`` (passed to ``timm.create_model``) cuts its widths to 8 channels, so the tiny
model keeps the real architecture, at its real depth. Its audio tower is shrunk like the rest; vlmtune never feeds it
(see the gemma3n row in vlmtune/families.py).

transformers initialises a few matrices to zero that a trained checkpoint has non-zero (Gemma 3's image projection,
Gemma 3n's AltUp output scales); with them zero, whole parts get an all-zero gradient in the first step, which the
training loop's gradient check rejects. The builders give them small random values, as a checkpoint would have.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from tiny.common import ASSETS, TinySpec
from tiny.common import deep_update as _deep_update

# A few sentences, so that the words the tests use become whole BPE pieces (anything else falls back to bytes).
CORPUS = [
    "What do you see? A red square. And the border? Blue, 2 px wide.",
    "Colour? Answer 0. Answer 1. Answer 2. Describe the image in detail.",
    "The quick brown fox jumps over the lazy dog. You are a helpful assistant.",
    "user model system assistant image picture photo receipt total price",
]
IMAGE_PX = 64  # tiny image size (the real processors use 896 and 768)


def gemma_tokenizer(asset_dir: Path, bpe_size: int = 300):
    """A tiny ``GemmaTokenizer`` with the real added tokens (in real id order) and the real chat template.

    The real vocabulary is [added tokens 0..n) + SentencePiece pieces + [more added tokens]; the tiny one is
    [the leading run of added tokens] + 256 byte-fallback pieces + learned BPE pieces + [the other added
    tokens]. ``tokenizer_config.json`` is the real file minus its ``<unusedN>`` placeholders (see SOURCE.md).
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    cfg = json.loads((asset_dir / "tokenizer_config.json").read_text())
    added = sorted(((int(k), v) for k, v in cfg["added_tokens_decoder"].items()), key=lambda kv: kv[0])
    n_head = next((i for i, (real_id, _) in enumerate(added) if real_id != i), len(added))

    bpe = Tokenizer(models.BPE(unk_token=cfg["unk_token"], byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")  # merges stay in words
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {"▁"})
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=bpe_size, initial_alphabet=alphabet,
                                                        show_progress=False))
    learned = json.loads(bpe.to_str())["model"]

    vocab: dict[str, int] = {}
    pieces = [v["content"] for _, v in added[:n_head]] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += sorted(learned["vocab"], key=learned["vocab"].get) + [v["content"] for _, v in added[n_head:]]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    named = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(k)}
    tok = GemmaTokenizer(vocab=vocab, merges=merges, **named, add_bos_token=cfg.get("add_bos_token", True),
                         add_eos_token=cfg.get("add_eos_token", False),
                         extra_special_tokens=cfg.get("extra_special_tokens", {}),
                         padding_side=cfg.get("padding_side", "left"),
                         model_max_length=cfg.get("model_max_length", 32768))
    tok.add_tokens([AddedToken(v["content"], special=v["special"], normalized=v["normalized"], lstrip=v["lstrip"],
                               rstrip=v["rstrip"], single_word=v["single_word"]) for _, v in added])
    assert len(tok) == len(vocab), "an added token was not in the vocabulary"
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in ids or "<unk>" in tokens, tokens
    return ids


def _generation_config(asset_dir: Path, tok):
    from transformers import GenerationConfig

    real = json.loads((asset_dir / "generation_config.json").read_text())
    eos = real["eos_token_id"] if isinstance(real["eos_token_id"], list) else [real["eos_token_id"]]
    # real ids 1 and 106 are <eos> and <end_of_turn>, 2 is <bos>, 0 is <pad>
    by_real_id = {0: tok.pad_token_id, 1: tok.convert_tokens_to_ids("<eos>"), 2: tok.bos_token_id,
                  106: tok.convert_tokens_to_ids("<end_of_turn>")}
    keep = {k: v for k, v in real.items() if k in ("cache_implementation", "do_sample", "top_k", "top_p")}
    return GenerationConfig(bos_token_id=by_real_id[real["bos_token_id"]], eos_token_id=[by_real_id[i] for i in eos],
                            pad_token_id=by_real_id[real["pad_token_id"]], **keep)


# --- Gemma 3 ------------------------------------------------------------------------------------------------

GEMMA3 = ASSETS / "gemma3"
GEMMA3_TOKENS_PER_IMAGE = 16  # 64 px / patch 8 = 8 x 8 patches, pooled 2 x 2 -> 4 x 4 (real: 896/14=64 -> 16x16)


def build_gemma3(out: Path, seed: int = 0) -> Path:
    from transformers import AutoImageProcessor, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    out = Path(out)
    tok = gemma_tokenizer(GEMMA3)
    boi, eoi, image, eos, end_of_turn = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                                             "<eos>", "<end_of_turn>")
    real = json.loads((GEMMA3 / "config.json").read_text())
    cfg = _deep_update(real, {
        "boi_token_index": boi, "eoi_token_index": eoi, "image_token_index": image, "eos_token_id": [eos, end_of_turn],
        "mm_tokens_per_image": GEMMA3_TOKENS_PER_IMAGE,
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "vocab_size": len(tok),
                        "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"],
                        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": eos},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "image_size": IMAGE_PX, "patch_size": 8},
    })
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype"):
        cfg.pop(key)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(Gemma3Config(**cfg))
    # transformers initialises the projector's matrix to zeros (a trained checkpoint has it non-zero): with it zero,
    # no gradient reaches the vision tower and the projector's norm, as the training loop's gradient check notices.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=cfg["initializer_range"])
    model.generation_config = _generation_config(GEMMA3, tok)

    image_processor = AutoImageProcessor.from_pretrained(GEMMA3, size={"height": IMAGE_PX, "width": IMAGE_PX})
    chat_template = json.loads((GEMMA3 / "chat_template.json").read_text())["chat_template"]
    processor = Gemma3Processor(image_processor, tok, chat_template=chat_template,
                                image_seq_length=GEMMA3_TOKENS_PER_IMAGE)
    assert processor.image_seq_length == model.config.mm_tokens_per_image  # else the image features do not fit
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# --- Gemma 3n -----------------------------------------------------------------------------------------------

GEMMA3N = ASSETS / "gemma3n"
# timm's mobilenetv5_300m_enc at its real depth (84 blocks: edge residuals, universal inverted residuals, multi-query
# attention, the multi-scale fusion adapter) with every width cut to 1/160: 8 channels (timm's floor) everywhere.
# 64 px -> stage 2 ends at 4 x 4, which the fusion adapter pools 2 x 2 (real: 768 px -> 48 x 48 pooled to 16 x 16).
# Depth could only shrink through model_args["block_args"], which cannot work in transformers 5.24.0: TimmWrapperModel
# passes config.model_args to timm.create_model by reference and timm's EfficientNetBuilder edits the nested block
# dicts in place (pops "block_type", adds classes), so the loaded model's config can no longer be saved.
GEMMA3N_TOKENS_SIDE = 2
MOBILENETV5_TINY_ARGS = {"channel_multiplier": 1 / 160, "stem_size": 8, "msfa_output_resolution": GEMMA3N_TOKENS_SIDE}


def build_gemma3n(out: Path, seed: int = 0) -> Path:
    from transformers import (
        AutoImageProcessor,
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
    )

    out = Path(out)
    tok = gemma_tokenizer(GEMMA3N)
    real = json.loads((GEMMA3N / "config.json").read_text())
    names = {"boi_token_id": "<start_of_image>", "eoi_token_id": "<end_of_image>",
             "image_token_id": "<image_soft_token>", "boa_token_id": "<start_of_audio>",
             "eoa_token_id": "<end_of_audio>", "audio_token_id": "<audio_soft_token>",
             "bos_token_id": "<bos>", "eos_token_id": "<end_of_turn>", "pad_token_id": "<pad>"}
    ids = dict(zip(names, _ids(tok, *names.values()), strict=True))
    # The real layout: text ids, then a vision block starting at <end_of_image> (vision_config.vocab_offset), then an
    # audio block starting at <end_of_audio>; ids at or past an offset are embedded by embed_vision / embed_audio.
    assert real["vision_config"]["vocab_offset"] == real["eoi_token_id"]
    assert real["audio_config"]["vocab_offset"] == real["eoa_token_id"]
    vision_offset, audio_offset, vocab = ids["eoi_token_id"], ids["eoa_token_id"], len(tok)
    layers = 4
    cfg = _deep_update(real, {
        **ids, "vision_soft_tokens_per_image": GEMMA3N_TOKENS_SIDE**2,
        "text_config": {"hidden_size": 64, "hidden_size_per_layer_input": 16, "intermediate_size": [128] * layers,
                        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
                        "num_kv_shared_layers": 2, "activation_sparsity_pattern": [0.95] + [0.0] * (layers - 1),
                        "laurel_rank": 8, "sliding_window": 32, "vocab_size": vocab,
                        "vocab_size_per_layer_input": vision_offset},
        # the fusion adapter's width is fixed at 2048 in timm (MobileNetV5Encoder.num_features), so hidden_size stays
        "vision_config": {"model_args": MOBILENETV5_TINY_ARGS, "vocab_offset": vision_offset,
                          "vocab_size": audio_offset - vision_offset},
        "audio_config": {"hidden_size": 32, "conf_num_attention_heads": 2, "conf_num_hidden_layers": 1,
                         "sscp_conv_channel_size": [8, 8], "vocab_offset": audio_offset,
                         "vocab_size": vocab - audio_offset},
    })
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "unsloth_fixed"):
        cfg.pop(key, None)
    for sub in ("text_config", "vision_config", "audio_config"):
        cfg[sub].pop("torch_dtype", None)
    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration(Gemma3nConfig(**cfg))
    # transformers initialises each layer's AltUp output scale to zeros (trained checkpoints have it non-zero): with it
    # zero, the per-layer-input path of every layer gets an all-zero gradient in the first step.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.altup.correct_output_scale.normal_(std=cfg["initializer_range"])
    model.generation_config = _generation_config(GEMMA3N, tok)

    image_processor = AutoImageProcessor.from_pretrained(GEMMA3N, size={"height": IMAGE_PX, "width": IMAGE_PX})
    feature_extractor = Gemma3nAudioFeatureExtractor.from_pretrained(GEMMA3N)
    real_proc = json.loads((GEMMA3N / "processor_config.json").read_text())
    processor = Gemma3nProcessor(feature_extractor, image_processor, tok,
                                 chat_template=(GEMMA3N / "chat_template.jinja").read_text(),
                                 audio_seq_length=real_proc["audio_seq_length"],
                                 image_seq_length=GEMMA3N_TOKENS_SIDE**2)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


SPECS = [TinySpec("gemma3", build_gemma3, "gemma3"), TinySpec("gemma3n", build_gemma3n, "gemma3n")]
