from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.export import (
    TFLiteRunner,
    convert_to_tflite,
    export_model,
    make_interpreter,
    sparse_storage,
    strip_tflite_names,
)


def _pruned_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    weights = []
    for w in model.get_weights():
        if w.ndim > 1:  # 80 % magnitude sparsity, so the sparse converter stores tensors sparsely
            w = np.where(np.abs(w) < np.quantile(np.abs(w), 0.8), 0.0, w)
        weights.append(w)
    model.set_weights(weights)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory, digits):
    """One conversion per layout, shared by the tests (each strips into its own folder)."""
    x_train = digits[0]
    folder = tmp_path_factory.mktemp("converted")
    model = _pruned_model()
    return {
        "float-dense": convert_to_tflite(model, folder / "float.tflite"),
        "int8-sparse": convert_to_tflite(
            model,
            folder / "int8_sparse.tflite",
            quantization="int8",
            calibration_x=x_train[:16],
            sparse=True,
        ),
    }


@pytest.mark.parametrize("layout", ["float-dense", "int8-sparse"])
def test_strip_names_keeps_outputs_and_signatures(tmp_path, digits, converted, layout):
    src = converted[layout]
    before = src.read_bytes()
    out = strip_tflite_names(src, tmp_path / "stripped.tflite")
    assert src.read_bytes() == before  # the source is left as it was
    assert out.stat().st_size < len(before)
    x = digits[2][:32]
    np.testing.assert_array_equal(TFLiteRunner(out)(x), TFLiteRunner(src)(x))
    interpreter = make_interpreter(out)
    assert all(not t["name"] for t in interpreter.get_tensor_details())
    runner = interpreter.get_signature_runner("serving_default")
    (signature_out,) = runner(image=x[:1]).values()
    np.testing.assert_array_equal(signature_out, TFLiteRunner(src)(x[:1]))
    # Sparse storage survives: the same tensors, values and index arrays.
    s_src, s_out = sparse_storage(src), sparse_storage(out)
    assert len(s_out.tensors) == len(s_src.tensors) == (2 if layout == "int8-sparse" else 0)
    assert (s_out.values_bytes, s_out.index_bytes) == (s_src.values_bytes, s_src.index_bytes)


def test_strip_names_in_place(tmp_path, converted):
    src = tmp_path / "m.tflite"
    src.write_bytes(converted["float-dense"].read_bytes())
    size = src.stat().st_size
    assert strip_tflite_names(src) == src
    assert src.stat().st_size < size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]  # no temporary left


def test_strip_names_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TFLite file not found"):
        strip_tflite_names(tmp_path / "missing.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\1" * 64)
    with pytest.raises(ValueError, match="is not a valid TFLite model"):
        strip_tflite_names(bad)
    with pytest.raises(ValueError, match="must end in '.tflite'. Received: out_path="):
        strip_tflite_names(bad, tmp_path / "out.bin")


def test_export_model_strips_names_and_still_checks(tmp_path, digits):
    _, _, x_val, y_val = digits
    rep = export_model(
        _pruned_model(),
        tmp_path,
        formats=("tflite",),
        check_x=x_val[:32],
        check_y=y_val[:32],
        latency_runs=1,
        sparse=True,
        strip_names=True,
    )
    assert rep.tflite_names_stripped and rep.to_dict()["tflite_names_stripped"]
    for path in (rep.tflite_path, tmp_path / "model_dense.tflite"):
        assert all(not t["name"] for t in make_interpreter(path).get_tensor_details())
    assert rep.dense_tflite_raw_bytes == (tmp_path / "model_dense.tflite").stat().st_size
    # The checks ran on the stripped files: float Keras vs sparse to 1e-5, sparse vs dense format.
    assert rep.equivalence_passed and len(rep.equivalence) == 2
    assert rep.max_abs_diff <= 1e-5 and rep.sparse_vs_dense_max_abs_diff == 0.0
