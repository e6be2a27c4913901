"""Kimi-VL (``moonshotai/Kimi-VL-A3B-Instruct``, ``-Thinking``, ``-Thinking-2506``; model type ``kimi_vl``) without
remote code: config, model, image processor, tokenizer and processor, registered with transformers' Auto classes
by :func:`register`. Importing this package registers nothing."""

from __future__ import annotations


def register() -> None:
    """Register Kimi-VL's classes with transformers' Auto classes and its checkpoint conversion (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from vlmtune.models.kimi_vl.configuration import KimiVLConfig, MoonViTConfig
    from vlmtune.models.kimi_vl.conversion import register_conversions
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.modeling import KimiVLForConditionalGeneration, MoonViTModel
    from vlmtune.models.kimi_vl.processing import KimiVLProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiVLTokenizer

    AutoConfig.register(MoonViTConfig.model_type, MoonViTConfig, exist_ok=True)
    AutoConfig.register(KimiVLConfig.model_type, KimiVLConfig, exist_ok=True)
    AutoModel.register(MoonViTConfig, MoonViTModel, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        auto.register(KimiVLConfig, KimiVLForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(KimiVLConfig, image_processor_classes={"pil": KimiVLImageProcessor}, exist_ok=True)
    AutoTokenizer.register(KimiVLConfig, tokenizer_class=KimiVLTokenizer, exist_ok=True)
    AutoProcessor.register(KimiVLConfig, KimiVLProcessor, exist_ok=True)
    register_conversions()
