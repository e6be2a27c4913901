"""Every shipped recipe validates against the schema (nothing is downloaded)."""

from pathlib import Path

import pytest

from vlmtune.config import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.model.name_or_path and recipe.data.train.source
