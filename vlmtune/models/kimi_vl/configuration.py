"""Kimi-VL's configuration, with the field names of the official ``config.json`` (model type ``kimi_vl``).

The official file holds a ``vision_config`` of model type ``moonvit`` and a ``text_config`` of model type
``deepseek_v3``. The text config is transformers' own ``DeepseekV3Config``; the vision config is ours
(:class:`MoonViTConfig`), and also answers the attribute names transformers' ``kimi_k25`` vision tower reads,
which it is built on (see modeling.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Kimi-VL-A3B's text model, where the official config is silent and transformers' DeepSeek-V3 default differs:
# it has no multi-token-prediction layer (no such weights in the checkpoint).
TEXT_DEFAULTS = {"num_nextn_predict_layers": 0}
# MoonViT's fixed choices (the official vision config has no field for them): GELU with the tanh approximation,
# and a 2-D rotary embedding with base 10000 over (row, column) patch positions.
VISION_ACT = "gelu_pytorch_tanh"
VISION_ROPE = {"rope_type": "axial", "rope_theta": 10000.0}


@strict
class MoonViTConfig(PreTrainedConfig):
    """MoonViT, Kimi-VL's native-resolution vision tower (the official ``vision_config``, model type ``moonvit``).

    ``init_pos_emb_height`` x ``init_pos_emb_width``: the learned position table, resampled (bicubic) to each
    image's patch grid. ``merge_kernel_size``: the patch blocks the projector merges into one token.
    """

    model_type = "moonvit"
    base_config_key = "vision_config"

    patch_size: int = 14
    init_pos_emb_height: int = 64
    init_pos_emb_width: int = 64
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    merge_kernel_size: tuple[int, int] | list[int] = (2, 2)

    # What transformers' kimi_k25 vision tower reads, derived (never saved: not dataclass fields).
    @property
    def pos_emb_height(self) -> int:
        return self.init_pos_emb_height

    @property
    def pos_emb_width(self) -> int:
        return self.init_pos_emb_width

    @property
    def pos_emb_time(self) -> int:
        return 1  # images only: Kimi-VL has no temporal embedding (K2.5's is zero for single frames anyway)

    @property
    def hidden_act(self) -> str:
        return VISION_ACT

    @property
    def rope_parameters(self) -> dict:
        return dict(VISION_ROPE)

    @rope_parameters.setter
    def rope_parameters(self, value: dict | None) -> None:
        # transformers' rope standardisation assigns the current value back; anything else cannot be honoured.
        if value is not None and dict(value) != VISION_ROPE:
            raise ValueError(f"MoonViT's rotary embedding is fixed ({VISION_ROPE}); got rope_parameters={value}")


@strict
class KimiVLConfig(PreTrainedConfig):
    """Kimi-VL (``KimiVLForConditionalGeneration``): MoonViT + 2x2 patch-merging MLP projector + DeepSeek-V3 MoE.

    ``media_placeholder_token_id``: the ``<|media_pad|>`` token, one per merged image patch in the prompt.
    """

    model_type = "kimi_vl"
    sub_configs_defaults: ClassVar[dict] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="deepseek_v3"),
        "vision_config": MoonViTConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    ignore_index: int = -100
    media_placeholder_token_id: int = 163605
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            self.text_config = {**TEXT_DEFAULTS, **self.text_config}
        elif self.text_config is None:
            self.text_config = dict(TEXT_DEFAULTS)
        super().__post_init__(**kwargs)

    # The names transformers' kimi_k25 projector and vlmtune's generic code read.
    @property
    def image_token_id(self) -> int:
        return self.media_placeholder_token_id

    @property
    def projection_hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def projection_layer_norm_eps(self) -> float:
        return 1e-5

    def to_dict(self) -> dict[str, Any]:
        """The official layout: besides transformers 5's ``rope_parameters``, the text config keeps the
        ``rope_theta`` / ``rope_scaling`` fields that engines built on older transformers read (without them they
        would fall back to a default base of 10000)."""
        out = super().to_dict()
        text = out.get("text_config")
        rope = text.get("rope_parameters") if isinstance(text, dict) else None
        if isinstance(rope, dict) and rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
            text.setdefault("rope_theta", rope["rope_theta"])
            text.setdefault("rope_scaling", None)
        return out
