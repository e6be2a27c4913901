"""Kimi-VL tiny model: vlmtune's native ``kimi_vl`` (vlmtune/models/kimi_vl) shrunk from Kimi-VL-A3B-Instruct.

No file of the official repository could be copied (tests/assets/kimi-vl/SOURCE.md): the config, the processor
settings, the tokenizer's special tokens and the chat template there are reconstructed from documented facts, in
the official file formats. The tokenizer is built the way an official checkpoint's is loaded: a tiktoken
vocabulary file (``tiktoken.model``) plus ``tokenizer_config.json``, no tokenizer.json, read by vlmtune's
KimiVLTokenizer. Its 163,584 ranks are a small byte-level BPE trained with Kimi's pre-tokenizer split (a few
hundred tokens) followed by filler tokens no UTF-8 text contains, so the 256 special tokens sit at their real ids
(163584..163839) in the real 163,840-entry vocabulary.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from tiny.common import ASSETS, TinySpec, deep_update
from tiny.llama4 import CORPUS

KIMI_VL = ASSETS / "kimi-vl"
NUM_RANKS = 163_584  # the real tiktoken vocabulary's size: special tokens start here
FILLER_LEAD = 0xF8  # never a byte of UTF-8 text: filler tokens cannot match any input

# Official dimensions -> tiny (ids, vocabulary, routing and rope settings stay the official ones).
TEXT = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=4096)  # layer 0 dense
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
              init_pos_emb_height=8, init_pos_emb_width=8)  # head_dim 16 (2-D rope needs a multiple of 4)
# Generation stops at the end of an assistant turn; [EOS] too (inferred, see SOURCE.md).
EOS_IDS = [163586, 163585]


def tiny_config() -> dict:
    real = json.loads((KIMI_VL / "config.json").read_text())
    return deep_update(real, {"text_config": TEXT, "vision_config": VISION})


@functools.cache
def tiktoken_ranks() -> dict[bytes, int]:
    """163,584 ranks: byte-level BPE on a small corpus (Kimi's split), then unreachable fillers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from vlmtune.models.kimi_vl.tokenization import PAT_STR

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    corpus = [*CORPUS, (KIMI_VL / "chat_template.jinja").read_text(), "你好，世界。图像中有一个红色的正方形。"]
    # 400: the three samples of tests/test_packing.py come out with three different lengths, as that test needs
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    trained = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    ranks = {bytes(byte_of[c] for c in token): i for i, (token, _) in enumerate(trained)}
    for i in range(len(ranks), NUM_RANKS):
        ranks[bytes([FILLER_LEAD]) + i.to_bytes(3, "big")] = i
    return ranks


def stage_official_files(folder: Path, config) -> None:
    """The files of an official checkpoint's processor, as a download has them: no tokenizer.json."""
    from vlmtune.models.kimi_vl.tokenization import write_tiktoken_ranks

    write_tiktoken_ranks(folder / "tiktoken.model", tiktoken_ranks())
    for name in ("tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        shutil.copyfile(KIMI_VL / name, folder / name)
    config.save_pretrained(folder)


def build_kimi_vl(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    from vlmtune.models import register_native_models

    register_native_models()
    d = tiny_config()
    config = AutoConfig.for_model(**d)
    with tempfile.TemporaryDirectory() as tmp:
        stage_official_files(Path(tmp), config)
        processor = AutoProcessor.from_pretrained(tmp)  # the path a real download takes
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)  # the real config says bf16
    with torch.no_grad():  # transformers starts the correction bias at zero; a trained router's is not
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.1)
    model.generation_config = GenerationConfig(bos_token_id=163584, eos_token_id=EOS_IDS, pad_token_id=163839)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


SPECS = [TinySpec("kimi_vl", build_kimi_vl, "kimi_vl")]
