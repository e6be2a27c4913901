"""The embedded default: a tiny random Qwen2.5-VL with the real Qwen processor, on synthetic receipts.

Both inputs are written to disk first and then loaded through the same paths real users take
(``AutoModelForImageTextToText.from_pretrained`` on a folder, ``datasets.load_dataset`` on a folder).
The processor, tokenizer and chat template are the Apache-2.0 Qwen2-VL files in ``assets/qwen2-vl``
(see the LICENSE there); the Qwen2-VL and Qwen2.5-VL processors share them.
"""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets" / "qwen2-vl"
# At most 224 x 224 pixels -> 16 x 16 patches of 14 px -> 64 tokens after the 2 x 2 merge.
DEMO_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 224 * 224}


def tiny_qwen2_5_vl_config(**text_overrides):
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    text.update(text_overrides)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1])
    # Token ids are the real Qwen ones (see assets/qwen2-vl/added_tokens.json).
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)


def build_tiny_qwen2_5_vl(out: Path, seed: int = 0, **text_overrides) -> Path:
    """Write a randomly initialised tiny Qwen2.5-VL and the real Qwen processor to `out` (skip if there)."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from vlmtune.config import ModelConfig
    from vlmtune.model import load_processor

    out = Path(out)
    if (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(**text_overrides))
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643, max_new_tokens=64)
    processor = load_processor(ModelConfig(name_or_path=str(ASSETS), processor_kwargs=DEMO_PIXELS))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def default_recipe(workdir: Path) -> dict:
    """Build the demo inputs under `workdir` and return the recipe tree that trains on them."""
    from vlmtune.data.synthetic import write_synthetic_cord

    workdir = Path(workdir)
    model_dir = build_tiny_qwen2_5_vl(workdir / "demo-inputs" / "tiny-qwen2.5-vl")
    data_dir = write_synthetic_cord(workdir / "demo-inputs" / "cord-v2-synthetic")
    return {
        "output_dir": str(workdir),
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train": {"source": str(data_dir), "format": "cord_v2", "split": "train"},
            "validation": {"source": str(data_dir), "format": "cord_v2", "split": "validation"},
        },
        "train": {"max_steps": 30, "micro_batch_size": 2, "global_batch_size": 4, "lr": 2e-3, "warmup_steps": 3,
                  "schedule": "cosine", "min_lr_ratio": 0.1, "val_every_steps": 10, "max_length": 512,
                  "seed": 0, "log_every_steps": 5},
        # Receipts generated and scored (cord_ted, cord_f1, exact_match) every 15 steps and after the last.
        "eval": {"every_steps": 15, "max_samples": 8, "max_new_tokens": 48, "batch_size": 8},
    }
