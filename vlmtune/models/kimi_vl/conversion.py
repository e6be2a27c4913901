"""The official checkpoint's weight names <-> this implementation's, through transformers' conversion mapping
(its extension point for checkpoint layouts: applied on load, reversed on save, so saved folders have the
official names again).

Only the vision tower and the projector need it here: the text model is transformers' ``DeepseekV3ForCausalLM``,
whose own mapping (per-expert ``mlp.experts.N.{gate,up,down}_proj`` <-> fused ``gate_up_proj`` / ``down_proj``)
transformers applies to it as a sub-model.
"""

from __future__ import annotations

from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import (
    Chunk,
    GroupWeightRename,
    PermuteForRope,
    WeightConverter,
    WeightRenaming,
)

MODEL_TYPE = "kimi_vl"
VISION_MODEL_TYPE = "moonvit"
BLOCK = r"encoder.blocks.(\d+)"  # a MoonViT layer in the checkpoint (under vision_tower.)
SAME_BLOCK = r"encoder.blocks.\1"


def vision_conversions() -> list:
    """MoonViT's checkpoint names -> transformers' kimi_k25 tower, registered for the tower's model type so that
    transformers scopes them to ``vision_tower.`` (the language model has a ``self_attn.q_proj`` too).

    In the style of transformers' own kimi_k25 mapping: renames within the checkpoint's block names first (norm0 /
    norm1 and fc0 / fc1 become norm1 / norm2 and fc1 / fc2, as groups so that no rename feeds another), then the
    block prefix, then the fused q|k|v split, so the chain reverses cleanly on save. The q and k rows also go from
    MoonViT's complex rotary pairs (2j, 2j+1) to K2.5's half-split layout."""
    return [
        GroupWeightRename(source_patterns=[f"{BLOCK}.norm0", f"{BLOCK}.norm1"],
                          target_patterns=[f"{SAME_BLOCK}.norm1", f"{SAME_BLOCK}.norm2"]),
        GroupWeightRename(source_patterns=[f"{BLOCK}.mlp.fc0", f"{BLOCK}.mlp.fc1"],
                          target_patterns=[f"{SAME_BLOCK}.mlp.fc1", f"{SAME_BLOCK}.mlp.fc2"]),
        WeightRenaming(f"{BLOCK}.wo", f"{SAME_BLOCK}.attn.proj"),
        WeightRenaming("encoder.blocks", "layers"),
        WeightRenaming("encoder.final_layernorm", "final_layernorm"),
        WeightRenaming("patch_embed.pos_emb.weight", "patch_embed.pos_emb.position_embeddings"),
        WeightConverter(source_patterns=["wqkv"], target_patterns=["attn.q_proj", "attn.k_proj", "attn.v_proj"],
                        operations=[Chunk(dim=0), PermuteForRope(subconfig_key="vision_config",
                                                                 permute_layer_names=["q_proj", "k_proj"])]),
    ]


def model_conversions() -> list:
    """Kimi-VL's projector names -> transformers' kimi_k25 projector (the rest of the model keeps its names)."""
    return [
        WeightRenaming("multi_modal_projector.linear_1", "multi_modal_projector.in_proj"),
        WeightRenaming("multi_modal_projector.linear_2", "multi_modal_projector.out_proj"),
    ]


def register_conversions() -> None:
    """Register the mappings for model types ``kimi_vl`` and ``moonvit`` (once; transformers keeps them for the
    process and applies them only to these classes)."""
    for model_type, conversions in ((MODEL_TYPE, model_conversions), (VISION_MODEL_TYPE, vision_conversions)):
        if get_checkpoint_conversion_mapping(model_type) is None:
            register_checkpoint_conversion_mapping(model_type, conversions())
