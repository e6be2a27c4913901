"""Llama 4 tiny model: Llama4ForConditionalGeneration shrunk from Llama-4-Scout-17B-16E-Instruct.

Real files (tests/assets/llama4/, see SOURCE.md): the chat template, the image-processor and processor settings,
and the named special tokens. The real tokenizer (202,048 tokens, Llama licence) is not shipped: a tiny byte-level
BPE stands in, with the real pre-tokenizer split (GPT-4o / o200k), the real named special tokens (at low ids, in
the real order), and the real BOS post-processing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tiny.common import ASSETS, TinySpec

LLAMA4 = ASSETS / "llama4"
# Llama 4's pre-tokenizer split (o200k / GPT-4o), as transformers' gguf mapping has it for "llama4".
O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "What do you see? A red square. And the border? Blue, 2 px wide.",
    "Colour? Answer 0. Answer 1. Answer 2. The image shows a green circle on a white background.",
    "You are a helpful assistant. Describe the picture in one sentence.\n\nThe receipt lists three items.",
    "Total: 12.50 EUR, paid by card on 2024-05-01.\nThank you for your visit!",
]


def bpe_tokenizer(specials: list[str], split: str, bos: str | None = None, corpus: tuple[str, ...] = (),
                  vocab_size: int = 1000, **special_roles: str):
    """A tiny byte-level BPE (any text encodes) whose first ids are `specials`, in order, never split.

    `split` is the real tokenizer's pre-tokenizer regex, so markers tokenize the same way in and out of context.
    `bos`: the post-processor prepends it, as the real tokenizer does (``add_bos_token``). `corpus`: more training
    text (e.g. the chat template, so its default system prompt takes few tokens, as with the real tokenizer).
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*CORPUS, *corpus], trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, **special_roles)


def tokenizer():
    specials = list(json.loads((LLAMA4 / "special_tokens.json").read_text()))  # real order (ids 200000...)
    # Roles as in the real tokenizer_config.json; the chat template is the real one (chat_template.jinja).
    return bpe_tokenizer(specials, O200K_SPLIT, bos="<|begin_of_text|>",
                         corpus=((LLAMA4 / "chat_template.jinja").read_text(),), eos_token="<|eot|>",
                         pad_token="<|finetune_right_pad|>")


# Tiles of 28 px (real: 336) with 14 px patches and pixel-shuffle 0.5: 1 token per tile; at most 4 tiles (real: 16).
TILE, PATCH = 28, 14


def build_llama4(out: Path) -> Path:
    from transformers import (
        GenerationConfig,
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4ImageProcessor,
        Llama4Processor,
    )

    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|eot|>", "<|end_of_text|>",
                                                      "<|finetune_right_pad|>", "<|image_start|>",
                                                      "<|image_end|>", "<|patch|>")}
    # Llama-4-Scout's shapes (transformers' Llama4Config defaults) shrunk in width and depth; every layer MoE
    # (interleave_moe_layer_step=1), top-1 routing, every 4th layer without RoPE, chunked attention, QK norm.
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                num_experts_per_tok=1, interleave_moe_layer_step=1,
                bos_token_id=ids["<|begin_of_text|>"], eos_token_id=[ids["<|end_of_text|>"], ids["<|eot|>"]],
                pad_token_id=ids["<|finetune_right_pad|>"])
    # intermediate_size = hidden_size / pixel_shuffle_ratio**2, as in the real vision config (1408 -> 5632).
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TILE, patch_size=PATCH, pixel_shuffle_ratio=0.5, vision_output_dim=64,
                  projector_input_dim=64, projector_output_dim=64)
    config = Llama4Config(text_config=text, vision_config=vision, boi_token_index=ids["<|image_start|>"],
                          eoi_token_index=ids["<|image_end|>"], image_token_index=ids["<|patch|>"])
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=ids["<|begin_of_text|>"],
                                               eos_token_id=[ids["<|end_of_text|>"], ids["<|eot|>"]],
                                               pad_token_id=ids["<|finetune_right_pad|>"])
    real_image = json.loads((LLAMA4 / "preprocessor_config.json").read_text())
    real_proc = json.loads((LLAMA4 / "processor_config.json").read_text())
    image_processor = Llama4ImageProcessor(
        **{k: real_image[k] for k in ("image_mean", "image_std", "resample", "rescale_factor",
                                      "resize_to_max_canvas", "do_convert_rgb", "do_normalize", "do_rescale")},
        size={"height": TILE, "width": TILE}, max_patches=4)
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tok, patch_size=real_proc["patch_size"],
                                image_token=real_proc["image_token"], fake_image_token=real_proc["fake_image_token"],
                                chat_template=(LLAMA4 / "chat_template.jinja").read_text())
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


SPECS = [TinySpec("llama4", build_llama4, "llama4")]
