"""SmolVLM (SmolVLM2, ``smolvlm``) and Idefics3 (SmolVLM v1, ``idefics3``) tiny models.

The config, processor settings and chat template are the real SmolVLM2-256M-Video-Instruct files
(tests/assets/smolvlm2, see SOURCE.md there). Its SmolLM2 tokenizer (GPT-2 style byte-level BPE) is not
available offline, so :func:`smol_tokenizer` builds a tiny one of the real class that carries all 145 real added
tokens (specials, ``<image>``, ``<fake_token_around_image>``, ``<global-img>``, the 36 ``<row_i_col_j>`` tile
tokens, reserved tokens, ``<end_of_utterance>``) in the real order; token ids are compact, not the real ones.

SmolVLM v1 checkpoints (SmolVLM-256M/500M/2B-Instruct) are ``idefics3`` models with the same tokenizer, the same
chat template and, for the 256M one, the same sizes; the idefics3 tiny model is built from the same files with
the Idefics3 classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny.common import ASSETS, TinySpec
from tiny.common import deep_update as _deep_update

SMOLVLM2 = ASSETS / "smolvlm2"
CORPUS = [
    "What do you see? A red square. And the border? Blue, 2 px wide.",
    "Colour? Answer 0. Answer 1. Answer 2. Describe the image in detail.",
    "You are provided the following series of four frames from a 0:00:03 [H:MM:SS] video.",
    "User: Frame from 00:00: Assistant: The quick brown fox jumps over the lazy dog.",
]
# Sub-images of 64 px (real: 512), patches of 8 (real: 16): 8 x 8 patches, pixel-shuffled by the real scale
# factor 4 -> 2 x 2 = 4 tokens per sub-image (real: 64). Images are resized to a longest edge of 128 (real: 1024,
# twice the sub-image size as in the real files) and split into up to 2 x 2 tiles plus the global image.
TILE_PX, PATCH = 64, 8


def smol_tokenizer(bpe_size: int = 400):
    """A tiny ``GPT2Tokenizer`` (byte-level BPE, no prefix space) with SmolVLM2's added tokens and chat template.

    The real vocabulary is [17 added tokens] + 49,135 BPE pieces + [128 added tokens]; the tiny one is the same
    with the byte alphabet and a few hundred pieces learned from a small corpus in the middle.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    cfg = json.loads((SMOLVLM2 / "tokenizer_config.json").read_text())
    added = sorted(((int(k), v) for k, v in cfg["added_tokens_decoder"].items()), key=lambda kv: kv[0])
    n_head = next((i for i, (real_id, _) in enumerate(added) if real_id != i), len(added))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=bpe_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    learned = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    pieces = [v["content"] for _, v in added[:n_head]] + sorted(learned["vocab"], key=learned["vocab"].get)
    for piece in pieces + [v["content"] for _, v in added[n_head:]]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=cfg["unk_token"], bos_token=cfg["bos_token"],
                        eos_token=cfg["eos_token"], pad_token=cfg["pad_token"],
                        add_prefix_space=cfg["add_prefix_space"], extra_special_tokens=cfg["extra_special_tokens"],
                        model_max_length=cfg["model_max_length"], truncation_side=cfg["truncation_side"])
    tok.add_tokens([AddedToken(v["content"], special=v["special"], normalized=v["normalized"], lstrip=v["lstrip"],
                               rstrip=v["rstrip"], single_word=v["single_word"]) for _, v in added])
    assert len(tok) == len(vocab), "an added token was not in the vocabulary"
    return tok


def _tiny_config(tok) -> dict:
    """The real config.json with the model shrunk and every token id looked up in the tiny tokenizer."""
    real = json.loads((SMOLVLM2 / "config.json").read_text())
    image, pad = tok.convert_tokens_to_ids(["<image>", "<|im_end|>"])
    text = {k: v for k, v in real["text_config"].items()
            if k not in ("architectures", "perceiver_config", "_name_or_path", "torch_dtype", "transformers.js_config",
                         "_flash_attn_2_enabled")}  # remote-code leftovers the llama config has no use for
    cfg = _deep_update({**real, "text_config": text}, {
        "image_token_id": image, "pad_token_id": pad, "vocab_size": len(tok),
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": len(tok), "pad_token_id": pad,
                        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "image_size": TILE_PX, "patch_size": PATCH, "max_image_size": {"longest_edge": TILE_PX},
                          "size": {"longest_edge": 2 * TILE_PX}},
    })
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "transformers.js_config"):
        cfg.pop(key, None)
    return cfg


def _image_kwargs() -> dict:
    return {"size": {"longest_edge": 2 * TILE_PX}, "max_image_size": {"longest_edge": TILE_PX}}


def _image_seq_len(cfg: dict) -> int:
    return (TILE_PX // PATCH) ** 2 // cfg["scale_factor"] ** 2


def _generation_config(tok):
    from transformers import GenerationConfig

    # the real SmolVLM2 generation config (bos 0 = <|endoftext|>, eos 49279 = <end_of_utterance>, pad 2 = <|im_end|>)
    return GenerationConfig(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)


def build_smolvlm(out: Path, seed: int = 0) -> Path:
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    out = Path(out)
    tok = smol_tokenizer()
    cfg = _tiny_config(tok)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(SmolVLMConfig(**cfg))
    model.generation_config = _generation_config(tok)

    image_processor = SmolVLMImageProcessor.from_pretrained(SMOLVLM2, **_image_kwargs())
    real = json.loads((SMOLVLM2 / "preprocessor_config.json").read_text())
    sampling = {**real["video_sampling"], "video_size": {"longest_edge": TILE_PX}}
    video_processor = SmolVLMVideoProcessor.from_pretrained(SMOLVLM2, video_sampling=sampling,
                                                            size={"longest_edge": TILE_PX},
                                                            max_image_size={"longest_edge": TILE_PX})
    chat_template = json.loads((SMOLVLM2 / "chat_template.json").read_text())["chat_template"]
    processor = SmolVLMProcessor(image_processor, tok, video_processor, image_seq_len=_image_seq_len(cfg),
                                 chat_template=chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_idefics3(out: Path, seed: int = 0) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    out = Path(out)
    tok = smol_tokenizer()
    cfg = _tiny_config(tok)
    cfg["vision_config"] = {k: v for k, v in cfg["vision_config"].items()
                            if k not in ("model_type", "max_image_size", "size", "use_base_siglip")}
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(Idefics3Config(**cfg))
    model.generation_config = _generation_config(tok)

    image_processor = Idefics3ImageProcessor.from_pretrained(SMOLVLM2, **_image_kwargs())
    chat_template = json.loads((SMOLVLM2 / "chat_template.json").read_text())["chat_template"]
    processor = Idefics3Processor(image_processor, tok, image_seq_len=_image_seq_len(cfg), chat_template=chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


SPECS = [TinySpec("smolvlm", build_smolvlm, "smolvlm", video=True), TinySpec("idefics3", build_idefics3, "idefics3")]
