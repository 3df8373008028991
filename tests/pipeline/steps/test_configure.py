"""`configure`'s argument handling (the recipe work itself is tested in test_steps.py)."""

from __future__ import annotations

import pytest

from keras_lean.pipeline import RecipeOverrides, configure, run


@pytest.mark.parametrize("step", [configure, run], ids=["configure", "run"])
def test_overrides_and_keywords_do_not_mix(tmp_path, step):
    with pytest.raises(TypeError, match="either as overrides= or as keywords, not both"):
        step(tmp_path, overrides=RecipeOverrides(epochs=1), epochs=2)


@pytest.mark.parametrize("step", [configure, run], ids=["configure", "run"])
def test_an_unknown_keyword_is_named(tmp_path, step):
    with pytest.raises(TypeError, match="Unknown recipe override 'target'"):
        step(tmp_path, target=0.5)
