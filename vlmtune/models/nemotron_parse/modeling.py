"""Nemotron-Parse (nvidia/NVIDIA-Nemotron-Parse-v1.1) built from transformers' own components.

The official model (remote code ``hf_nemotron_parse_modeling.py``) is a vision encoder-decoder:

- ``encoder.model_encoder``: C-RADIOv2-H, a ViT-H/16 with CPE position embeddings, 4 class tokens and 4 registers.
  Here: transformers' ``RadioModel`` (model type ``radio``), with its identity LayerScale removed (C-RADIO has
  none; the official checkpoint has no weights for it). transformers renames the official RADIO weights on load
  (``radio_model.model.blocks.N.attn.qkv`` -> ``encoder.layer.N.attention.{q,k,v}_proj``, its ``radio`` conversion
  mapping, scoped to this sub-model) and back on save, so checkpoints keep the official names.
- the neck, ``encoder.{conv1,layer_norm1,conv2,layer_norm2,sum_proj,layer_norm3}``: patch features to the decoder
  width, the patch grid's width reduced 4x by a (1, 4) strided convolution, plus one token from the RADIO summary.
- ``decoder``: mBART decoder layers (transformers' ``MBartDecoderLayer``) under a scaled token embedding, with
  layer norms before and after, and NO position embeddings (the official decoder has none).
- ``lm_head``: untied from the token embedding.

Measured: with the same weights, ``encoder.model_encoder`` gives bit-identical summary and features to NVIDIA's own
RADIO code (NVlabs/RADIO c0f3701 ``hf_model.RADIOModel``, built from the official encoder config, fp32, eval mode)
at 2048 x 64 (the real canvas height: position table used as is, then cropped) and at scaled sizes. In train mode
NVIDIA's RADIO also randomly jitters and drops (p = 0.1) its position embeddings (``ViTPatchGenerator``); this model
does not: train and eval compute the same encoder.
"""


import math
from typing import ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
)
from transformers.models.encoder_decoder.modeling_encoder_decoder import shift_tokens_right
from transformers.models.mbart.modeling_mbart import MBartAttention, MBartDecoderLayer, MBartScaledWordEmbedding
from transformers.models.radio.modeling_radio import RadioModel
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from vlmtune.models.nemotron_parse.configuration import (
    NemotronParseConfig,
    NemotronParseTextConfig,
    radio_config,
)

# The neck's strided convolution merges this many neighbouring patches of a row (official: kernel = stride = (1, 4)).
NECK_COLUMNS = 4


def _kept_positions(x: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of x (batch, sequence, ...) that get logits: the last n (0: all) or the given indices.
    (transformers 5.25's `slice_logits_to_keep`, which 5.24, the floor of pyproject.toml, does not have.)"""
    if isinstance(logits_to_keep, int):
        return x[:, slice(-logits_to_keep, None)]
    return x[:, logits_to_keep]


class NemotronParseTextPreTrainedModel(PreTrainedModel):
    config: NemotronParseTextConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["MBartDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True


class NemotronParseDecoder(NemotronParseTextPreTrainedModel):
    """mBART decoder layers without position embeddings: embed (scaled), layer norm, dropout, layers, layer norm."""

    _can_record_outputs: ClassVar[dict] = {
        "hidden_states": MBartDecoderLayer,
        "attentions": OutputRecorder(MBartAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(MBartAttention, index=1, layer_name="encoder_attn"),
    }

    def __init__(self, config: NemotronParseTextConfig):
        super().__init__(config)
        self.dropout = config.dropout
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = MBartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id,
                                                     embed_scale=embed_scale)
        self.layers = nn.ModuleList([MBartDecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("NemotronParseDecoder: give exactly one of decoder_input_ids and decoder_inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        self_attn_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache=self_attn_cache)
        hidden_states = self.layernorm_embedding(inputs_embeds)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        # The official decoder attends to every encoder token: its cross-attention mask is always None.
        for layer in self.layers:
            hidden_states = layer(hidden_states, causal_mask, encoder_hidden_states,  # positional: checkpointing
                                  encoder_attention_mask=None, cache=cache, use_cache=use_cache, **kwargs)
        hidden_states = self.layer_norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states,
                                                        cache=cache if use_cache else None)


class NemotronParseVisionEncoder(nn.Module):
    """C-RADIO (``model_encoder``) and the neck that turns its patch features and summary into decoder memory."""

    main_input_name = "pixel_values"  # what generate() feeds the encoder

    def __init__(self, config: NemotronParseConfig):
        super().__init__()
        radio = radio_config(config.encoder, attn_implementation=config._attn_implementation)
        self.model_encoder = RadioModel(radio)
        for layer in self.model_encoder.encoder.layer:
            # transformers' port keeps an identity LayerScale (a trainable vector of ones); C-RADIO has none.
            layer.layer_scale1 = nn.Identity()
            layer.layer_scale2 = nn.Identity()
        self.patch_size = radio.patch_size
        width, features = config.decoder.d_model, radio.hidden_size
        self.conv1 = nn.Conv1d(features, width, 1)
        self.layer_norm1 = nn.LayerNorm(width, eps=1e-6)
        self.conv2 = nn.Conv2d(width, width, kernel_size=(1, NECK_COLUMNS), stride=(1, NECK_COLUMNS), bias=False)
        self.layer_norm2 = nn.LayerNorm(width, eps=1e-6)
        self.sum_proj = nn.Linear(features * len(radio.summary_idxs), width)
        self.layer_norm3 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> BaseModelOutput:
        """`pixel_values` (batch, 3, H, W) in [0, 1] (RADIO normalises them itself); H and W multiples of the patch
        size. Returns (batch, (H / patch) * (W / patch // 4) + 1, d_model): the neck's patch tokens row by row,
        then the summary token."""
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Nemotron-Parse's encoder needs image sides that are multiples of its patch size "
                f"{self.patch_size}, got {height} x {width}; the processor (NemotronParseImageProcessor) pads pages "
                "to a valid size")
        flags = {k: v for k, v in (("output_attentions", output_attentions),
                                   ("output_hidden_states", output_hidden_states)) if v is not None}
        radio = self.model_encoder(pixel_values, **flags)
        patches = self.layer_norm1(self.conv1(radio.features.transpose(1, 2)).transpose(1, 2))
        grid = patches.transpose(1, 2).unflatten(2, (height // self.patch_size, width // self.patch_size))
        patches = self.layer_norm2(self.conv2(grid).flatten(2).transpose(1, 2))
        summary = self.layer_norm3(self.sum_proj(radio.summary))
        return BaseModelOutput(last_hidden_state=torch.cat([patches, summary.unsqueeze(1)], dim=1),
                               hidden_states=radio.hidden_states, attentions=radio.attentions)


class NemotronParsePreTrainedModel(PreTrainedModel):
    config: NemotronParseConfig
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["RadioLayer", "MBartDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True


class NemotronParseForConditionalGeneration(NemotronParsePreTrainedModel, GenerationMixin):
    """Page image in, the page as tokens out: ``encoder`` (C-RADIO + neck), ``decoder`` (mBART layers), ``lm_head``."""

    def __init__(self, config: NemotronParseConfig):
        super().__init__(config)
        self.encoder = NemotronParseVisionEncoder(config)
        self.decoder = NemotronParseDecoder(config.decoder)
        self.lm_head = nn.Linear(config.decoder.d_model, config.decoder.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.encoder

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, decoder length)`, *optional*):
            Aligned with `decoder_input_ids` (teacher forcing: `labels[:, t]` is the token the decoder should predict
            after reading `decoder_input_ids[:, :t + 1]`), -100 where not trained. Without `decoder_input_ids`, they
            are `labels` shifted right behind `decoder_start_token_id`, as in the official model. The loss is the
            mean cross-entropy over the trained tokens kept by `logits_to_keep`.
        logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
            An int keeps the last that many positions (0: all); a 1-D tensor keeps those positions. Applied to the
            decoder's hidden states before `lm_head`.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if encoder_outputs is None:
            if pixel_values is None:
                raise ValueError("NemotronParseForConditionalGeneration needs pixel_values (or encoder_outputs)")
            encoder_outputs = self.encoder(pixel_values, output_attentions=kwargs.get("output_attentions"),
                                           output_hidden_states=kwargs.get("output_hidden_states"))
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state, cache=cache,
            inputs_embeds=decoder_inputs_embeds, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(_kept_positions(decoder_outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            kept = _kept_positions(labels.unsqueeze(-1), logits_to_keep).squeeze(-1).contiguous()
            loss = self.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1], shift_labels=kept,
                                      num_items_in_batch=num_items_in_batch)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )
