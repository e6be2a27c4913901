"""Every per-family fact as data, keyed by ``config.model_type``.

Code never branches on a family name: it looks the family up here. Adding a family is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Parts of a model, as parameter-name prefixes. A parameter belongs to the part with the longest matching
# prefix, so a projector nested inside the vision tower (Qwen's ``model.visual.merger``) is the projector.
QWEN_PARTS = {
    "vision_tower": ("model.visual",),
    "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
    "language_model": ("model.language_model", "lm_head"),
}
LLAVA_PARTS = {
    "vision_tower": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "language_model": ("model.language_model", "lm_head"),
}
IDEFICS_PARTS = {
    "vision_tower": ("model.vision_model",),
    "projector": ("model.connector",),
    "language_model": ("model.text_model", "lm_head"),
}

CHATML = {"assistant_start": "<|im_start|>assistant\n", "assistant_end": "<|im_end|>"}


@dataclass(frozen=True)
class Family:
    name: str
    parts: dict[str, tuple[str, ...]]
    # How the chat template marks an assistant answer: the text right before it, and the end-of-turn text
    # right after it. Trained tokens = the answer + the end marker; everything else is -100.
    assistant_start: str
    assistant_end: str
    # Text the template may insert between the marker and the answer, never trained (longest first).
    answer_prefixes: tuple[str, ...] = ()
    append_eos: bool = False  # template ends an assistant turn with no end-of-sequence (LLaVA 1.5)
    attn_implementation: str = "sdpa"
    # Tensor dtypes some image processors return regardless of the model (Llama 4 returns bf16 pixels).
    cast_to_model_dtype: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    # Workarounds for upstream bugs, applied to the loaded model: names of functions in vlmtune.model.LOAD_FIXES.
    load_fixes: tuple[str, ...] = ()
    notes: str = ""
    model_types: tuple[str, ...] = field(default=())


FAMILIES: tuple[Family, ...] = (
    Family("qwen2_vl", QWEN_PARTS, **CHATML, model_types=("qwen2_vl",),
           notes="template injects a default system prompt when none is given"),
    Family("qwen2_5_vl", QWEN_PARTS, **CHATML, model_types=("qwen2_5_vl",),
           notes="template injects a default system prompt when none is given"),
    Family("qwen3_vl", QWEN_PARTS, **CHATML, model_types=("qwen3_vl", "qwen3_vl_moe")),
    Family("qwen3_5", QWEN_PARTS, **CHATML, answer_prefixes=("<think>\n\n</think>\n\n",),
           model_types=("qwen3_5", "qwen3_5_moe"),
           notes="template adds an empty think block to the last assistant turn only"),
    Family("internvl", LLAVA_PARTS, **CHATML, model_types=("internvl",)),
    Family("llava_onevision", LLAVA_PARTS, **CHATML, model_types=("llava_onevision",)),
    Family("gemma3", LLAVA_PARTS, "<start_of_turn>model\n", "<end_of_turn>", model_types=("gemma3",),
           attn_implementation="eager", notes="system text is merged into the first user turn"),
    Family("gemma3n", {**LLAVA_PARTS, "projector": ("model.embed_vision",)}, "<start_of_turn>model\n",
           "<end_of_turn>", model_types=("gemma3n",), attn_implementation="eager"),
    Family("smolvlm", IDEFICS_PARTS, "\nAssistant:", "<end_of_utterance>", model_types=("smolvlm", "idefics3"),
           notes="the answer text starts with a space"),
    Family("llava", LLAVA_PARTS, "ASSISTANT:", "</s>", append_eos=True, model_types=("llava",)),
    Family("llava_next", LLAVA_PARTS, "[/INST]", "</s>", model_types=("llava_next", "llava_next_video")),
    # The pixel-shuffle MLP inside the vision model (vision_adapter) maps patches into the projector, like Qwen's
    # merger: it belongs to the projector, so freezing the vision tower trains adapter + projector.
    Family("llama4", {"vision_tower": ("vision_model",),
                      "projector": ("vision_model.vision_adapter", "multi_modal_projector"),
                      "language_model": ("language_model",)},
           "<|header_start|>assistant<|header_end|>\n\n", "<|eot|>", model_types=("llama4",),
           load_fixes=("llama4_language_model_image_outputs",),
           notes="the image processor returns bfloat16 pixel_values; the template trims message text"),
    Family("mistral3", LLAVA_PARTS, "[/INST]", "</s>", model_types=("mistral3",),
           notes="template injects a default [SYSTEM_PROMPT]; Mistral-Small-3.x and Ministral 3 (Mistral text "
                 "model) and Mistral-Small-4 (text_config mistral4: MLA + MoE) share this model type"),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


class FamilyError(ValueError):
    pass


def family_for(model_type: str) -> Family:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise FamilyError(
            f"model type {model_type!r} is not in vlmtune's family table (vlmtune/families.py), so vlmtune "
            f"does not know how its chat template marks assistant turns. Supported model types: {known}"
        ) from None


def part_of(param_name: str, family: Family) -> str | None:
    """The part ('vision_tower', 'projector', 'language_model') a parameter belongs to, by longest prefix."""
    best, best_len = None, -1
    for part, prefixes in family.parts.items():
        for prefix in prefixes:
            matches = param_name == prefix or param_name.startswith(prefix + ".")
            if matches and len(prefix) > best_len:
                best, best_len = part, len(prefix)
    return best
