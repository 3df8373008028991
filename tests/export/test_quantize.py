from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.export import (
    KERAS_QUANTIZATIONS,
    file_sizes,
    quantize_keras,
    quantize_keras_artifact,
)
from keras_lean.export.quantize import quantized_layers
from keras_lean.lowrank import apply_lora, merge_lora


@pytest.fixture(scope="module")
def trained(digits):
    x_train, y_train, x_val, y_val = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu", name="dense1")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="out")(x)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=3, batch_size=32, verbose=0)
    return model, x_val, y_val


@pytest.mark.parametrize(
    "mode, max_size_ratio, max_acc_drop",
    [("int8", 0.4, 0.02), ("int4", 0.3, 0.05), ("float8", 1.2, 0.02)],
    ids=["int8", "int4", "float8"],
)
def test_keras_quantization_of_the_artifact(tmp_path, trained, mode, max_size_ratio, max_acc_drop):
    model, x_val, y_val = trained
    before = [w.copy() for w in model.get_weights()]
    rep = quantize_keras_artifact(
        model, tmp_path / f"model_{mode}.keras", mode, check_x=x_val, check_y=y_val
    )
    assert rep.raw_bytes == file_sizes(tmp_path / f"model_{mode}.keras")[0]
    assert rep.raw_bytes < max_size_ratio * rep.float_raw_bytes
    assert set(rep.quantized_layers) == {"dense1", "out"}  # Keras does not quantize Conv2D
    assert rep.accuracy >= rep.float_accuracy - max_acc_drop
    assert 0 < rep.max_abs_diff < 0.5
    assert (rep.note is not None) == (mode == "float8")
    assert rep.reloadable is True
    # The caller's model is untouched and the file loads on its own.
    assert not quantized_layers(model)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    reloaded = keras.saving.load_model(rep.path)
    assert set(quantized_layers(reloaded)) == {"dense1", "out"}
    d = rep.to_dict()
    assert d["size_ratio"] == pytest.approx(rep.float_raw_bytes / rep.raw_bytes)


def test_filters_and_merged_lora(trained):
    model, x_val, _ = trained
    merged = merge_lora(apply_lora(model, rank=2, keep_trainable=["out"]))
    q = quantize_keras(merged, "int8", filters="dense1")
    assert quantized_layers(q) == ["dense1"]
    np.testing.assert_allclose(
        q.predict(x_val[:16], verbose=0), merged.predict(x_val[:16], verbose=0), atol=0.05
    )
    plain = quantize_keras(model, "none")
    assert plain is not model and not quantized_layers(plain)


def test_quantize_errors(tmp_path, trained):
    model = trained[0]
    assert KERAS_QUANTIZATIONS == ("none", "int8", "int4", "float8", "gptq", "awq")
    with pytest.raises(ValueError, match="keras_quantization must be one of none, int8"):
        quantize_keras(model, "int2")
    convs = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match="no layer of model .* can be quantized by Keras"):
        quantize_keras(convs, "int8")
    with pytest.raises(ValueError, match="needs a quantization mode"):
        quantize_keras_artifact(model, tmp_path / "m.keras", "none")
    with pytest.raises(ValueError, match=r"must end in '\.keras'"):
        quantize_keras_artifact(model, tmp_path / "m.h5", "int8")


def test_a_reload_failure_is_reported_and_measured_in_memory(tmp_path, trained, monkeypatch):
    model, x_val, y_val = trained

    def broken(path, *args, **kwargs):
        raise ValueError("A total of 1 objects could not be loaded.\nmore")

    monkeypatch.setattr(keras.saving, "load_model", broken)
    rep = quantize_keras_artifact(model, tmp_path / "m.keras", "int8", check_x=x_val, check_y=y_val)
    assert rep.reloadable is False
    assert rep.note.startswith(f"Keras {keras.__version__} cannot load this int8 .keras back")
    assert "(A total of 1 objects could not be loaded.)" in rep.note
    assert rep.accuracy >= rep.float_accuracy - 0.02 and 0 < rep.max_abs_diff < 0.5


@pytest.mark.slow
def test_a_file_keras_cannot_read_back_is_reported_not_hidden(tmp_path):
    """Keras 3.15 writes an int8 BertTextClassifier it cannot load (its `logits` layer gets no
    variables): the report says so and measures the in-memory quantized model."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 32, (8, 8)).astype("int32"),
        "segment_ids": np.zeros((8, 8), "int32"),
        "padding_mask": np.ones((8, 8), "int32"),
    }
    rep = quantize_keras_artifact(
        model, tmp_path / "bert_int8.keras", "int8", check_x=x, check_y=np.zeros(8, "int32")
    )
    assert rep.accuracy is not None and rep.max_abs_diff < 0.5
    try:
        keras.saving.load_model(rep.path)
        loads = True
    except ValueError:
        loads = False
    assert rep.reloadable is loads
    if not loads:
        assert "cannot load this int8 .keras back" in rep.note
