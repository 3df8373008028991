from __future__ import annotations

import zipfile

import numpy as np
import pytest

from keras_lean.pipeline import build_model, load_model


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_build_model(arch):
    m = build_model(arch, (8, 8, 1), 10)
    assert m.output_shape == (None, 10)
    out = m.predict(np.zeros((2, 8, 8, 1), "float32"), verbose=0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_build_model_errors():
    with pytest.raises(ValueError, match="arch must be one of cnn, mlp. Received: arch='rnn'"):
        build_model("rnn", (8, 8, 1), 10)
    with pytest.raises(ValueError, match=r"arch='cnn' needs image inputs"):
        build_model("cnn", (64,), 10)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        build_model("mlp", (64,), 1)


def test_load_model_round_trip(tmp_path):
    m = build_model("mlp", (8, 8, 1), 10)
    m.save(tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Model file not found"):
        load_model(tmp_path / "nope.keras")
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF\r\n")
    with pytest.raises(ValueError, match=r"not a Keras model file: expected a '\.keras' file"):
        load_model(h5)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid .keras file"):
        load_model(corrupt)
    not_keras = tmp_path / "zip.keras"
    with zipfile.ZipFile(not_keras, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(ValueError, match="could not be loaded as a Keras model"):
        load_model(not_keras)
    with pytest.raises(ValueError, match="is a folder"):
        load_model(tmp_path)
