"""Tests of keras_lean/pipeline/methods/lowrank.py: options and the LowRankMethod steps."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_lean.lowrank import LowRankDense
from keras_lean.pipeline.methods import get_method_class
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.methods.lowrank import LowRankMethod, LowRankOptions


def _cnn():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def test_registry_and_contract():
    assert get_method_class("lowrank") is LowRankMethod
    assert (LowRankMethod.name, LowRankMethod.order) == ("lowrank", 20)
    assert LowRankMethod.options_class is LowRankOptions
    LowRankMethod.check_combination(["structured", "lowrank", "lora"])  # no clash


def test_options_defaults_and_round_trip():
    options = LowRankOptions.from_dict(None)
    assert options == LowRankOptions(version=1, rank=None, energy=0.9, filters=())
    parsed = LowRankOptions.from_dict({"rank": 4, "filters": ["fc"]})
    assert parsed.filters == ("fc",)
    assert LowRankOptions.from_dict(parsed.to_dict()) == parsed
    assert json.loads(json.dumps(parsed.to_dict())) == {
        "version": 1,
        "rank": 4,
        "energy": 0.9,
        "filters": ["fc"],
    }


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"rnk": 4},
            r"lowrank\.rnk: unknown key\. Allowed keys here: version, rank, energy, filters",
        ),
        ({"rank": 0}, r"lowrank\.rank: must be an int >= 1 or null\. Received: 0"),
        ({"energy": 2}, r"lowrank\.energy: must be in \(0, 1\]\. Received: 2"),
        ({"filters": [1]}, r"lowrank\.filters\[0\]: must be a string"),
        ({"version": 2}, r"lowrank\.version: must be 1"),
        ([1, 2], r"lowrank: must be a mapping of options"),
    ],
    ids=["unknown_key", "rank0", "energy", "filters", "version", "not_mapping"],
)
def test_options_errors(data, match):
    with pytest.raises(ValueError, match=match):
        LowRankOptions.from_dict(data)


def test_prepare_finetune_finalize(digits, tmp_path):
    x_train, y_train, x_val, y_val = digits
    data = Data(x_train, y_train, x_val, y_val, num_classes=10)
    plan = FinetunePlan(epochs=1, steps_per_epoch=4, batch_size=32)
    model = _cnn()
    method = LowRankMethod(LowRankOptions(rank=8, filters=("fc1",)))
    prepared = method.prepare(model, data, plan)
    assert isinstance(prepared.get_layer("fc1"), LowRankDense)
    assert isinstance(model.get_layer("fc1"), keras.layers.Dense)  # caller's model untouched
    assert method.callbacks(plan) == []
    # The factors are the best rank-8 approximation of the kernel (Eckart-Young): the error is
    # exactly the energy of the dropped singular values.
    kernel = model.get_layer("fc1").kernel.numpy()
    s = np.linalg.svd(kernel, compute_uv=False)
    factors = prepared.get_layer("fc1").kernel.numpy()
    np.testing.assert_allclose(
        np.linalg.norm(kernel - factors), np.sqrt(np.sum(s[8:] ** 2)), rtol=1e-3
    )
    prepared.compile("adam", "sparse_categorical_crossentropy")
    history = prepared.fit(x_train[:128], y_train[:128], batch_size=32, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    assert not np.allclose(prepared.get_layer("fc1").kernel.numpy(), factors)  # factors trained
    final = method.finalize(prepared)
    assert isinstance(final.get_layer("fc1"), LowRankDense)  # deployment form
    final.save(tmp_path / "final.keras")
    report = method.report()
    assert json.loads(json.dumps(report)) == report  # report.json holds it unchanged
    (entry,) = report["layers"]
    assert entry["path"] == "fc1" and entry["rank"] == 8 and entry["factorized"]
    assert report["params_after"] == 8 * (288 + 64) + 64
    assert report["options"]["rank"] == 8
