"""The model shapes every transform is tried on, and the "your model is untouched" check.

Each factory builds the same network, 8 inputs -> Dense "fc1" (16, relu) -> Dense "fc2" (16,
relu) -> Dense "head" (4), in one of the ways a user builds a Keras model. Used by
tests/test_model_shapes.py and tests/test_untouched.py.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_lean._keras_internals import flatten_layers

L = keras.layers

IN_DIM, HIDDEN, OUT_DIM = 8, 16, 4
DENSE_NAMES = ("fc1", "fc2", "head")


def _layers():
    return [
        L.Dense(HIDDEN, activation="relu", name="fc1"),
        L.Dense(HIDDEN, activation="relu", name="fc2"),
        L.Dense(OUT_DIM, name="head"),
    ]


def sequential_with_input() -> keras.Model:
    return keras.Sequential([keras.Input((IN_DIM,)), *_layers()], name="seq_input")


def sequential_built() -> keras.Model:
    model = keras.Sequential(_layers(), name="seq_built")
    model.build((None, IN_DIM))
    return model


def functional() -> keras.Model:
    fc1, fc2, head = _layers()
    inputs = keras.Input((IN_DIM,))
    return keras.Model(inputs, head(fc2(fc1(inputs))), name="functional")


def nested() -> keras.Model:
    """A functional model that uses a Sequential model as a layer (fc2 lives inside it)."""
    fc1, fc2, head = _layers()
    inner = keras.Sequential([keras.Input((HIDDEN,)), fc2], name="inner")
    inputs = keras.Input((IN_DIM,))
    return keras.Model(inputs, head(inner(fc1(inputs))), name="nested")


class Subclassed(keras.Model):
    """A subclassed model, not registered as serializable: Keras cannot rebuild it from config."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc1, self.fc2, self.head = _layers()

    def call(self, x):
        return self.head(self.fc2(self.fc1(x)))


def subclassed() -> keras.Model:
    model = Subclassed(name="subclassed")
    model(np.zeros((1, IN_DIM), "float32"))
    return model


SHAPES = {
    "sequential_input": sequential_with_input,
    "sequential_build": sequential_built,
    "functional": functional,
    "nested": nested,
    "subclassed": subclassed,
}
GRAPH_SHAPES = [name for name in SHAPES if name != "subclassed"]


def dense_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The Dense layers of `model`, nested ones included."""
    return [lyr for lyr in flatten_layers(model) if type(lyr) is L.Dense]


def inputs(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, IN_DIM)).astype("float32")


def labels(n: int = 6) -> np.ndarray:
    return (np.arange(n) % OUT_DIM).astype("int32")


def snapshot(model: keras.Model, x: np.ndarray) -> dict:
    """What a transform must not change: every variable, the layers, their flags, the outputs."""
    return {
        "variables": [(v.path, np.array(v.numpy(), copy=True)) for v in model.weights],
        "trainable": [v.trainable for v in model.weights],
        "layers": [(id(lyr), type(lyr), lyr.trainable) for lyr in model.layers],
        "nested": [id(lyr) for lyr in flatten_layers(model)],
        "compiled": model.compiled,
        "outputs": np.array(keras.ops.convert_to_numpy(model(x)), copy=True),
    }


def assert_untouched(model: keras.Model, before: dict, x: np.ndarray) -> None:
    after = snapshot(model, x)
    assert [p for p, _ in after["variables"]] == [p for p, _ in before["variables"]]
    for (path, a), (_, b) in zip(before["variables"], after["variables"], strict=True):
        np.testing.assert_array_equal(b, a, err_msg=f"variable {path} changed")
    for key in ("trainable", "layers", "nested", "compiled"):
        assert after[key] == before[key], f"the model's {key} changed"
    np.testing.assert_array_equal(after["outputs"], before["outputs"])


def set_low_rank_kernels(model: keras.Model, rank: int, seed: int = 3) -> None:
    """Gives every Dense kernel rank `rank` exactly, so a rank-`rank` SVD is lossless."""
    rng = np.random.default_rng(seed)
    for layer in dense_layers(model):
        n_in, n_out = layer.kernel.shape
        kernel = rng.normal(size=(n_in, rank)) @ rng.normal(size=(rank, n_out)) / np.sqrt(n_in)
        layer.kernel.assign(kernel.astype("float32"))
