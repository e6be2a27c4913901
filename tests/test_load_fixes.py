"""Workarounds for upstream bugs (Family.load_fixes): applied only under the transformers releases that have the
bug, needed there, and absent elsewhere while the stock model works.

When a fix's `fixed` release is the oldest transformers vlmtune supports, delete the fix from
vlmtune.model.LOAD_FIXES, its name from the family row, and its test.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmtune.families import family_for
from vlmtune.model import LOAD_FIXES, apply_load_fixes


def text_inputs():
    return {"input_ids": torch.tensor([[1, 5, 6, 7, 8]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


def test_llama4_image_outputs_fix_only_where_needed(tiny_model):
    """transformers 5.24.0: Llama4ForConditionalGeneration.forward reads `image_outputs` from its language model's
    MoeCausalLMOutputWithPast, which has no such field (fixed in 5.25.0)."""
    fix = LOAD_FIXES["llama4_language_model_image_outputs"]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model("llama4")).eval()
    language_model = model.get_submodule("language_model")
    if fix.needed():  # this release has the bug: the stock forward fails, the fixed one works
        with torch.no_grad(), pytest.raises(AttributeError, match="image_outputs"):
            model(**text_inputs())
        apply_load_fixes(model, family_for("llama4"))
        assert len(language_model._forward_hooks) == 1
    else:  # the stock forward works, and loading adds nothing
        apply_load_fixes(model, family_for("llama4"))
        assert not language_model._forward_hooks
    with torch.no_grad():
        out = model(**text_inputs())
    assert out.logits.shape[:2] == (1, 5) and out.image_outputs is None


def test_load_fix_release_window():
    fix = LOAD_FIXES["llama4_language_model_image_outputs"]
    assert [fix.needed(v) for v in ("5.23.0", "5.24.0", "5.24.1", "5.25.0", "6.0.0")] == [
        False, True, True, False, False]
