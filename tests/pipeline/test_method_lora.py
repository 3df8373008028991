"""Tests of keras_lean/pipeline/methods/lora.py: options, combinations and the LoraMethod steps."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_lean.lowrank import lora_layers
from keras_lean.pipeline.methods import get_method_class
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.methods.lora import LoraMethod, LoraOptions


def _cnn():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def _data(digits):
    x_train, y_train, x_val, y_val = digits
    return Data(x_train, y_train, x_val, y_val, num_classes=10)


def test_registry_and_contract():
    assert get_method_class("lora") is LoraMethod
    assert (LoraMethod.name, LoraMethod.order) == ("lora", 40)
    assert LoraMethod.options_class is LoraOptions


def test_options_defaults_and_round_trip():
    assert LoraOptions.from_dict({}) == LoraOptions(
        rank=8, alpha=None, targets=(), keep_trainable=()
    )
    parsed = LoraOptions.from_dict({"rank": 4, "alpha": 16, "targets": "query|value"})
    assert parsed.targets == ("query|value",)
    assert LoraOptions.from_dict(parsed.to_dict()) == parsed
    assert json.dumps(parsed.to_dict())


@pytest.mark.parametrize(
    "data, match",
    [
        ({"rnak": 4}, r"Unknown key lora.rnak. Allowed: version, rank, alpha, targets"),
        ({"x": 1, "y": 2}, r"Unknown key lora.x \(and lora.y\)"),
        ({"rank": 0}, r"`lora.rank` must be a positive integer. Received: rank=0"),
        ({"rank": True}, r"`lora.rank` must be a positive integer. Received: rank=True"),
        ({"alpha": -1}, r"`lora.alpha` must be a positive number or null. Received: alpha=-1"),
        ({"targets": [3]}, r"`lora.targets` must be a list of regex strings"),
        ({"keep_trainable": {"a": 1}}, r"`lora.keep_trainable` must be a list of regex strings"),
    ],
    ids=["unknown_key", "two_unknown", "rank0", "rank_bool", "alpha", "targets", "keep"],
)
def test_options_errors(data, match):
    with pytest.raises(ValueError, match=match):
        LoraOptions.from_dict(data)


@pytest.mark.parametrize("other", ["magnitude", "movement", "lottery"])
def test_lora_refuses_unstructured_sparsity(other):
    with pytest.raises(ValueError, match=rf"Methods '{other}' and 'lora' cannot be combined: .*"
                       r"refills the zeros"):  # fmt: skip
        LoraMethod.check_combination([other, "lora"])


@pytest.mark.parametrize("names", [["lora"], ["structured", "lora"], ["lowrank", "lora"],
                                   ["magnitude"]])  # fmt: skip
def test_lora_allowed_combinations(names):
    LoraMethod.check_combination(names)  # does not raise


def test_prepare_finetune_finalize(digits, tmp_path):
    data = _data(digits)
    plan = FinetunePlan(epochs=1, steps_per_epoch=4, batch_size=32)
    model = _cnn()
    method = LoraMethod(LoraOptions(rank=4, alpha=8))
    prepared = method.prepare(model, data, plan)
    assert [layer.name for layer in lora_layers(prepared)] == ["fc1", "head"]
    assert not lora_layers(model)
    prepared.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    prepared.fit(data.x_train[:128], data.y_train[:128], batch_size=32, epochs=1, verbose=0)
    y_lora = prepared.predict(data.x_val[:16], verbose=0)
    assert np.abs(y_lora - model.predict(data.x_val[:16], verbose=0)).max() > 1e-4
    final = method.finalize(prepared)
    assert not lora_layers(final)
    np.testing.assert_allclose(final.predict(data.x_val[:16], verbose=0), y_lora, atol=1e-5)
    final.save(tmp_path / "final.keras")
    report = method.report()
    json.dumps(report)
    assert (
        report["trainable_params"]
        == report["adapter_params"]
        == (288 * 4 + 4 * 32) + (32 * 4 + 4 * 10)
    )
    assert report["trainable_params"] < report["trainable_params_before"]
    assert report["merged_layers"] == 2
    assert [entry["path"] for entry in report["layers"]] == ["fc1", "head"]


def test_prepare_on_tiny_bert_targets_attention():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=2, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32,
                                             max_sequence_length=8)  # fmt: skip
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    method = LoraMethod(LoraOptions(rank=2, keep_trainable=("logits",)))
    dummy = np.zeros((1,), "float32")
    prepared = method.prepare(classifier, Data(dummy, dummy, dummy, dummy, 2),
                              FinetunePlan(1, 1, 1))  # fmt: skip
    paths = sorted(layer.path.rsplit("/", 1)[1] for layer in lora_layers(prepared))
    assert paths == ["query", "query", "value", "value"]
    assert method.report()["trainable_params"] == 4 * (16 * 2 * 2 + 2 * 8) + 16 * 2 + 2
