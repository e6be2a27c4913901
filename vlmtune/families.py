"""Every per-family fact as data, keyed by ``config.model_type``.

Code never branches on a family name: it looks the family up here. Adding a family is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtune.errors import FamilyError

# The parts every family names (a family may add parts of its own, e.g. Gemma 3n's audio tower).
PARTS = ("vision_tower", "projector", "language_model")
VISION_PARTS = ("vision_tower", "projector")  # get gradients only from steps that carry images or video


def frozen_parts(freeze) -> set[str]:
    """The parts a recipe's ``freeze`` section switches off."""
    return {part for part in PARTS if getattr(freeze, part)}
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
# LLaVA-NeXT / OneVision: the learned row separator ends each row of projected image features.
LLAVA_NEXT_PARTS = {**LLAVA_PARTS, "projector": ("model.multi_modal_projector", "model.image_newline")}
IDEFICS_PARTS = {
    "vision_tower": ("model.vision_model",),
    "projector": ("model.connector",),
    "language_model": ("model.text_model", "lm_head"),
}
# Kimi-VL: the official checkpoint's module layout (vlmtune/models/kimi_vl), no `model.` wrapper.
KIMI_VL_PARTS = {
    "vision_tower": ("vision_tower",),
    "projector": ("multi_modal_projector",),
    "language_model": ("language_model",),
}

CHATML = {"assistant_start": "<|im_start|>assistant\n", "assistant_end": "<|im_end|>"}
# LLaVA-style CLIP towers: the projector reads hidden_states[vision_feature_layer], never the final norm.
CLIP_FEATURES = {"unused_params": ("model.vision_tower.post_layernorm",),
                 "feature_layers": "model.vision_tower.encoder.layers"}


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
    # Workarounds for upstream bugs, applied to the loaded model where the installed transformers needs them:
    # names in vlmtune.model.LOAD_FIXES.
    load_fixes: tuple[str, ...] = ()
    # Parameters the forward never uses, by design (name prefixes), e.g. the final norm of a vision tower whose
    # features are read from a hidden state. model.py freezes them at load: never trained, not counted as
    # trainable, and never "a trainable parameter without a gradient" (which DDP and optimizer-state checkpoints
    # reject). tests/test_families.py checks that exactly these get no gradient.
    unused_params: tuple[str, ...] = ()
    # The vision encoder's layer list, where the projector reads the hidden state `config.vision_feature_layer`
    # (LLaVA: the penultimate layer): the layers after that one are unused by design too.
    feature_layers: str = ""
    # Linear layers whose weight the model reads directly while training (bypassing forward), so a LoRA adapter
    # on them would never train: peft never targets them (module-name suffixes).
    no_adapters: tuple[str, ...] = ()
    # Why train.packing cannot be exact for this family ("" = it is: tests/test_packing.py compares logits).
    no_packing: str = ""
    notes: str = ""
    model_types: tuple[str, ...] = field(default=())
    # MoE experts stored as fused 3-D parameters (names relative to their module, e.g. "mlp.experts.gate_up_proj"):
    # no nn.Linear for LoRA to wrap, so vlmtune/peft.py adapts them through peft's `target_parameters` (possible
    # with LoRA and peft.dropout=0; peft's parameter adapters support neither dropout nor DoRA).
    expert_params: tuple[str, ...] = ()
    # How a sample becomes token ids and labels (vlmtune/encode.py ENCODERS): "chat" renders the chat template and
    # trains the assistant turns found by the markers above; "prompt" is an encoder-decoder's: the image goes to the
    # encoder, the decoder reads the user turn's text as its prompt (never trained) and writes the answer + end.
    encoding: str = "chat"
    # How a Thinking template's model marks its reasoning before the answer: stripped from predictions before
    # they are scored (vlmtune/evaluate.py).
    think_tags: tuple[str, str] = ("<think>", "</think>")
    # Whether one sample may hold images and videos together ("" = it may); else why not. Such samples are skipped
    # and counted (images_with_video); tests/test_video.py notices when the reason goes away.
    no_images_with_video: str = ""
    # Tensors the model reads whole, zero padding included (LLaVA-NeXT-Video / OneVision take a padded frame for a
    # frame): their shapes must agree within a micro-batch, so vlmtune/batching.py groups samples by them.
    uniform_media: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("qwen2_vl", QWEN_PARTS, **CHATML, model_types=("qwen2_vl",),
           notes="template injects a default system prompt when none is given"),
    Family("qwen2_5_vl", QWEN_PARTS, **CHATML, model_types=("qwen2_5_vl",),
           notes="template injects a default system prompt when none is given"),
    Family("qwen3_vl", QWEN_PARTS, **CHATML, answer_prefixes=("<think>\n\n</think>\n\n",),
           model_types=("qwen3_vl", "qwen3_vl_moe"),
           notes="Instruct templates add nothing; Thinking templates add an empty think block to the last turn"),
    Family("qwen3_5", QWEN_PARTS, **CHATML, answer_prefixes=("<think>\n\n</think>\n\n",),
           model_types=("qwen3_5", "qwen3_5_moe"),
           no_packing="its linear-attention (Gated DeltaNet) layers carry a recurrent state across the samples "
                      "of a row",
           notes="template adds an empty think block to the last assistant turn only"),
    Family("internvl", LLAVA_PARTS, **CHATML, model_types=("internvl",)),
    # llava-hf's OneVision template writes "<|im_start|>assistant \n" + answer + "<|im_end|>" (a space, and no newline
    # after <|im_end|>); transformers' conversion script writes the plain ChatML "assistant\n". Both match.
    Family("llava_onevision", LLAVA_NEXT_PARTS, "<|im_start|>assistant", "<|im_end|>", answer_prefixes=(" \n", "\n"),
           model_types=("llava_onevision",), uniform_media=("pixel_values_videos",),
           unused_params=("model.vision_tower.post_layernorm", "model.vision_tower.head"),
           feature_layers="model.vision_tower.encoder.layers"),
    # Gemma 3 / 3n: sdpa, not eager: no attention soft-capping (Gemma 2 had it), and the tiny models give the same
    # logits and gradients under both, bidirectional image blocks, sliding window and padding included.
    Family("gemma3", LLAVA_PARTS, "<start_of_turn>model\n", "<end_of_turn>", model_types=("gemma3",),
           # masking_utils.create_causal_mask remaps the sliding layers' image-block overlay (an or_mask_function)
           # to in-sample positions, so image tokens attend to the wrong blocks (tests/test_packing.py notices a fix)
           no_packing="in transformers 5.24 its sliding-window layers mix up the bidirectional image blocks of "
                      "packed samples",
           notes="system text is merged into the first user turn; the template trims message text"),
    # Gemma 3n also hears: vlmtune feeds it no audio, so its audio tower and audio embedder are a part of their own,
    # which no freeze switch controls, and unused (frozen at load). embed_audio embeds every token and drops the
    # result for non-audio ones: an all-zero gradient, which weight decay would still act on.
    Family("gemma3n", {**LLAVA_PARTS, "projector": ("model.embed_vision",),
                       "audio_tower": ("model.audio_tower", "model.embed_audio")},
           "<start_of_turn>model\n", "<end_of_turn>", model_types=("gemma3n",),
           unused_params=("model.audio_tower", "model.embed_audio"),
           # transformers 5.24 AltUp.correct: in training, F.linear(x, correction_coefs.weight.clamp(...))
           no_adapters=("altup.correction_coefs",),
           notes="system text is merged into the first user turn; the vision tower is a timm MobileNetV5"),
    Family("smolvlm", IDEFICS_PARTS, "\nAssistant:", "<end_of_utterance>", model_types=("smolvlm", "idefics3"),
           no_images_with_video="SmolVLMProcessor (transformers 5.25) returns images and video frames under one "
                                "pixel_values key, and the video's replace the images'",
           notes="the answer text starts with a space"),
    # "ASSISTANT:", not " ASSISTANT:": alone, the SentencePiece tokenizer gives the space a token of its own ("▁"),
    # but after a question it joins the word ("▁A"), so the spaced marker would never match in context.
    Family("llava", LLAVA_PARTS, "ASSISTANT:", "</s>", append_eos=True, model_types=("llava",),
           **CLIP_FEATURES, notes="the template ends an answer with a space, no EOS"),
    Family("llava_next", LLAVA_NEXT_PARTS, "[/INST]", "</s>", model_types=("llava_next", "llava_next_video"),
           uniform_media=("pixel_values_videos",),
           **CLIP_FEATURES, notes="markers of the Mistral-based checkpoints (llava-v1.6-mistral, "
                                  "NeXT-Video-7B-32K); the Vicuna, Yi and Llama 3 ones use other templates"),
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
    # Kimi-VL (vlmtune's native implementation, no remote code): turns end with <|im_end|> and no newline. The
    # Thinking models write their reasoning as `◁think▷...◁/think▷` at the start of the answer, which the templates
    # leave to the text: in training data it is part of the answer and trained.
    # An encoder-decoder (vlmtune/models/nemotron_parse): the page goes to the C-RADIO encoder, the neck (projector)
    # condenses its patches, the mBART-style decoder writes the page's markdown with box and class tokens.
    Family("nemotron_parse", {"vision_tower": ("encoder.model_encoder",), "projector": ("encoder",),
                              "language_model": ("decoder", "lm_head")},
           "", "</s>", encoding="prompt", cast_to_model_dtype=("pixel_values",), model_types=("nemotron_parse",),
           no_packing="an encoder-decoder: each sample's decoder reads its own page's encoder output",
           notes="the decoder prompt is the task tokens </s><s><predict_bbox><predict_classes><output_markdown>"),
    Family("kimi_vl", KIMI_VL_PARTS, "<|im_assistant|>assistant<|im_middle|>", "<|im_end|>", model_types=("kimi_vl",),
           expert_params=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"), think_tags=("◁think▷", "◁/think▷"),
           notes="template injects a default system prompt when none is given; Instruct, Thinking and "
                 "Thinking-2506 share the template format"),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


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
