"""The README's headline quantities, on a shortened default run (fast; the full run is the slow
`tests/test_cli.py::test_default_run_meets_the_targets`).

`keras-lean run` with no options trains the built-in CNN on digits, prunes it to the default
recipe's target sparsity, validates it and exports TFLite. Shortened here (fewer epochs, TFLite
only, XLA off, few latency runs), the same quantities must hold: the pruned kernels reach the
target, the TFLite file gzips to at most a third of the baseline's, and the accuracy drop passes
the default gate.
"""

from __future__ import annotations

import dataclasses

import pytest

from keras_lean.pipeline import Recipe, recipe_to_yaml, report, run

# The README: "80.0 % of the pruned kernels zero, TFLite 3.85x smaller (gzip) than the baseline's
# float TFLite".
GZIP_RATIO_AT_MOST = 1 / 3


@pytest.fixture(scope="module")
def headline_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("headline") / "default"
    defaults = Recipe()
    short = defaults.replace(
        export=dataclasses.replace(defaults.export, formats=("tflite",), latency_runs=2)
    )
    recipe = folder.parent / "short.yaml"
    recipe.write_text(recipe_to_yaml(short))
    result = run(folder, baseline_epochs=4, epochs=2, jit_compile="off", recipe=recipe, verbose=0)
    return defaults, result, report(folder)


def test_the_pruned_kernels_reach_the_default_target(headline_run):
    defaults, _, rep = headline_run
    target = defaults.method_options["magnitude"].target_sparsity
    (method,) = defaults.methods
    assert method == "magnitude"
    assert rep.summary()["pruned_sparsity"]["magnitude"] >= target - 1e-6
    # Whole-model zeros: more than 3/4 of the target (biases and the 10-way head are small).
    assert rep.summary()["sparsity"] > 0.75 * target


def test_the_tflite_model_is_much_smaller_than_the_baselines(headline_run):
    _, result, rep = headline_run
    assert result.deploy is not None
    ratio = rep.summary()["tflite_gzip_ratio"]
    assert 0 < ratio <= GZIP_RATIO_AT_MOST


def test_the_accuracy_drop_passes_the_default_gate(headline_run):
    defaults, result, rep = headline_run
    v = rep.summary()["validation"]
    assert result.passed and v["passed"]
    assert v["max_accuracy_drop"] == defaults.max_accuracy_drop
    assert v["accuracy_drop"] <= defaults.max_accuracy_drop
    # The deployed TFLite model keeps the fine-tuned accuracy (the export changes nothing).
    assert rep.summary()["tflite_accuracy"] == pytest.approx(v["finetuned_accuracy"], abs=0.01)
    assert v["baseline_accuracy"] > 0.9  # a real baseline, not a degenerate one
