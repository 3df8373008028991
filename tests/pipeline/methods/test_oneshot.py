"""Tests of keras_lean/pipeline/methods/oneshot.py: options, steps and the five-step pipeline."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import yaml

from keras_lean.pipeline import configure, deploy, finetune, report
from keras_lean.pipeline.methods import get_method_class, method_names
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.methods.oneshot import OneshotMethod, OneshotOptions
from keras_lean.pipeline.options import parse_section
from keras_lean.pipeline.rundir import RunDir
from keras_lean.sparsity import check_m_by_n


def _mlp():
    inputs = keras.Input((12,))
    x = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def _data(n=48):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 12)).astype("float32")
    y = rng.integers(0, 3, n).astype("int32")
    return Data(x, y, x[:16], y[:16], num_classes=3)


def test_registered_with_its_contract():
    assert "oneshot" in method_names()
    assert get_method_class("oneshot") is OneshotMethod
    assert OneshotMethod.target_option == "sparsity"
    assert OneshotMethod.with_target(OneshotOptions(), 0.7).sparsity == 0.7
    OneshotMethod.check_combination(["structured", "oneshot"])


@pytest.mark.parametrize("other", ["lora", "magnitude", "lottery"])
def test_refused_combinations(other):
    with pytest.raises(ValueError, match=rf"'oneshot' cannot be combined with '{other}'"):
        OneshotMethod.check_combination(["oneshot", other])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"criterion": "obs"}, r"oneshot\.criterion: must be one of"),
        ({"sparsity": 1.0}, r"oneshot\.sparsity: must be"),
        ({"m_by_n": [4, 2]}, r"oneshot\.m_by_n: must be \[m, n\] with 0 < m < n"),
        ({"calibration_samples": 0}, r"oneshot\.calibration_samples: must be an int >= 1"),
        ({"sparsty": 0.5}, r"oneshot\.sparsty: unknown key"),
    ],
    ids=["criterion", "sparsity", "m_by_n", "samples", "unknown"],
)
def test_option_errors(data, match):
    with pytest.raises(ValueError, match=match):
        parse_section(OneshotOptions, data, "oneshot")


def test_prepare_prunes_and_fit_holds_the_zeros():
    data, plan = _data(), FinetunePlan(epochs=2, steps_per_epoch=3, batch_size=16)
    model = _mlp()
    method = OneshotMethod(OneshotOptions(criterion="sparsegpt", m_by_n=(2, 4), exclude=("head",)))
    pruned = method.prepare(model, data, plan)
    assert np.all(model.get_layer("fc1").kernel.numpy() != 0)  # caller's model untouched
    assert check_m_by_n(pruned)["fc1"] and not check_m_by_n(pruned)["head"]
    zeros = pruned.get_layer("fc1").kernel.numpy() == 0
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(data.x_train, data.y_train, epochs=2, verbose=0, callbacks=method.callbacks(plan))
    kernel = pruned.get_layer("fc1").kernel.numpy()
    assert np.all(kernel[zeros] == 0) and np.all(kernel[~zeros] != 0)
    rep = method.report()
    assert [r["name"] for r in rep["oneshot"]["layers"]] == ["fc1"]
    lines = OneshotMethod.report_lines(rep)
    assert lines[0].startswith("one-shot sparsegpt 2:4: 1 projections, sparsity 50.0%")


def test_bad_pattern_is_a_recipe_error():
    method = OneshotMethod(OneshotOptions(include=("nothing",)))
    with pytest.raises(
        ValueError, match=r"oneshot\.include: pattern 'nothing' matches no Dense.*fc1"
    ):
        method.prepare(_mlp(), _data(), FinetunePlan(1, 3, 16))


@pytest.mark.parametrize("tune", [True, False], ids=["finetune", "no-finetune"])
def test_five_steps(trained_run, tune):
    run = RunDir(trained_run)
    configure(run, methods=["oneshot"], epochs=1, jit_compile="off", force=True)
    text = yaml.safe_load(run.recipe.read_text())
    text["oneshot"].update({"criterion": "wanda", "sparsity": 0.6, "finetune": tune})
    run.recipe.write_text(yaml.safe_dump(text))
    ft = finetune(run, verbose=0)
    shot = ft.entry["details"]["methods"]["oneshot"]
    assert shot["oneshot"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    d = deploy(run, quantization="none")
    final = d.entry["details"]["methods"]["oneshot"]["final"]
    dense_layers = [n for n in shot["oneshot"]["layers"]]
    assert dense_layers
    plain = keras.models.load_model(d.artifacts["keras"])
    for row in shot["oneshot"]["layers"]:
        kernel = plain.get_layer(row["name"].split("/")[-1]).kernel.numpy()
        assert np.mean(kernel == 0) == pytest.approx(0.6, abs=0.01), row["name"]
    assert final["sparsity"] > 0
    assert "one-shot wanda 60%" in report(run).table()
