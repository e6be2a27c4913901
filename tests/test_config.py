import pytest

from vlmtune.config import RecipeError, apply_overrides, build_recipe, load_recipe

BASE = {
    "model": {"name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct"},
    "data": {"train": {"source": "naver-clova-ix/cord-v2"}},
    "train": {"max_steps": 10},
}


def tree(**over):
    import copy

    t = copy.deepcopy(BASE)
    return apply_overrides(t, [f"{k.replace('__', '.')}={v}" for k, v in over.items()])


def test_defaults_and_override_types():
    r = build_recipe(tree(train__lr="3e-4", train__val_every_steps="5", freeze__vision_tower="true",
                          data__validation__source="x.jsonl"))
    assert r.train.lr == pytest.approx(3e-4)
    assert r.train.val_every_steps == 5
    assert r.freeze.vision_tower is True and r.freeze.projector is False
    assert r.data.validation.source == "x.jsonl" and r.data.validation.format == "auto"


def test_unknown_key_did_you_mean():
    with pytest.raises(RecipeError) as e:
        build_recipe(tree(train__max_step="5"))
    assert "train.max_step: unknown key; did you mean 'train.max_steps'?" in str(e.value)


def test_all_errors_reported_at_once():
    t = tree(train__lr="-1", train__micro_batch_size="abc", data__train__format="csv", modle__x="1")
    with pytest.raises(RecipeError) as e:
        build_recipe(t)
    msg = str(e.value)
    for key in ("train.lr", "train.micro_batch_size", "data.train.format", "modle: unknown key"):
        assert key in msg, msg
    assert "did you mean 'model'" in msg
    assert "4 problem(s)" in msg


def test_impossible_combinations():
    with pytest.raises(RecipeError, match=r"multiple of micro_batch_size"):
        build_recipe(tree(train__micro_batch_size="3", train__global_batch_size="8"))
    with pytest.raises(RecipeError, match=r"nothing would train"):
        build_recipe(tree(freeze__vision_tower="true", freeze__projector="true", freeze__language_model="true"))
    t = tree()
    del t["train"]["max_steps"]
    with pytest.raises(RecipeError, match=r"max_steps or train.epochs"):
        build_recipe(t)


def test_missing_required_and_bad_override(tmp_path):
    with pytest.raises(RecipeError, match=r"model.name_or_path: required"):
        build_recipe({"model": {}, "data": BASE["data"], "train": BASE["train"]})
    with pytest.raises(RecipeError, match=r"key.path=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(RecipeError, match=r"does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_cross_field_problems_reported_at_once():
    """Four impossible combinations in one recipe: one error that lists all four (one run to clear them)."""
    t = tree(train__micro_batch_size="3", train__global_batch_size="8", train__micro_batch_tokens="16",
             train__max_length="64", peft__vision="true", freeze__vision_tower="true")
    del t["train"]["max_steps"]
    with pytest.raises(RecipeError) as e:
        build_recipe(t)
    msg = str(e.value)
    assert "4 problem(s)" in msg, msg
    for part in ("multiple of micro_batch_size", "micro_batch_tokens (16) must be at least train.max_length (64)",
                 "peft.vision=true puts adapters in the vision_tower", "max_steps or train.epochs"):
        assert part in msg, msg
