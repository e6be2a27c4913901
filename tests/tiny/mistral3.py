"""Mistral3ForConditionalGeneration tiny models: Mistral-Small-3.x (Mistral text model) and Mistral-Small-4
(Mistral4 text model: MLA attention + MoE), both with the Pixtral vision tower and ``PixtralProcessor``.

Real files (tests/assets/mistral3/, tests/assets/mistral_small_4/, see SOURCE.md there): the chat templates of
Mistral-Small-3.2-24B-Instruct-2506 and Ministral-3-14B-Reasoning-2512. The real tokenizer (tekken, 131,072 tokens)
is not shipped: a tiny byte-level BPE stands in, with tekken's pre-tokenizer split and its control tokens at their
real ids (0-19 from mistral-common's Tekkenizer, so [IMG] = 10 = Mistral3Config.image_token_index).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny.common import ASSETS, TinySpec
from tiny.llama4 import bpe_tokenizer

# tekken's pre-tokenizer split (the "pattern" of mistral-common's tekken_240911.json).
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Control tokens at their tekken ids: 0-19 as mistral-common 1.13.1 lists them (Tekkenizer.DEPRECATED_SPECIAL_TOKENS);
# 20-31 are tekken's <SPECIAL_n> fillers; [ARGS] [CALL_ID] [THINK] [/THINK] at 32-35 as in the newer tekken files.
SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
    *[f"<SPECIAL_{i}>" for i in range(20, 32)],
    "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]",
]
# Mistral-Small-3.1's processor: 14 px patches merged 2 x 2, so images are cut into 28 px cells (one [IMG] each,
# [IMG_BREAK] after each row, [IMG_END] last). Real longest edge 1540 px; here 56 px: at most 2 x 2 image tokens.
PATCH, MERGE, LONGEST_EDGE = 14, 2, 56


def tokenizer(chat_template: str):
    return bpe_tokenizer(SPECIALS, TEKKEN_SPLIT, bos="<s>", corpus=(chat_template,), eos_token="</s>",
                         unk_token="<unk>", pad_token="<pad>")


def _build(out: Path, text_config: dict, chat_template: Path) -> Path:
    from transformers import (
        GenerationConfig,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    tok = tokenizer(chat_template.read_text())
    bos, eos, pad = (tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>"))
    # Pixtral vision tower of Mistral3Config's defaults (Mistral-Small-3.1) shrunk; image_size bounds the RoPE grid.
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, patch_size=PATCH, image_size=LONGEST_EDGE, hidden_act="gelu")
    text = dict(vocab_size=len(tok), bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
                **text_config)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=MERGE, tie_word_embeddings=False,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    image_processor = PixtralImageProcessor(patch_size={"height": PATCH, "width": PATCH},
                                            size={"longest_edge": LONGEST_EDGE})
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                 spatial_merge_size=MERGE, chat_template=chat_template.read_text())
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_mistral3(out: Path) -> Path:
    """Mistral-Small-3.x: Mistral text model (Mistral3Config's defaults: GQA 32/8 heads, head_dim 128) shrunk."""
    text = dict(model_type="mistral", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=None)
    return _build(out, text, ASSETS / "mistral3" / "chat_template.jinja")


def build_mistral_small_4(out: Path) -> Path:
    """Mistral-Small-4: Mistral4 text model (Mistral4Config's defaults: MLA with q/kv LoRA ranks, decoupled RoPE
    head, 128 routed experts top-4 + 1 shared, every layer MoE) shrunk."""
    text = dict(model_type="mistral4", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
                qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_shared_experts=1,
                num_experts_per_tok=2, first_k_dense_replace=0)
    return _build(out, text, ASSETS / "mistral_small_4" / "chat_template.jinja")


SPECS = [
    TinySpec("mistral3", build_mistral3, "mistral3"),
    TinySpec("mistral_small_4", build_mistral_small_4, "mistral3"),
]
