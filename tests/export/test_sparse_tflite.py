from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.export import (
    TFLiteRunner,
    convert_to_tflite,
    export_model,
    file_sizes,
    sparse_storage,
    tflite_ops,
)
from keras_lean.export.sparse import latency_note


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def _magnitude(model: keras.Model, sparsity: float) -> keras.Model:
    weights = []
    for w in model.get_weights():
        if w.ndim > 1:
            w = np.where(np.abs(w) < np.quantile(np.abs(w), sparsity), 0.0, w)
        weights.append(w)
    model.set_weights(weights)
    return model


def _two_of_four(model: keras.Model) -> keras.Model:
    """2:4 along the input axis: in every 4 consecutive input weights, the 2 smallest are zero."""
    weights = []
    for w in model.get_weights():
        if w.ndim > 1:
            flat = np.moveaxis(w, -2, -1).reshape(-1, 4)
            order = np.argsort(np.abs(flat), axis=1)
            np.put_along_axis(flat, order[:, :2], 0.0, axis=1)
            w = np.moveaxis(flat.reshape(np.moveaxis(w, -2, -1).shape), -1, -2)
        weights.append(w)
    model.set_weights(weights)
    return model


@pytest.fixture(scope="module")
def data(digits):
    x_train, _, x_val, y_val = digits
    return x_train[:64], x_val[:64], y_val[:64]


@pytest.mark.parametrize(
    "prune, quantization, max_ratio",
    [
        (lambda m: _magnitude(m, 0.8), "none", 0.45),
        (lambda m: _magnitude(m, 0.8), "int8", 0.8),
        (_two_of_four, "none", 0.9),
    ],
    ids=["magnitude80-float", "magnitude80-int8", "2of4-float"],
)
def test_sparse_export_is_smaller_and_computes_the_same(
    tmp_path, data, prune, quantization, max_ratio
):
    calib, x_val, y_val = data
    model = prune(_model())
    rep = export_model(
        model,
        tmp_path,
        formats=("tflite",),
        quantization=quantization,
        calibration_x=calib,
        check_x=x_val,
        check_y=y_val,
        latency_runs=2,
        sparse=True,
    )
    assert rep.sparse_tflite
    assert rep.tflite_raw_bytes == file_sizes(rep.tflite_path)[0]
    assert rep.dense_tflite_raw_bytes == file_sizes(tmp_path / "model_dense.tflite")[0]
    assert rep.tflite_raw_bytes < max_ratio * rep.dense_tflite_raw_bytes
    # Same file content in another layout: identical outputs, and it matches Keras.
    assert rep.sparse_vs_dense_max_abs_diff == 0.0
    dense_out = TFLiteRunner(tmp_path / "model_dense.tflite")(x_val)
    np.testing.assert_array_equal(TFLiteRunner(rep.tflite_path)(x_val), dense_out)
    assert rep.equivalence_passed and len(rep.equivalence) == 2
    if quantization == "none":
        assert rep.max_abs_diff <= 1e-5
    storage = rep.sparse_storage
    assert storage["sparse_tensors"] >= 1 and storage["densify_ops"] == storage["sparse_tensors"]
    assert storage["index_bytes"] > storage["position_entropy_bytes"] > 0
    assert storage["values_bytes"] < storage["dense_bytes"]
    assert "DENSIFY" in rep.sparse_latency_note and rep.dense_tflite_latency_ms > 0


def test_dense_model_stays_dense(tmp_path):
    path = convert_to_tflite(_model(), tmp_path / "m.tflite", sparse=True)
    storage = sparse_storage(path)
    assert storage.tensors == () and not storage.runtime_densifies
    assert "DENSIFY" not in tflite_ops(path) and "FULLY_CONNECTED" in tflite_ops(path)
    assert "stored no tensor sparsely" in latency_note(storage, 1.0, 1.0)


def test_storage_figures_add_up(tmp_path):
    path = convert_to_tflite(_magnitude(_model(), 0.9), tmp_path / "m.tflite", sparse=True)
    s = sparse_storage(path)
    assert s.file_bytes == path.stat().st_size
    assert s.values_bytes + s.index_bytes < s.dense_bytes
    for t in s.tensors:
        density = t.stored_values / t.elements
        assert 0 < density < 0.2  # 90 % of the weights are zero
        assert t.dense_bytes == 4 * t.elements and t.values_bytes == 4 * t.stored_values
    assert s.entropy_bound_bytes == pytest.approx(s.values_bytes + s.position_entropy_bytes)
    d = s.to_dict()
    assert d["index_overhead_bytes"] == pytest.approx(s.index_bytes - s.position_entropy_bytes, 0.1)


def test_sparse_storage_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TFLite file not found"):
        sparse_storage(tmp_path / "missing.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\1" * 64)
    with pytest.raises(ValueError, match="is not a valid TFLite model"):
        tflite_ops(bad)


def test_sparse_with_dynamic_quantization_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sparse=True works with quantization none, float16, int8"):
        convert_to_tflite(
            _magnitude(_model(), 0.8), tmp_path / "m.tflite", quantization="dynamic", sparse=True
        )
