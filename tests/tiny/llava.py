"""LLaVA family tiny models: LLaVA 1.5, LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision.

Each one is its family's config.json (``tests/assets/llava-*/``) shrunk in width and depth, with the real
processor settings except the image size, the real chat template and a real tokenizer at the real token ids:

- LLaVA 1.5: llava-hf/llava-1.5-7b-hf's own files (Llama 2 SentencePiece tokenizer.json).
- LLaVA-NeXT-Video: the files of a LLaVA-NeXT-Video-7B-32K fine-tune (Mistral-7B-Instruct-v0.2 tokenizer).
- LLaVA-NeXT: llava-v1.6-mistral-7b-hf has the same towers and base tokenizer as NeXT-Video-32K; its files are
  reconstructed (see SOURCE.md) and its tokenizer is NeXT-Video's with LLaVA-NeXT's two added tokens.
- LLaVA-OneVision: reconstructed from transformers' conversion script; Qwen2's vocabulary from vlmtune's own
  Qwen assets (identical files, not copied again) plus the two added tokens ``<image>`` and ``<video>``.

Vision towers keep their real patch size (14 px) and see 56 px tiles, i.e. 4 x 4 patches per tile; LLaVA-NeXT's
and OneVision's any-resolution grids (``image_grid_pinpoints``) are scaled by the same factor.
"""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import torch

from tiny.common import ASSETS, TinySpec

TILE = 56  # tiny image tile (the real towers see 336 px, OneVision 384 px); patch size stays 14
PATCH = 14
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": TILE}
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
# Qwen2's 151k-token vocabulary: a narrower text model keeps the embeddings at about 5M parameters.
QWEN_TEXT = {**TEXT, "hidden_size": 32, "intermediate_size": 64, "num_key_value_heads": 2}
# Keys of a saved config that describe the saved checkpoint, not the architecture.
_SAVED_ONLY = ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "quantization_config")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def deep_update(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def shrink(real: dict, **over) -> dict:
    """The real config with `over` merged in (nested dicts merge), minus the saved-checkpoint-only keys."""
    cfg = deep_update(real, over)
    for d in (cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}):
        for key in _SAVED_ONLY:
            d.pop(key, None)
    return cfg


def scale_pinpoints(pinpoints: list, real_tile: int) -> list:
    return [[h * TILE // real_tile, w * TILE // real_tile] for h, w in pinpoints]


def processor_from_files(config, files: dict[str, object]):
    """Load the processor with ``AutoProcessor`` from a folder holding `files` beside the model's config.json.

    `files` maps a file name to a Path (copied; ``*.gz`` is decompressed to the name without ``.gz``), a dict
    (written as JSON) or bytes. The config.json matters: with it, transformers resolves the tokenizer through
    the model type, as for the real hub repo, and keeps tokenizer.json as it is; without it, a
    ``LlamaTokenizer`` rebuilds the SentencePiece pre-tokenization and tokenizes differently from the real repo
    (transformers 5.24.0).
    """
    from transformers import AutoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config.save_pretrained(folder)
        for name, content in files.items():
            if isinstance(content, dict):
                (folder / name).write_text(json.dumps(content))
            elif isinstance(content, bytes):
                (folder / name).write_bytes(content)
            elif str(content).endswith(".gz"):
                (folder / name).write_bytes(gzip.decompress(Path(content).read_bytes()))
            else:
                shutil.copyfile(content, folder / name)
        return AutoProcessor.from_pretrained(folder)


PROBE = "<s>[INST] <image>\nWhat do you see? [/INST] A red square.</s> USER: Blue, 2 px wide.</s> ASSISTANT:"


def save(model_cls, config, processor, generation: dict | None, out: Path, seed: int = 0) -> Path:
    """Write a randomly initialised model and `processor` to `out`; check that the saved processor tokenizes as
    the one it was built from."""
    from transformers import AutoTokenizer, GenerationConfig

    torch.manual_seed(seed)
    model = model_cls(config)
    if generation:
        model.generation_config = GenerationConfig.from_dict(
            {k: v for k, v in generation.items() if not k.startswith("_") and k != "transformers_version"})
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # transformers 5.24.0: LlamaTokenizer does not save its `legacy` flag, and reloads with legacy=False, which
    # changes the SentencePiece prefix spaces (after special tokens). Keep the flag, so the tiny folder loads
    # like the real repo it stands for.
    legacy = getattr(processor.tokenizer, "legacy", None)
    saved = read_json(out / "tokenizer_config.json")
    if legacy is not None and "legacy" not in saved:
        (out / "tokenizer_config.json").write_text(json.dumps({**saved, "legacy": legacy}, indent=2))
    reloaded = AutoTokenizer.from_pretrained(out)
    if reloaded(PROBE).input_ids != processor.tokenizer(PROBE).input_ids:
        raise RuntimeError(f"{out}: the saved tokenizer tokenizes differently from the one it was saved from")
    return out


def with_added_tokens(tokenizer_json_gz: Path, added: dict[int, str]) -> bytes:
    """A tokenizer.json whose added tokens at the given ids carry other contents (same base vocabulary)."""
    data = json.loads(gzip.decompress(tokenizer_json_gz.read_bytes()))
    for token in data["added_tokens"]:
        token["content"] = added.get(token["id"], token["content"])
    return json.dumps(data, ensure_ascii=False).encode()


# -- LLaVA 1.5 ------------------------------------------------------------------------------------------------

def llava():
    """(model class, config, processor, generation config) of the tiny LLaVA 1.5."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    src = ASSETS / "llava-1.5"
    real = read_json(src / "config.json")
    config = LlavaConfig.from_dict(shrink(
        real, text_config={**TEXT, "num_key_value_heads": TEXT["num_attention_heads"]},  # Llama 2 7B: no GQA
        vision_config={**VISION, "projection_dim": 32}, image_seq_length=(TILE // PATCH) ** 2))
    pre = deep_update(read_json(src / "preprocessor_config.json"),
                      {"size": {"shortest_edge": TILE}, "crop_size": {"height": TILE, "width": TILE}})
    files = {name: src / name for name in ("added_tokens.json", "chat_template.json", "processor_config.json",
                                           "special_tokens_map.json", "tokenizer_config.json")}
    processor = processor_from_files(config, {**files, "preprocessor_config.json": pre,
                                              "tokenizer.json": src / "tokenizer.json.gz"})
    return LlavaForConditionalGeneration, config, processor, read_json(src / "generation_config.json")


# -- LLaVA-NeXT and LLaVA-NeXT-Video (Mistral-7B-Instruct-v0.2 text model, CLIP ViT-L/14-336 tower) ----------

MISTRAL_TEXT = {**TEXT, "num_key_value_heads": 1}  # Mistral 7B: 32 query heads per 8 KV heads


def _next_image_processor(src: Path, name: str = "preprocessor_config.json") -> dict:
    real = read_json(src / name)
    return deep_update(real, {"size": {"shortest_edge": TILE}, "crop_size": {"height": TILE, "width": TILE},
                              "image_grid_pinpoints": scale_pinpoints(real["image_grid_pinpoints"], 336)})


def llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    src = ASSETS / "llava-next"
    real = read_json(src / "config.json")
    pre = _next_image_processor(src)
    config = LlavaNextConfig.from_dict(shrink(
        real, text_config=MISTRAL_TEXT, vision_config={**VISION, "projection_dim": 32},
        image_grid_pinpoints=pre["image_grid_pinpoints"], image_seq_length=(TILE // PATCH) ** 2))
    tokenizer_json = with_added_tokens(ASSETS / "llava-next-video" / "tokenizer.json.gz",
                                       {32000: "<image>", 32001: "<pad>"})
    files = {name: src / name for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json")}
    processor = processor_from_files(config, {**files, "preprocessor_config.json": pre,
                                              "tokenizer.json": tokenizer_json})
    generation = read_json(ASSETS / "llava-next-video" / "generation_config.json")
    return LlavaNextForConditionalGeneration, config, processor, generation


def llava_next_video():
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    src = ASSETS / "llava-next-video"
    real = read_json(src / "config.json")
    pre = _next_image_processor(src)
    video = _next_image_processor(src, "video_preprocessor_config.json")
    config = LlavaNextVideoConfig.from_dict(shrink(
        real, text_config=MISTRAL_TEXT, vision_config={**VISION, "projection_dim": 32},
        image_grid_pinpoints=pre["image_grid_pinpoints"], image_seq_length=(TILE // PATCH) ** 2,
        video_seq_length=(TILE // PATCH // real["spatial_pool_stride"]) ** 2,
        spatial_pool_out_channels=VISION["hidden_size"]))
    files = {name: src / name for name in ("chat_template.json", "processor_config.json", "special_tokens_map.json",
                                           "tokenizer_config.json", "tokenizer.json.gz")}
    files["tokenizer.json"] = files.pop("tokenizer.json.gz")
    processor = processor_from_files(config, {**files, "preprocessor_config.json": pre,
                                              "video_preprocessor_config.json": video})
    return LlavaNextVideoForConditionalGeneration, config, processor, read_json(src / "generation_config.json")


# -- LLaVA-OneVision (Qwen2 text model, SigLIP tower) -------------------------------------------------------

def qwen_vocab_files() -> dict[str, Path]:
    """Qwen2's BPE vocabulary, shipped once in the package (vlmtune/assets/qwen2-vl) and shared by every
    Qwen2-based family (the files are identical; only the added tokens differ, in each tokenizer_config.json)."""
    from vlmtune.demo import ASSETS as QWEN_ASSETS

    return {"vocab.json": QWEN_ASSETS / "vocab.json", "merges.txt": QWEN_ASSETS / "merges.txt"}


def llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    src = ASSETS / "llava-onevision"
    real = read_json(src / "config.json")
    size = {"height": TILE, "width": TILE}
    pre = deep_update(read_json(src / "preprocessor_config.json"), {"size": size})
    pre["image_grid_pinpoints"] = scale_pinpoints(pre["image_grid_pinpoints"], 384)
    video = deep_update(read_json(src / "video_preprocessor_config.json"), {"size": size})
    proc_cfg = {**read_json(src / "processor_config.json"), "num_image_tokens": (TILE // PATCH) ** 2}
    config = LlavaOnevisionConfig.from_dict(shrink(
        real, text_config=QWEN_TEXT, vision_config=VISION,
        image_grid_pinpoints=pre["image_grid_pinpoints"]))
    files = {name: src / name for name in ("chat_template.json", "tokenizer_config.json")}
    processor = processor_from_files(config, {**files, **qwen_vocab_files(), "processor_config.json": proc_cfg,
                                              "preprocessor_config.json": pre,
                                              "video_preprocessor_config.json": video})
    generation = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
    return LlavaOnevisionForConditionalGeneration, config, processor, generation


def builder(make):
    """A TinySpec build function: `make` gives (model class, config, processor, generation config)."""
    return lambda out: save(*make(), out=out)


SPECS = [
    TinySpec("llava", builder(llava), "llava"),
    TinySpec("llava_next", builder(llava_next), "llava_next"),
    TinySpec("llava_next_video", builder(llava_next_video), "llava_next_video", video=True),
    TinySpec("llava_onevision", builder(llava_onevision), "llava_onevision", video=True),
]
