"""Nemotron-Parse configuration, read and written in the layout of the official checkpoint's config.json.

The official ``config.json`` (nvidia/NVIDIA-Nemotron-Parse-v1.1) nests two dicts:

- ``decoder``: an mBART-style decoder config (model type ``nemotron_parse_text``): :class:`NemotronParseTextConfig`,
  transformers' ``MBartConfig`` under that model type, so transformers' ``MBartDecoderLayer`` reads it as is.
- ``encoder``: the config of NVIDIA's remote-code C-RADIO model (``nvidia/C-RADIOv2-H``: model type ``""``, the
  RADIO training ``args`` and an ``auto_map``). It is kept verbatim (a dict), so a saved config keeps that layout,
  and :func:`radio_config` derives the equivalent transformers ``RadioConfig`` from it.
"""


import copy
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.mbart.configuration_mbart import MBartConfig
from transformers.models.radio.configuration_radio import RadioConfig

from vlmtune.errors import VlmtuneError

# timm ViT names used as RADIO backbones -> (hidden size, layers, heads), from timm's model definitions.
# C-RADIOv2-H, Nemotron-Parse's encoder, is "vit_huge_patch16_224".
RADIO_BACKBONES = {"vit_huge_patch16_224": (1280, 32, 16)}
# Keys of the encoder dict that, when present, override what the backbone name implies (tiny test models use them).
ENCODER_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


class NemotronParseConfigError(VlmtuneError, ValueError):
    pass


@strict
class NemotronParseTextConfig(MBartConfig):
    r"""The decoder: mBART decoder layers (pre-norm, self- and cross-attention), no position embeddings."""

    model_type = "nemotron_parse_text"


@strict
class NemotronParseConfig(PreTrainedConfig):
    r"""
    encoder (`dict`, *optional*):
        The C-RADIO encoder's config as the official checkpoint stores it (NVIDIA's remote-code ``RADIOConfig``:
        ``args``, ``patch_size``, ``max_resolution``, ...). Kept verbatim; see [`radio_config`].
    decoder (`dict` or `NemotronParseTextConfig`, *optional*):
        The mBART-style decoder.
    image_size (`list[int]`, *optional*, defaults to `[2048, 1648]`):
        (height, width) every page is resized and padded to.
    max_sequence_length (`int`, *optional*, defaults to 9000):
        Longest decoder sequence the checkpoint was trained for (the decoder has no position embeddings).
    """

    model_type = "nemotron_parse"
    sub_configs_defaults: ClassVar[dict] = {"decoder": NemotronParseTextConfig}

    encoder: dict | None = None
    decoder: dict | PreTrainedConfig | None = None
    image_size: list[int] | tuple[int, int] = (2048, 1648)
    max_sequence_length: int = 9000
    vocab_size: int = 52327
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    pad_token_id: int | None = 1
    eos_token_id: int | None = 2
    decoder_start_token_id: int | None = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.encoder = copy.deepcopy(self.encoder) if self.encoder is not None else _default_encoder()
        self.image_size = [int(s) for s in self.image_size]


def _default_encoder() -> dict[str, Any]:
    """The C-RADIOv2-H settings of the official checkpoint, the ones :func:`radio_config` reads."""
    teachers = [{"name": n, "use_summary": n != "sam"} for n in ("clip", "siglip", "dino_v2", "sam")]
    return {"model_type": "", "_name_or_path": "nvidia/C-RADIOv2-H", "architectures": ["RADIOModel"],
            "patch_size": 16, "max_resolution": 2048, "preferred_resolution": [768, 768], "version": "radio_v2.5-h",
            "vitdet_window_size": None, "adaptor_names": None, "feature_normalizer_config": None,
            "args": {"model": "vit_huge_patch16_224", "cpe_max_size": 2048, "cls_token_per_teacher": True,
                     "register_multiple": 8, "teachers": teachers, "model_norm": False}}


def radio_config(encoder: dict[str, Any], attn_implementation: str | None = None) -> RadioConfig:
    """transformers' ``RadioConfig`` that computes what NVIDIA's remote RADIO model computes for `encoder`.

    How RADIO builds its ViT (radio/radio_model.py ``create_model_from_args``, enable_cpe_support.py,
    cls_token.py): a timm ViT named ``args.model``, its final norm replaced by identity unless ``args.model_norm``,
    CPE position embeddings over ``args.cpe_max_size`` pixels, one class token per distinct teacher when
    ``args.cls_token_per_teacher`` (else one), then registers up to a multiple of ``args.register_multiple`` (unless
    ``args.cpe_num_registers``); the summary concatenates the class tokens of the teachers with ``use_summary``.
    """
    args = encoder.get("args")
    if not isinstance(args, dict):
        raise NemotronParseConfigError(
            "config.encoder has no 'args' dict; expected the C-RADIO config of a Nemotron-Parse checkpoint (its "
            "config.json 'encoder' entry, with the RADIO training args)")
    _check_supported(encoder, args)
    hidden, layers, heads = _backbone_size(encoder, args)
    teachers = args.get("teachers") or []
    num_cls = len({t["name"] for t in teachers}) if args.get("cls_token_per_teacher") else 1
    registers = args.get("cpe_num_registers")
    if not registers:
        multiple = args.get("register_multiple")
        registers = multiple - (num_cls % multiple) if multiple else 0
    summary_idxs = [i for i, t in enumerate(teachers) if t.get("use_summary", True)] or [0]
    return RadioConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        mlp_ratio=float(encoder.get("mlp_ratio", 4.0)), patch_size=int(encoder.get("patch_size", 16)),
        max_img_size=int(args.get("cpe_max_size") or encoder.get("max_resolution", 2048)),
        num_cls_tokens=num_cls, num_registers=registers, summary_idxs=summary_idxs,
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, attn_implementation=attn_implementation,
    )


def _check_supported(encoder: dict[str, Any], args: dict[str, Any]) -> None:
    unsupported = {
        "vitdet_window_size": encoder.get("vitdet_window_size"),
        "adaptor_names": encoder.get("adaptor_names"),
        "feature_normalizer_config": encoder.get("feature_normalizer_config"),
        "args.model_norm": args.get("model_norm"),
        "args.cpe_max_size (None: no CPE)": args.get("cpe_max_size", 0) is None,
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise NemotronParseConfigError(
            f"config.encoder sets {', '.join(found)}: vlmtune's Nemotron-Parse encoder implements the C-RADIO "
            "configuration of nvidia/NVIDIA-Nemotron-Parse-v1.1 (global attention, no adaptors, no feature "
            "normalizer, no final norm, CPE position embeddings). Use a checkpoint with that encoder, or load the "
            "original remote code with model.trust_remote_code: true")


def _backbone_size(encoder: dict[str, Any], args: dict[str, Any]) -> tuple[int, int, int]:
    name = args.get("model")
    known = RADIO_BACKBONES.get(name)
    sizes = [encoder.get(k, known[i] if known else None) for i, k in enumerate(ENCODER_SIZE_KEYS)]
    if any(s is None for s in sizes):
        raise NemotronParseConfigError(
            f"config.encoder.args.model={name!r} is not a RADIO backbone vlmtune knows ({', '.join(RADIO_BACKBONES)})"
            f"; give its size in config.encoder as {', '.join(ENCODER_SIZE_KEYS)}")
    return sizes[0], sizes[1], sizes[2]
