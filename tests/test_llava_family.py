"""LLaVA-family template facts behind the family rows (vlmtune/families.py), checked on the real tokenizers."""

from __future__ import annotations

import json

from tiny.llava import llava, llava_onevision

from vlmtune.encode import SampleEncoder, find_subsequence
from vlmtune.families import family_for
from vlmtune.views import trained_runs

CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "What do you see?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    {"role": "user", "content": [{"type": "text", "text": "And the border?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Blue, 2 px wide."}]},
]


def trained_text(processor, family) -> list[str]:
    enc = SampleEncoder(processor, family, max_length=4096)(CONVERSATION, 0)
    ids, labels = enc.tensors["input_ids"].tolist(), enc.tensors["labels"].tolist()
    return [processor.tokenizer.decode(t).strip() for t, trained in trained_runs(ids, labels) if trained]


def test_llava_marker_has_no_leading_space():
    """LLaVA 1.5's template writes " ASSISTANT:", but its SentencePiece tokenizer gives a lone leading space a token
    of its own ("▁"), while after the question the space joins the word ("▁A"): only "ASSISTANT:" matches."""
    _, _, processor, _ = llava()
    tok, family = processor.tokenizer, family_for("llava")
    rendered = tok(processor.apply_chat_template(CONVERSATION, tokenize=False)).input_ids
    assert find_subsequence(rendered, tok(family.assistant_start, add_special_tokens=False).input_ids, 0) >= 0
    assert find_subsequence(rendered, tok(" ASSISTANT:", add_special_tokens=False).input_ids, 0) == -1
    # The template ends an answer with a space and no EOS: the family appends the EOS, glued to the answer.
    assert trained_text(processor, family) == ["A red square.</s>", "Blue, 2 px wide.</s>"]


# The template transformers' conversion script gives OneVision (convert_llava_onevision_weights_to_hf.py), plain
# ChatML; llava-hf's repos ship another one ("<|im_start|>assistant \n", tests/assets/llava-onevision).
ONEVISION_CONVERSION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_onevision_row_matches_both_template_variants():
    _, _, processor, _ = llava_onevision()
    family = family_for("llava_onevision")
    assert "message['role'] + ' '" in processor.chat_template  # the llava-hf one: "<|im_start|>assistant \n"
    for template in (processor.chat_template, ONEVISION_CONVERSION_TEMPLATE):
        processor.chat_template = template
        assert trained_text(processor, family) == ["A red square.<|im_end|>", "Blue, 2 px wide.<|im_end|>"]


def test_transformers_llama_tokenizer_does_not_save_legacy_flag(tmp_path):
    """transformers 5.24.0: LlamaTokenizer(legacy=True) saves no `legacy`, so it reloads with legacy=False and other
    SentencePiece prefix spaces (LLaVA-NeXT-Video-7B-32K's tokenizer is legacy). tests/tiny/llava.py `save` writes
    the flag back; when this test fails, transformers keeps it and that step can go."""
    from transformers import LlamaTokenizer

    LlamaTokenizer(legacy=True).save_pretrained(tmp_path)
    assert "legacy" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
