"""`RecipeOverrides`: one object for every recipe field the CLI, `configure` and `run` set."""

from __future__ import annotations

import dataclasses

import pytest

from keras_lean.pipeline import Recipe
from keras_lean.pipeline.methods import get_method_class, method_names
from keras_lean.pipeline.overrides import RecipeOverrides


def test_empty_overrides_leave_the_recipe_as_it_is():
    rec = Recipe()
    assert RecipeOverrides().is_empty()
    assert RecipeOverrides().apply(rec) is rec


def test_every_field_lands_in_its_recipe_field():
    o = RecipeOverrides(
        methods=("magnitude",),
        target_sparsity=0.6,
        epochs=3,
        batch_size=16,
        learning_rate=0.01,
        jit_compile="off",
        mixed_precision=True,
        quantization="int8",
        max_accuracy_drop=0.05,
    )
    rec = o.apply(Recipe())
    assert rec.methods == ("magnitude",)
    assert rec.method_options["magnitude"].target_sparsity == 0.6
    ft = rec.finetune
    assert (ft.epochs, ft.batch_size, ft.learning_rate) == (3, 16, 0.01)
    assert (ft.jit_compile, ft.mixed_precision) == ("off", True)
    assert rec.export.quantization == "int8" and rec.max_accuracy_drop == 0.05
    # The other fields keep the recipe's values.
    assert rec.finetune.early_stopping == Recipe().finetune.early_stopping
    assert rec.export.formats == Recipe().export.formats


def _targetable() -> list[str]:
    return [n for n in method_names() if get_method_class(n).target_option is not None]


@pytest.mark.parametrize("name", _targetable(), ids=str)
def test_target_sparsity_sets_each_methods_own_target_option(name):
    cls = get_method_class(name)
    default = getattr(cls.options_class(), cls.target_option)
    target = 0.4 if default != pytest.approx(0.4) else 0.3
    rec = RecipeOverrides(methods=(name,), target_sparsity=target).apply(Recipe())
    assert getattr(rec.method_options[name], cls.target_option) == pytest.approx(target)


def test_structured_target_is_the_channel_ratio():
    # issue 12 item 4: --target-sparsity on structured means the channel ratio.
    rec = RecipeOverrides(methods=("structured",), target_sparsity=0.3).apply(Recipe())
    assert rec.method_options["structured"].ratio == 0.3


def test_target_sparsity_with_no_targetable_method_is_an_error():
    untargetable = [n for n in method_names() if n not in _targetable()]
    if not untargetable:
        pytest.skip("every registered method has a target option")
    with pytest.raises(ValueError, match="none of the methods .* has a target option"):
        RecipeOverrides(methods=(untargetable[0],), target_sparsity=0.5).apply(Recipe())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 0, r"finetune\.epochs"),
        ("quantization", "int4", r"quantization"),
        ("max_accuracy_drop", 2.0, r"max_accuracy_drop"),
        ("methods", ("no-such-method",), r"no-such-method"),
    ],
    ids=["epochs", "quantization", "max-drop", "method"],
)
def test_bad_values_fail_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        RecipeOverrides(**{field: value}).apply(Recipe())


def test_from_kwargs_names_an_unknown_keyword():
    assert RecipeOverrides.from_kwargs(epochs=2) == RecipeOverrides(epochs=2)
    with pytest.raises(TypeError, match="Unknown recipe override 'epoch'"):
        RecipeOverrides.from_kwargs(epoch=2)


def test_methods_are_normalized_and_the_object_is_frozen():
    assert RecipeOverrides(methods=["magnitude"]).methods == ("magnitude",)
    assert RecipeOverrides(methods="magnitude").methods == ("magnitude",)
    assert RecipeOverrides(methods=[]).methods is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        RecipeOverrides().epochs = 3  # type: ignore[misc]
