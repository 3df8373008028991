from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_lean.export import (
    TFLiteRunner,
    convert_to_tflite,
    export_model,
    file_sizes,
    gzip_size,
    make_interpreter,
    measure_latency_ms,
    weight_sizes,
)


@pytest.fixture(scope="module")
def trained(digits):
    x_train, y_train, x_val, y_val = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train[:400], y_train[:400], epochs=2, batch_size=32, verbose=0)
    return model, x_train[:400], x_val[:100], y_val[:100]


@pytest.mark.parametrize(
    "quantization, tol",
    [("none", 1e-5), ("dynamic", 0.05), ("float16", 1e-2), ("int8", 0.1)],
    ids=["none", "dynamic", "float16", "int8"],
)
def test_tflite_quantizations_run_in_the_interpreter(tmp_path, trained, quantization, tol):
    model, x_train, x_val, y_val = trained
    rep = export_model(
        model,
        tmp_path,
        formats=("tflite",),
        quantization=quantization,
        calibration_x=x_train[:50],
        check_x=x_val,
        check_y=y_val,
        latency_runs=3,
    )
    assert rep.tflite_path and rep.saved_model_path is None
    out = TFLiteRunner(rep.tflite_path)(x_val[:7])
    assert out.shape == (7, 10)
    assert rep.max_abs_diff is not None and rep.max_abs_diff < tol
    assert abs(rep.tflite_accuracy - rep.keras_accuracy) <= 0.03
    assert rep.tflite_raw_bytes > 0 and 0 < rep.tflite_gzip_bytes <= rep.tflite_raw_bytes + 64
    assert rep.keras_latency_ms > 0 and rep.tflite_latency_ms > 0
    if quantization in ("dynamic", "int8"):
        none = convert_to_tflite(model, tmp_path / "f32.tflite")
        assert rep.tflite_raw_bytes < 0.5 * file_sizes(none)[0]


def test_saved_model_loads_in_a_fresh_process(tmp_path, trained):
    model, _, x_val, y_val = trained
    rep = export_model(model, tmp_path, formats=("saved_model",), check_x=x_val)
    assert rep.saved_model_raw_bytes > 0 and rep.tflite_path is None
    np.save(tmp_path / "x.npy", x_val[:5])
    np.save(tmp_path / "expected.npy", model.predict(x_val[:5], verbose=0))
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({rep.saved_model_path!r})
        out = m.serve(tf.constant(np.load({str(tmp_path / "x.npy")!r}))).numpy()
        np.testing.assert_allclose(out, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-5)
        print("OK", out.shape)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK (5, 10)" in proc.stdout


def test_sizes_see_the_zeros():
    dense = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    sparse = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    k, b = sparse.get_weights()
    k[np.abs(k) < np.quantile(np.abs(k), 0.9)] = 0
    sparse.set_weights([k, b])
    d, s = weight_sizes(dense), weight_sizes(sparse)
    assert d.params == s.params == 64 * 64 + 64
    assert s.nonzero_params <= 64 * 64 * 0.1 + 65
    assert s.raw_bytes == d.raw_bytes and s.gzip_bytes < 0.3 * d.gzip_bytes
    assert s.sparsity > 0.85
    assert gzip_size(b"\0" * 10000) < 100


def test_measure_latency():
    # A function that takes 5 ms, except its first (warm-up) call and one slow timed call: the
    # result is in milliseconds, skips the warm-up, and is the median (not the mean) of `runs`.
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(0.3 if len(calls) in (1, 3) else 0.005)

    ms = measure_latency_ms(fn, np.zeros(3), runs=5)
    assert len(calls) == 6  # one warm-up + 5 timed
    assert 5.0 <= ms < 50.0  # a mean would be >= 64 ms; the warm-up alone is 300 ms
    assert measure_latency_ms(lambda x: time.sleep(0.02), None, runs=3) >= 20.0
    with pytest.raises(ValueError, match="runs must be >= 1"):
        measure_latency_ms(lambda x: x, np.zeros(3), runs=0)


def test_export_errors(tmp_path, trained):
    model = trained[0]
    with pytest.raises(ValueError, match="quantization must be one of none, dynamic"):
        export_model(model, tmp_path, quantization="int4")
    with pytest.raises(ValueError, match="formats entries must be one of saved_model, tflite"):
        export_model(model, tmp_path, formats=("onnx",))
    with pytest.raises(ValueError, match="quantization='int8' needs calibration samples"):
        convert_to_tflite(model, tmp_path / "m.tflite", quantization="int8")
    with pytest.raises(ValueError, match=r"must end in '\.tflite'"):
        convert_to_tflite(model, tmp_path / "m.bin")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="is not a valid TFLite model"):
        make_interpreter(garbage)
    with pytest.raises(FileNotFoundError, match="TFLite file not found"):
        make_interpreter(tmp_path / "missing.tflite")
    with pytest.raises(FileNotFoundError, match="No such file or folder"):
        file_sizes(tmp_path / "missing")
