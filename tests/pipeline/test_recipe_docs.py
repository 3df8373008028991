"""docs/recipe.md: every complete recipe it shows (a YAML block with `version`) loads as written,
and the top-level table lists every registered method."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from keras_lean.pipeline.methods import method_names
from keras_lean.pipeline.recipe import Recipe

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "recipe.md").read_text()
RECIPES = [
    block
    for block in re.findall(r"```yaml\n(.*?)```", DOC, flags=re.S)
    if "version" in (yaml.safe_load(block) or {})
]


def test_the_doc_shows_complete_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("index", range(len(RECIPES)), ids=lambda i: f"recipe-{i}")
def test_each_recipe_block_loads(index):
    recipe = Recipe.from_dict(yaml.safe_load(RECIPES[index]))
    assert recipe.methods


def test_the_methods_row_lists_every_registered_method():
    (row,) = [line for line in DOC.splitlines() if line.startswith("| `methods` |")]
    listed = set(re.findall(r"`(\w+)`", row.split("|")[3]))
    assert set(method_names()) <= listed, sorted(set(method_names()) - listed)
