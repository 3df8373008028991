"""The `movement` and `soft_movement` recipe methods: options, combinations, guard, sweep."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from keras_lean.pipeline.methods import FinetunePlan, get_method_class
from keras_lean.pipeline.methods.base import Data
from keras_lean.pipeline.methods.magnitude import MovementMethod, MovementOptions
from keras_lean.pipeline.methods.soft_movement import SoftMovementMethod, SoftMovementOptions
from keras_lean.pipeline.models import build_model
from keras_lean.pipeline.recipe import Recipe, RecipeError
from keras_lean.pipeline.sweep import default_methods, sweep_points


def test_recipe_parses_both_movement_variants():
    recipe = Recipe.from_dict(
        {
            "version": 1,
            "methods": ["soft_movement"],
            "soft_movement": {"threshold": 0.2, "l1_coefficient": 3, "score_lr_multiplier": 50},
        }
    )
    options = recipe.method_options["soft_movement"]
    assert isinstance(options, SoftMovementOptions)
    assert options.criterion_options() == {
        "score_lr_multiplier": 50.0,
        "threshold": 0.2,
        "l1_coefficient": 3.0,
    }
    hard = Recipe.from_dict(
        {"version": 1, "methods": ["movement"], "movement": {"score_init": "zeros"}}
    )
    assert hard.method_options["movement"].criterion_options() == {"score_init": "zeros"}
    assert MovementOptions().criterion_options() == {}
    assert get_method_class("soft_movement") is SoftMovementMethod


@pytest.mark.parametrize(
    "section,match",
    [
        ({"threshold": 1.5}, r"soft_movement\.threshold: .*\(0, 1\)"),
        ({"l1_coefficient": -1}, r"soft_movement\.l1_coefficient: "),
        ({"score_lr_multiplier": 0}, r"soft_movement\.score_lr_multiplier: "),
        ({"m_by_n": [2, 4]}, r"soft_movement\.m_by_n: cannot be used with soft_movement"),
        ({"score_init": "random"}, r"soft_movement\.score_init: "),
    ],
    ids=["threshold", "l1", "lr", "m-by-n", "init"],
)
def test_soft_movement_section_errors(section, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"version": 1, "methods": ["soft_movement"], "soft_movement": section})


@pytest.mark.parametrize("other", ["magnitude", "movement", "lora", "lottery"])
def test_soft_movement_combinations_are_refused(other):
    with pytest.raises(RecipeError, match=r"'soft_movement' cannot be combined with"):
        Recipe.from_dict({"version": 1, "methods": ["soft_movement", other]})


def test_guard_stages_both_movement_variants_and_refuses_a_fixed_threshold():
    for method in ("movement", "soft_movement"):
        Recipe.from_dict({"version": 1, "methods": [method], "guard": {"stages": [0.5, 0.8]}})
    with pytest.raises(RecipeError, match=r"soft_movement\.threshold: is set \(0\.2\).*guard"):
        Recipe.from_dict(
            {
                "version": 1,
                "methods": ["soft_movement"],
                "soft_movement": {"threshold": 0.2},
                "guard": {"stages": [0.5, 0.8]},
            }
        )


def test_sweep_and_target_set_soft_movement_target_sparsity():
    assert "movement" in default_methods() and "soft_movement" not in default_methods()
    points = sweep_points(["movement", "soft_movement"], {"soft_movement": [0.5, 0.9]})
    assert ("soft_movement", 0.5) in points and ("soft_movement", 0.9) in points
    assert SoftMovementMethod.target_option == "target_sparsity"
    options = SoftMovementMethod.with_target(SoftMovementOptions(), 0.3)
    assert options.target_sparsity == 0.3 and options.threshold is None
    fixed = dataclasses.replace(SoftMovementOptions(), threshold=0.2)
    with pytest.raises(RecipeError, match=r"soft_movement\.threshold: .*cannot be set"):
        SoftMovementMethod.with_target(fixed, 0.3)


@pytest.mark.parametrize(
    "method_cls,section",
    [
        (MovementMethod, {"score_lr_multiplier": 5.0}),
        (SoftMovementMethod, {"threshold": 0.2, "l1_coefficient": 2.0}),
    ],
    ids=["movement", "soft_movement"],
)
def test_prepare_passes_the_movement_options_to_the_wrappers(digits, method_cls, section):
    from keras_lean.sparsity import pruning_wrappers

    x_train, y_train, x_val, y_val = digits
    data = Data(x_train[:64], y_train[:64], x_val[:32], y_val[:32], 10)
    plan = FinetunePlan(epochs=2, steps_per_epoch=4, batch_size=16)
    options = dataclasses.replace(
        method_cls.options_class(), target_sparsity=0.6, exclude=("output",), **section
    )
    method = method_cls(options)
    wrapped = method.prepare(build_model("mlp", (8, 8, 1), 10), data, plan)
    wrappers = pruning_wrappers(wrapped)
    assert len(wrappers) == 2
    for wrapper in wrappers:
        assert wrapper.criterion == method_cls.criterion
        for key, value in section.items():
            assert getattr(wrapper.movement, key) == value
    wrapped.compile("adam", "sparse_categorical_crossentropy")
    wrapped.fit(data.x_train, data.y_train, batch_size=16, epochs=2, verbose=0)
    final = method.finalize(wrapped)
    np.testing.assert_allclose(
        final.predict(data.x_val, verbose=0), wrapped.predict(data.x_val, verbose=0), atol=1e-5
    )
    report = method.report()
    assert report["criterion"] == method_cls.criterion
    assert report["movement"]["criterion"] == method_cls.criterion
    for key, value in section.items():
        assert report["movement"][key] == value


def test_guard_runs_soft_movement_stages_to_their_targets(digits):
    import keras

    from keras_lean.pipeline.guard import run_stages
    from keras_lean.pipeline.recipe import GuardOptions

    x_train, y_train, x_val, y_val = digits
    x_train, x_val = x_train[:96].reshape(96, -1), x_val[:32].reshape(32, -1)
    data = Data(x_train, y_train[:96], x_val, y_val[:32], 10)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(hidden))

    def fit(m, epochs=None, callbacks=()):
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m.fit(data.x_train, data.y_train, batch_size=32, epochs=epochs, verbose=0)

    out = run_stages(
        model,
        SoftMovementMethod(SoftMovementOptions()),
        data,
        guard=GuardOptions(stages=(0.5, 0.75), epochs_per_stage=1),
        steps_per_epoch=3,
        batch_size=32,
        fit=fit,
        evaluate=lambda m: 0.9,
        baseline_accuracy=0.9,
        max_accuracy_drop=0.01,
    )
    assert out.kept_stage == 2 and isinstance(out.method, SoftMovementMethod)
    for row in out.stages:  # the pruned layers reach each stage's target
        assert row["sparsity"] == pytest.approx(row["target_sparsity"], abs=0.01)
    final = out.method.report()["final"]["layers"]
    assert set(final) == {"hidden", "logits"}
    assert all(v == pytest.approx(0.75, abs=0.01) for v in final.values())


def test_report_says_the_sparsity_a_fixed_threshold_reached():
    report = {
        "target_sparsity": 0.8,
        "movement": {"threshold": 0.2},
        "final": {"sparsity": 0.4321},
    }
    (line,) = SoftMovementMethod.report_lines(report)
    assert "fixed threshold 0.2: reached sparsity 43.2%" in line and "80%" in line
    assert SoftMovementMethod.report_lines({**report, "movement": {"threshold": None}}) == []
