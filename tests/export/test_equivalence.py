from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.export import (
    FLOAT_TOLERANCE,
    EquivalenceError,
    compare_outputs,
    tflite_equivalence,
    tolerance_for,
)


@pytest.fixture(scope="module")
def trained(digits):
    x_train, y_train, x_val, y_val = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=5, verbose=0)
    return model, x_train[:64], x_val[:120], y_val[:120]


def test_every_tflite_quantization_is_checked(tmp_path, trained):
    model, calib, x_val, y_val = trained
    out = tflite_equivalence(model, tmp_path, x_val, y_val, calibration_x=calib)
    assert set(out) == {"none", "dynamic", "float16", "int8"}
    assert out["none"]["tolerance"] == FLOAT_TOLERANCE and out["none"]["passed"]
    assert out["none"]["max_abs_diff"] <= 1e-5
    keras_acc = float(np.mean(model.predict(x_val, verbose=0).argmax(-1) == y_val))
    for q, rec in out.items():
        assert rec["reference_accuracy"] == pytest.approx(keras_acc), q
        assert abs(rec["accuracy_delta"]) <= 0.03, q
        assert rec["agreement"] >= 0.9 and rec["passed"], q
        assert (tmp_path / f"check_{q}.tflite").stat().st_size == rec["tflite_raw_bytes"]
    # Quantization costs bits: the quantized files are smaller and differ more.
    assert out["int8"]["tflite_raw_bytes"] < 0.5 * out["none"]["tflite_raw_bytes"]
    assert out["int8"]["max_abs_diff"] > out["none"]["max_abs_diff"]


def test_compare_outputs_fails_a_different_model(trained):
    model, _, x_val, y_val = trained
    other = keras.models.clone_model(model)  # same architecture, fresh weights
    eq = compare_outputs(model, other, x_val, y_val, tolerance=tolerance_for("none"))
    assert not eq.passed and eq.max_abs_diff > 1e-3 and eq.agreement < 0.9
    with pytest.raises(EquivalenceError, match="differs from keras by"):
        eq.check()
    same = compare_outputs(model, model.predict_on_batch, x_val, tolerance=FLOAT_TOLERANCE)
    assert same.check() is same and same.max_abs_diff <= 1e-6
    assert same.reference_accuracy is None and same.accuracy_delta is None


def test_tolerance_is_relative_to_the_output_scale():
    x = np.ones((4, 3), "float32")
    eq = compare_outputs(lambda b: b * 1000.0, lambda b: b * 1000.0 + 0.005, x, tolerance=1e-5)
    assert eq.scale == pytest.approx(1000.0) and eq.passed  # 0.005 <= 1e-5 * 1000
    eq = compare_outputs(lambda b: b, lambda b: b + 0.005, x, tolerance=1e-5)
    assert eq.scale == 1.0 and not eq.passed


def test_equivalence_errors(trained):
    model, _, x_val, _ = trained
    with pytest.raises(ValueError, match="quantization must be one of none"):
        tolerance_for("int4")
    with pytest.raises(ValueError, match="needs samples"):
        compare_outputs(model, model, x_val[:0])
    with pytest.raises(ValueError, match="they are not the same model"):
        compare_outputs(model, lambda b: np.zeros((len(b), 3)), x_val)
