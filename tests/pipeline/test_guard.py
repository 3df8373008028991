"""Accuracy-guarded gradual pruning (`recipe.guard`): options, stage logic, and the pipeline."""

from __future__ import annotations

import re

import keras
import pytest
import yaml

from keras_lean.pipeline import Recipe, configure, finetune, load_recipe, report, validate
from keras_lean.pipeline.guard import run_stages
from keras_lean.pipeline.methods.base import Data
from keras_lean.pipeline.methods.magnitude import MagnitudeMethod, PruningOptions
from keras_lean.pipeline.recipe import GuardOptions
from keras_lean.pipeline.rundir import RunDir
from keras_lean.sparsity import sparsity_report, strip_pruning


def _recipe(**extra):
    return Recipe.from_dict({"version": 1, "methods": ["magnitude"], **extra})


def test_off_by_default_and_round_trips(tmp_path):
    assert not Recipe().guard.enabled
    r = _recipe(guard={"stages": [0.3, 0.5], "epochs_per_stage": 2})
    assert r.guard == GuardOptions(stages=(0.3, 0.5), epochs_per_stage=2) and r.guard.enabled
    assert GuardOptions.from_dict(r.guard.to_dict()) == r.guard


@pytest.mark.parametrize(
    "guard, match",
    [
        ({"stages": [0.5, 0.3]}, r"guard\.stages: must be strictly increasing"),
        ({"stages": [0.3, 0.3]}, r"guard\.stages: must be strictly increasing"),
        ({"stages": [0.0, 0.5]}, r"guard\.stages\[0\]: must be in \(0, 1\)"),
        ({"stages": [0.5, 1.0]}, r"guard\.stages\[1\]: must be in \(0, 1\)"),
        ({"stages": 0.5}, r"guard\.stages: must be a list"),
        ({"stages": ["a"]}, r"guard\.stages\[0\]: must be a number"),
        ({"stages": [0.5], "epochs_per_stage": 0}, r"guard\.epochs_per_stage: must be"),
        ({"stagse": [0.5]}, r"guard\.stagse: unknown key"),
    ],
    ids=["decreasing", "equal", "zero", "one", "scalar", "string", "epochs", "typo"],
)
def test_bad_guard_names_the_field(guard, match):
    with pytest.raises(ValueError, match=match):
        _recipe(guard=guard)


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"methods": ["structured"]}, r"guard: cannot be combined with method 'structured'"),
        ({"methods": ["lottery"]}, r"guard: cannot be combined with method 'lottery'"),
        ({"methods": ["lowrank"]}, r"guard: cannot be combined with method 'lowrank'"),
        (
            {"magnitude": {"m_by_n": [2, 4]}},
            r"magnitude\.m_by_n: cannot be combined with guard\.stages",
        ),
        (
            {"magnitude": {"overrides": {"dense*": {"target_sparsity": 0.9}}}},
            r"magnitude\.overrides\.dense\*\.target_sparsity: cannot be combined",
        ),
        (
            {"finetune": {"early_stopping": {"enabled": True}}},
            r"finetune\.early_stopping\.enabled: cannot be combined with guard",
        ),
    ],
    ids=["structured", "lottery", "lowrank", "m_by_n", "override-target", "early-stopping"],
)
def test_refused_combinations(recipe, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(
            {"version": 1, "methods": ["magnitude"], "guard": {"stages": [0.5]}, **recipe}
        )


def _tiny(digits, n=128):
    x_train, y_train, x_val, y_val = digits
    data = Data(x_train[:n].reshape(n, -1), y_train[:n], x_val[:64].reshape(64, -1), y_val[:64], 10)
    inputs = keras.Input((64,))
    x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))

    def fit(m, epochs=None, callbacks=()):
        m.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return m.fit(
            data.x_train, data.y_train, epochs=epochs, callbacks=list(callbacks), verbose=0
        )

    return data, model, fit


@pytest.mark.parametrize(
    "accuracies, kept, reason",
    [
        (
            [0.95, 0.94, 0.80],
            2,
            r"stage 3 \(sparsity 0\.8\) dropped 0\.1500 .*rolled back to stage 2",
        ),
        ([0.90], None, r"no stage within budget: stage 1 .*rolled back to the baseline weights"),
        ([0.95, 0.95, 0.94], 3, r"all 3 stages within max_accuracy_drop 0\.02; kept the last"),
    ],
    ids=["rolls-back", "none-within", "all-within"],
)
def test_run_stages_keeps_the_last_stage_within_budget(digits, accuracies, kept, reason):
    data, model, fit = _tiny(digits)
    seen = []

    def evaluate(m):  # each stage "measures" the next accuracy of the list
        seen.append(m)
        return accuracies[len(seen) - 1]

    out = run_stages(
        model,
        MagnitudeMethod(PruningOptions()),
        data,
        guard=GuardOptions(stages=(0.3, 0.5, 0.8), epochs_per_stage=1),
        steps_per_epoch=4,
        batch_size=32,
        fit=fit,
        evaluate=evaluate,
        baseline_accuracy=0.95,
        max_accuracy_drop=0.02,
    )
    runs = len(accuracies)
    assert len(out.stages) == runs == len(seen)  # stopped at the first stage over budget
    assert out.kept_stage == kept
    assert [r["kept"] for r in out.stages] == [i + 1 == kept for i in range(runs)]
    assert out.stages[-1]["within_budget"] is (kept == runs)
    assert out.epochs_run == runs
    assert re.search(reason, out.reason), out.reason
    assert out.to_dict()["kept_stage"] == kept
    if kept is None:
        assert out.model is model  # the baseline weights: nothing pruned
        assert out.method.options.target_sparsity == PruningOptions().target_sparsity
    else:
        assert out.model is seen[kept - 1]  # the kept stage's own model, not a later one
        target = out.stages[kept - 1]["target_sparsity"]
        measured = sparsity_report(strip_pruning(out.model)).sparsity
        assert measured == pytest.approx(target, abs=0.02)
        assert out.stages[kept - 1]["sparsity"] == pytest.approx(measured)
        assert out.method.options.target_sparsity == target
    # Every stage after the first starts from the previous stage's zeros (sparsity only grows).
    measured_all = [r["sparsity"] for r in out.stages]
    assert measured_all == sorted(measured_all)


def test_guarded_finetune_through_the_pipeline(trained_run):
    run = RunDir(trained_run)
    configure(run, jit_compile="off", force=True)
    text = yaml.safe_load(run.recipe.read_text())
    # 0.3 keeps the accuracy of the tiny CNN; 0.995 leaves too few weights to classify.
    text["guard"] = {"stages": [0.3, 0.995, 0.998], "epochs_per_stage": 1}
    text["max_metric_drop"]["accuracy"] = 0.05
    run.recipe.write_text(yaml.safe_dump(text))
    assert load_recipe(run.recipe).guard.stages == (0.3, 0.995, 0.998)

    ft = finetune(run, verbose=0)
    guard = ft.entry["details"]["guard"]
    rows = guard["stages"]
    assert len(rows) == 2, "the run stops at the first stage over budget"
    assert rows[0]["within_budget"] and not rows[1]["within_budget"]
    assert guard["kept_stage"] == 1 and guard["kept_target_sparsity"] == 0.3
    assert rows[1]["accuracy_drop"] > 0.05 >= rows[0]["accuracy_drop"]
    assert all(r["energy_j"] > 0 for r in rows)
    assert rows[1]["sparsity"] == pytest.approx(0.995, abs=0.002)
    assert "rolled back to stage 1" in guard["reason"]
    assert ft.entry["details"]["epochs_run"] == 2
    # The saved model is stage 1's: its sparsity and accuracy, and validate agrees.
    assert ft.entry["details"]["methods"]["magnitude"]["final"]["sparsity"] == pytest.approx(
        0.3, abs=0.01
    )
    assert ft.entry["accuracy"] == pytest.approx(rows[0]["val_accuracy"])
    v = validate(run)
    assert v.passed and v.accuracy_drop == pytest.approx(rows[0]["accuracy_drop"], abs=1e-6)
    assert v.baseline_accuracy == pytest.approx(guard["baseline_accuracy"])
    table = report(run).table()
    assert "guard stages (baseline accuracy" in table
    assert "kept: stage 2 (sparsity 0.995) dropped" in table
    rows_text = [line.split() for line in table.split("guard stages", 1)[1].splitlines()]
    stage_rows = [r for r in rows_text if r[:1] in (["1"], ["2"])]
    assert stage_rows[0][:2] == ["1", "0.3"] and stage_rows[0][-1] == "kept"
    assert stage_rows[1][:2] == ["2", "0.995"] and stage_rows[1][-1] == "over"
