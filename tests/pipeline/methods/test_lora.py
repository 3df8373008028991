"""Tests of keras_lean/pipeline/methods/lora.py: options, combinations and the LoraMethod steps."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_lean.lowrank import lora_layers
from keras_lean.pipeline.methods import get_method_class
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.methods.lora import LoraMethod, LoraOptions, default_targets
from keras_lean.pipeline.options import RecipeError


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
    assert json.loads(json.dumps(parsed.to_dict())) == {
        "version": 1,
        "rank": 4,
        "alpha": 16.0,
        "targets": ["query|value"],
        "keep_trainable": [],
    }


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"rnak": 4},
            r"lora\.rnak: unknown key\. Allowed keys here: version, rank, alpha, targets",
        ),
        ({"x": 1, "y": 2}, r"lora\.x: unknown key \(and y\)"),
        ({"rank": 0}, r"lora\.rank: must be an int >= 1\. Received: 0"),
        ({"rank": True}, r"lora\.rank: must be an int >= 1\. Received: True"),
        ({"alpha": -1}, r"lora\.alpha: must be a number > 0 or null\. Received: -1"),
        ({"targets": [3]}, r"lora\.targets\[0\]: must be a string"),
        ({"keep_trainable": {"a": 1}}, r"lora\.keep_trainable: must be a list of regexes"),
    ],
    ids=["unknown_key", "two_unknown", "rank0", "rank_bool", "alpha", "targets", "keep"],
)
def test_options_errors(data, match):
    with pytest.raises(ValueError, match=match):
        LoraOptions.from_dict(data)


@pytest.mark.parametrize("other", ["magnitude", "movement", "lottery"])
def test_lora_refuses_unstructured_sparsity(other):
    with pytest.raises(ValueError, match=rf"methods: '{other}' cannot be combined with 'lora': .*"
                       r"refills the zeros"):  # fmt: skip
        LoraMethod.check_combination([other, "lora"])


@pytest.mark.parametrize("names", [["lora"], ["structured", "lora"], ["lowrank", "lora"],
                                   ["magnitude"]])  # fmt: skip
def test_lora_allowed_combinations(names):
    LoraMethod.check_combination(names)  # does not raise


FC1_ADAPTER = 288 * 4 + 4 * 32  # fc1 kernel (288, 32), rank 4
HEAD_ADAPTER = 32 * 4 + 4 * 10  # head kernel (32, 10), rank 4
HEAD_FULL = 32 * 10 + 10  # the head trained fully: kernel and bias


@pytest.mark.parametrize(
    "targets, adapted, trainable, adapters",
    [
        # Defaults (PEFT's convention): adapters on the hidden layer, the head trained fully.
        ((), ["fc1"], FC1_ADAPTER + HEAD_FULL, FC1_ADAPTER),
        # Named targets are taken as given: the head gets an adapter too and nothing else trains.
        (("fc1", "head"), ["fc1", "head"], FC1_ADAPTER + HEAD_ADAPTER, FC1_ADAPTER + HEAD_ADAPTER),
    ],
    ids=["default-targets", "explicit-targets"],
)
def test_prepare_finetune_finalize(digits, tmp_path, targets, adapted, trainable, adapters):
    data = _data(digits)
    plan = FinetunePlan(epochs=1, steps_per_epoch=4, batch_size=32)
    model = _cnn()
    method = LoraMethod(LoraOptions(rank=4, alpha=8, targets=targets))
    prepared = method.prepare(model, data, plan)
    assert [layer.name for layer in lora_layers(prepared)] == adapted
    assert not lora_layers(model)
    prepared.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    prepared.fit(data.x_train[:128], data.y_train[:128], batch_size=32, epochs=1, verbose=0)
    y_lora = prepared.predict(data.x_val[:16], verbose=0)
    assert np.abs(y_lora - model.predict(data.x_val[:16], verbose=0)).max() > 1e-4
    final = method.finalize(prepared)
    assert not lora_layers(final)
    np.testing.assert_allclose(final.predict(data.x_val[:16], verbose=0), y_lora, atol=1e-5)
    final.save(tmp_path / "final.keras")
    report = json.loads(json.dumps(method.report()))  # what report.json holds
    assert report["trainable_params"] == trainable
    assert report["adapter_params"] == adapters
    assert report["trainable_params"] < report["trainable_params_before"]
    assert report["merged_layers"] == len(adapted)
    assert [entry["path"] for entry in report["layers"]] == adapted


def test_default_targets_work_on_a_two_class_head(digits):
    """Issue 12: a model ending in Dense(2) used to get "rank must be in [1, 2] for 'out'"."""
    inputs = keras.Input((64,))
    x = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(4, activation="relu", name="bottleneck")(x)  # narrower than rank 8
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    x_train, y_train = digits[0][:64].reshape(64, -1), (digits[1][:64] % 2).astype("int32")
    data = Data(x_train, y_train, x_train, y_train, 2)
    method = LoraMethod(LoraOptions())  # rank 8
    prepared = method.prepare(model, data, FinetunePlan(1, 2, 32))
    assert [layer.name for layer in lora_layers(prepared)] == ["hidden"]
    trainable = {v.path for v in prepared.trainable_variables}
    assert trainable == {
        "hidden/lora_kernel_a",
        "hidden/lora_kernel_b",
        "out/kernel",
        "out/bias",
    }
    prepared.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    prepared.fit(x_train, y_train, batch_size=32, epochs=1, verbose=0)
    report = method.report()
    assert report["default_targets"] == {
        "targets": ["hidden"],
        "heads": ["out"],
        "too_narrow": {"bottleneck": "min(inputs, outputs) = 4 < rank 8"},
    }
    lines = LoraMethod.report_lines(json.loads(json.dumps(report)))
    assert "lora: output layers trained fully: out" in lines
    assert any("bottleneck (min(inputs, outputs) = 4 < rank 8)" in line for line in lines)
    assert lines[0].startswith(f"lora: {report['trainable_params']:,} of ")
    # Sequential and nested models find their head the same way.
    seq = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, name="h"), keras.layers.Dense(2, name="o")]
    )
    assert default_targets(seq, 8)[:2] == (["h"], ["o"])
    outer = keras.Sequential([keras.Input((64,)), seq])
    assert default_targets(outer, 8)[:2] == ([f"{seq.name}/h"], [f"{seq.name}/o"])


def test_default_targets_with_nothing_left_is_a_clear_error():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    with pytest.raises(RecipeError, match=r"lora\.targets: the default targets leave no layer"):
        default_targets(model, 8)


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
