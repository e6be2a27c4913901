"""Workarounds for upstream bugs (Family.load_fixes): each one is still needed, and it works.

When a test here fails because the bug is gone upstream, delete the fix from vlmtune.model.LOAD_FIXES, its
name from the family row, and the test.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.families import family_for
from vlmtune.model import apply_load_fixes


def text_inputs():
    return {"input_ids": torch.tensor([[1, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


def test_llama4_forward_needs_the_image_outputs_fix(tiny_model):
    """transformers 5.24.0: Llama4ForConditionalGeneration.forward reads `image_outputs` from its language model's
    MoeCausalLMOutputWithPast, which has no such field. If this stops raising, the fix can go."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model("llama4")).eval()
    with torch.no_grad(), pytest.raises(AttributeError, match="image_outputs"):
        model(**text_inputs())
    apply_load_fixes(model, family_for("llama4"))
    with torch.no_grad():
        out = model(**text_inputs())
    assert out.logits.shape[:2] == (1, 5) and out.image_outputs is None
