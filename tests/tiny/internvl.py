"""InternVL tiny model: OpenGVLab/InternVL3-2B-hf's configuration shrunk, with the real tokenizer and template.

The tokenizer is Qwen2's BPE vocabulary (vlmtune's own Qwen assets: the files are identical, not copied again)
with InternVL3's real added tokens and chat template (``tests/assets/internvl/tokenizer_config.json``, at the
real ids 151643-151674). The vision tower keeps its patch size (14 px) and sees 56 px tiles: 16 patches, 4 image
tokens per tile after the 0.5 pixel-shuffle downsampling. Images are tiled as the real processor does
(``crop_to_patches``, up to 12 tiles plus a thumbnail); video frames become images.
"""

from __future__ import annotations

from tiny.common import ASSETS, TinySpec
from tiny.llava import (
    PATCH,
    QWEN_TEXT,
    TILE,
    VISION,
    builder,
    deep_update,
    processor_from_files,
    qwen_vocab_files,
    read_json,
    shrink,
)


def internvl():
    """(model class, config, processor, generation config) of the tiny InternVL."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    src = ASSETS / "internvl"
    real = read_json(src / "config.json")
    image_seq_length = int((TILE // PATCH) ** 2 * real["downsample_ratio"] ** 2)
    config = InternVLConfig.from_dict(shrink(
        real, text_config=QWEN_TEXT, image_seq_length=image_seq_length,
        vision_config={**VISION, "image_size": [TILE, TILE], "patch_size": [PATCH, PATCH]}))
    size = {"size": {"height": TILE, "width": TILE}}
    files = {
        **qwen_vocab_files(), "tokenizer_config.json": src / "tokenizer_config.json",
        "processor_config.json": {**read_json(src / "processor_config.json"), "image_seq_length": image_seq_length},
        "preprocessor_config.json": deep_update(read_json(src / "preprocessor_config.json"), size),
        "video_preprocessor_config.json": deep_update(read_json(src / "video_preprocessor_config.json"), size),
    }
    processor = processor_from_files(config, files)
    generation = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
    return InternVLForConditionalGeneration, config, processor, generation


SPECS = [TinySpec("internvl", builder(internvl), "internvl", video=True)]
