"""The `lottery` recipe method: options, combinations, and a run through the pipeline steps."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import yaml

from keras_lean.pipeline import Recipe, configure, deploy, finetune, report, validate
from keras_lean.pipeline.methods import get_method_class
from keras_lean.pipeline.methods.base import FinetunePlan
from keras_lean.pipeline.methods.lottery import LotteryMethod, LotteryOptions
from keras_lean.pipeline.rundir import RunDir
from keras_lean.sparsity import PruneLowMagnitude


def test_registered_ordered_and_defaults_round_trip():
    assert get_method_class("lottery") is LotteryMethod
    assert LotteryMethod.order == 35 and LotteryMethod.options_class is LotteryOptions
    options = LotteryOptions()
    assert options.final_sparsity == pytest.approx(0.75)
    assert LotteryOptions.from_dict(options.to_dict()) == options
    parsed = Recipe.from_dict({"version": 1, "methods": ["lottery"], "lottery": {"rate": 0.2}})
    assert parsed.method_options["lottery"].rate == 0.2


@pytest.mark.parametrize(
    "section, match",
    [
        ({"rounds": 0}, r"lottery\.rounds: must be an int >= 1"),
        ({"rounds": -2}, r"lottery\.rounds: must be an int >= 1"),
        ({"rate": 0.0}, r"lottery\.rate: must be in \(0, 1\)"),
        ({"rate": 1.0}, r"lottery\.rate: must be in \(0, 1\)"),
        ({"rewind_step": -1}, r"lottery\.rewind_step: must be an int >= 0"),
        ({"scope": "per-layer"}, r"lottery\.scope: must be one of layerwise, global"),
        ({"epochs_per_round": 0}, r"lottery\.epochs_per_round: must be"),
        ({"rouds": 2}, r"lottery\.rouds: unknown key"),
    ],
    ids=["rounds-0", "rounds-neg", "rate-0", "rate-1", "rewind-neg", "scope", "epochs", "typo"],
)
def test_options_errors_name_the_recipe_field(section, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"version": 1, "methods": ["lottery"], "lottery": section})


@pytest.mark.parametrize("other", ["magnitude", "movement", "lora"])
def test_refuses_combinations_naming_both(other):
    with pytest.raises(ValueError, match=rf"methods: '(lottery|{other})' cannot be combined with"):
        Recipe.from_dict({"version": 1, "methods": ["lottery", other]})
    with pytest.raises(ValueError, match=rf"'lottery'.*'{other}'|'{other}'.*'lottery'"):
        Recipe.from_dict({"version": 1, "methods": [other, "lottery"]})


def test_rewind_step_beyond_round_zero_is_refused_before_training():
    method = LotteryMethod(LotteryOptions(rewind_step=21, epochs_per_round=2))
    plan = FinetunePlan(epochs=4, steps_per_epoch=10, batch_size=32)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="d")(inputs))
    with pytest.raises(ValueError, match=r"lottery\.rewind_step: .* at most 20"):
        method.prepare(model, None, plan)
    LotteryMethod(LotteryOptions(rewind_step=20, epochs_per_round=2)).prepare(model, None, plan)
    with pytest.raises(ValueError, match=r"lottery\.include: pattern 'dns\*'"):
        LotteryMethod(LotteryOptions(include=("dns*",))).prepare(model, None, plan)


def test_lottery_through_finetune_validate_deploy_and_report(trained_run):
    run = RunDir(trained_run)
    configure(run, methods=["lottery"], jit_compile="off", force=True)
    text = yaml.safe_load(run.recipe.read_text())
    text["lottery"].update({"rounds": 2, "rate": 0.5, "epochs_per_round": 1, "rewind_step": 3})
    text["export"].update({"formats": ["tflite"], "compare_baseline": False})
    text["max_metric_drop"]["accuracy"] = 1.0
    run.recipe.write_text(yaml.safe_dump(text))

    ft = finetune(run, verbose=0)
    rep = ft.entry["details"]["methods"]["lottery"]
    assert [r["index"] for r in rep["rounds"]] == [0, 1, 2]
    assert [r["sparsity"] for r in rep["rounds"]] == pytest.approx([0.0, 0.5, 0.75], abs=0.01)
    assert all(r["energy_j"] > 0 and 0 <= r["val_accuracy"] <= 1 for r in rep["rounds"])
    assert rep["rewind_step"] == 3 and ft.entry["details"]["epochs_run"] == 3
    assert rep["final"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    finetuned = keras.models.load_model(run.finetuned)
    assert any(isinstance(layer, PruneLowMagnitude) for layer in finetuned.layers)

    validate(run)
    d = deploy(run)
    plain = keras.models.load_model(d.artifacts["keras"])
    assert not any(isinstance(layer, PruneLowMagnitude) for layer in plain.layers)
    kernel = plain.get_layer("dense1").kernel.numpy()
    assert np.mean(kernel == 0) == pytest.approx(0.75, abs=0.01)
    # The rounds recorded at finetune are in the deploy entry too (deploy's instance is fresh).
    deployed = d.entry["details"]["methods"]["lottery"]
    assert len(deployed["rounds"]) == 3
    assert deployed["final"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    table = report(run).table()
    assert "lottery rounds (rewind_step 3, scope layerwise)" in table
    assert "75.0%" in table

    # A rewind step past round 0 fails before training and loses nothing.
    before = run.finetuned.read_bytes(), run.report_file.read_text()
    text["lottery"]["rewind_step"] = 10_000
    run.recipe.write_text(yaml.safe_dump(text))
    with pytest.raises(ValueError, match=r"lottery\.rewind_step: must be within round 0"):
        finetune(run, verbose=0)
    assert (run.finetuned.read_bytes(), run.report_file.read_text()) == before
