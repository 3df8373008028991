from __future__ import annotations

import os
import subprocess
import sys
import warnings
import zipfile

import keras
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
    h5.write_bytes(b"\x89HDF\r\n")  # a truncated HDF5 signature
    with pytest.raises(
        ValueError, match=r"model.h5 is not a Keras model file: not a valid HDF5 file"
    ):
        load_model(h5)
    other = tmp_path / "model.pt"
    other.write_bytes(b"\0")
    with pytest.raises(
        ValueError, match=r"not a Keras model file: expected a '\.keras' file, or a"
    ):
        load_model(other)
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


# ---------------------------------------------------------------- legacy models (item 5)

_MAKE_LEGACY = """
import numpy as np, tf_keras
from pathlib import Path
out = Path({out!r})
x = np.random.default_rng(0).random((3, 8)).astype("float32")
np.save(out / "x.npy", x)
plain = tf_keras.Sequential([tf_keras.Input((8,)), tf_keras.layers.Dense(6, activation="relu"),
                             tf_keras.layers.Dense(3, activation="softmax")])
plain.save(out / "plain.h5")
plain.save(out / "plain.keras")
plain.save_weights(out / "weights_only.h5")
np.save(out / "plain_y.npy", plain.predict(x, verbose=0))
class Scale(tf_keras.layers.Layer):  # a user's own layer, unknown to Keras 3
    def build(self, input_shape):
        self.alpha = self.add_weight(name="alpha", shape=(), initializer="ones")
    def call(self, t):
        return t * self.alpha
inputs = tf_keras.Input((8,))
scale = Scale(name="scale")
custom = tf_keras.Model(inputs, tf_keras.layers.Dense(3)(scale(inputs)))
scale.alpha.assign(2.5)
custom.save(out / "custom.h5")
custom.save(out / "custom.keras")
plain_functional = tf_keras.Model(inputs, tf_keras.layers.Dense(3)(inputs))
plain_functional.save(out / "functional.keras")
np.save(out / "functional_y.npy", plain_functional.predict(x, verbose=0))
# What the refusal of functional.keras tells the user to run:
tf_keras.models.load_model(out / "functional.keras").save(out / "functional.h5")
np.save(out / "custom_y.npy", custom.predict(x, verbose=0))
print("made")
"""


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """Real tf_keras (Keras 2) files, written in a fresh process so tf_keras stays out of ours."""
    pytest.importorskip("tf_keras")
    out = tmp_path_factory.mktemp("legacy")
    proc = subprocess.run(
        [sys.executable, "-c", _MAKE_LEGACY.format(out=str(out))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0 and "made" in proc.stdout, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("name", ["plain.h5", "plain.keras"], ids=["h5", "keras"])
def test_load_model_reads_a_tf_keras_model(legacy, name):
    model = load_model(legacy / name)
    assert isinstance(model, keras.Model)
    x = np.load(legacy / "x.npy")
    np.testing.assert_allclose(model.predict(x, verbose=0), np.load(legacy / "plain_y.npy"),
                               atol=1e-6)  # fmt: skip


def test_load_model_reads_a_keras3_h5_and_the_baseline_adopts_it(tmp_path, tiny_npz):
    from keras_lean.pipeline import train_baseline

    model = build_model("mlp", (8, 8, 1), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: "HDF5 ... is considered legacy"
        model.save(tmp_path / "user.h5")
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(load_model(tmp_path / "user.h5").predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-6)  # fmt: skip
    result = train_baseline(tmp_path / "run", data=tiny_npz, model_path=tmp_path / "user.h5",
                            verbose=0)  # fmt: skip
    adopted = load_model(tmp_path / "run" / "baseline.keras")
    assert result is not None
    np.testing.assert_allclose(adopted.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    "name, match",
    [
        (
            "custom.h5",
            r"custom.h5 is a legacy HDF5 model \(Keras 2\.\d+.*\) that Keras 3 cannot rebuild: "
            r".*Scale.*Convert it: build the same architecture with Keras 3 layers, call "
            r"model.load_weights\('.*custom.h5'\).*model.save\('custom.keras'\)",
        ),
        (
            "functional.keras",
            r"functional.keras is a model saved by tf_keras \(Keras 2\.\d+.*\) that Keras 3 "
            r"cannot rebuild: Could not locate class 'Functional'\. Convert it: with tf_keras run "
            r"tf_keras.models.load_model\('.*functional.keras'\).save\('functional.h5'\) and pass "
            r"functional.h5",
        ),
        (
            "custom.keras",
            r"custom.keras is a model saved by tf_keras .* Convert it: with tf_keras run "
            r"tf_keras.models.load_model\('.*custom.keras'\).save\('custom.h5'\)",
        ),
        (
            "weights_only.h5",
            r"weights_only.h5 holds only weights \(saved with save_weights, no model config\)"
            r".*model.load_weights\('.*weights_only.h5'\)",
        ),
    ],
    ids=["h5_custom_layer", "tf_keras_functional", "tf_keras_custom_layer", "weights_only"],
)
def test_load_model_refuses_a_legacy_model_in_one_line_that_says_how_to_convert(
    legacy, name, match
):
    with pytest.raises(ValueError, match=match) as info:
        load_model(legacy / name)
    assert "\n" not in str(info.value)


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class _Scale(keras.layers.Layer):
    """The Keras 3 version of the tf_keras user's `Scale` layer."""

    def build(self, input_shape):
        self.alpha = self.add_weight(name="alpha", shape=(), initializer="ones")

    def call(self, t):
        return t * self.alpha


def test_the_tf_keras_conversion_the_refusal_describes_works(legacy):
    # functional.h5 was written by the command the refusal of functional.keras gives.
    model = load_model(legacy / "functional.h5")
    x = np.load(legacy / "x.npy")
    np.testing.assert_allclose(model.predict(x, verbose=0), np.load(legacy / "functional_y.npy"),
                               atol=1e-6)  # fmt: skip


def test_the_h5_conversion_the_refusal_describes_works(legacy, tmp_path):
    # What the custom.h5 message says: same architecture in Keras 3, load_weights, save .keras.
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3)(_Scale(name="scale")(inputs)))
    model.load_weights(legacy / "custom.h5")
    assert float(model.get_layer("scale").alpha.numpy()) == pytest.approx(2.5)
    model.save(tmp_path / "custom.keras")
    loaded = load_model(tmp_path / "custom.keras")
    x = np.load(legacy / "x.npy")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.load(legacy / "custom_y.npy"),
                               atol=1e-5)  # fmt: skip
