"""Nemotron-Parse (nvidia/NVIDIA-Nemotron-Parse-v1.1), native: transformers' ``radio`` encoder and ``mbart`` decoder
layers, registered with the Auto classes under model type ``nemotron_parse`` by :func:`register`.

Modules (parameter-name prefixes): ``encoder.model_encoder`` the C-RADIO vision encoder; ``encoder.conv1``,
``encoder.layer_norm1``, ``encoder.conv2``, ``encoder.layer_norm2``, ``encoder.sum_proj``, ``encoder.layer_norm3``
the neck; ``decoder`` and ``lm_head`` the text decoder. The output syntax is in :mod:`.syntax`.
"""

from __future__ import annotations


def register() -> None:
    """Register config, model, image processor and processor with transformers' Auto classes (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from vlmtune.models.nemotron_parse.configuration import NemotronParseConfig, NemotronParseTextConfig
    from vlmtune.models.nemotron_parse.modeling import NemotronParseForConditionalGeneration
    from vlmtune.models.nemotron_parse.processing import NemotronParseImageProcessor, NemotronParseProcessor

    AutoConfig.register(NemotronParseConfig.model_type, NemotronParseConfig, exist_ok=True)
    AutoConfig.register(NemotronParseTextConfig.model_type, NemotronParseTextConfig, exist_ok=True)
    # AutoModel is what the official model card loads; AutoModelForImageTextToText is what vlmtune loads.
    AutoModel.register(NemotronParseConfig, NemotronParseForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(NemotronParseConfig, NemotronParseForConditionalGeneration, exist_ok=True)
    backends = {"torchvision": NemotronParseImageProcessor, "pil": NemotronParseImageProcessor}
    AutoImageProcessor.register(NemotronParseConfig, image_processor_classes=backends, exist_ok=True)
    AutoProcessor.register(NemotronParseConfig, NemotronParseProcessor, exist_ok=True)
