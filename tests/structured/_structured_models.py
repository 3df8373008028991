"""Tiny models, one per coupling pattern, shared by the structured tests (PEFT's TEST_CASES)."""

from __future__ import annotations

import keras
import numpy as np

L = keras.layers


def dense_mlp():
    inputs = keras.Input((10,))
    x = L.Dense(12, activation="relu", name="d1")(inputs)
    x = L.Dropout(0.1)(x)
    x = L.Dense(8, activation="tanh", name="d2")(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def sequential_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(8, 3, padding="same", name="c1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(),
            L.MaxPooling2D(2),
            L.Conv2D(6, 3, padding="same", activation="relu", name="c2"),
            L.GlobalAveragePooling2D(),
            L.Dense(3, name="out"),
        ]
    )


def conv_bn_conv():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Activation("sigmoid")(x)  # f(0) != 0: masks must sit after it
    x = L.AveragePooling2D(2)(x)
    x = L.Conv2D(6, 3, padding="same", name="c2")(x)
    x = L.GlobalMaxPooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def residual(merge=L.Add):
    def build():
        inputs = keras.Input((8, 8, 3))
        x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
        x = L.BatchNormalization(name="stem_bn")(x)
        x = L.ReLU()(x)
        y = L.Conv2D(8, 3, padding="same", name="branch")(x)
        y = L.BatchNormalization(name="branch_bn")(y)
        x = merge(name="merge")([x, y])
        x = L.Conv2D(5, 1, name="after")(x)
        x = L.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, L.Dense(3, name="out")(x))

    return build


def concat():
    inputs = keras.Input((6, 6, 2))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(6, 3, padding="same", name="b")(inputs)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(5, 1, name="after")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def depthwise():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.Conv2D(4, 1, name="pw")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def separable():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.SeparableConv2D(8, 3, depth_multiplier=2, padding="same", name="sep")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def flatten():
    inputs = keras.Input((4, 4, 1))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    x = L.MaxPooling2D(2)(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(7, activation="relu", name="d1")(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def reshape():
    inputs = keras.Input((4, 4, 1))
    x = L.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = L.Reshape((16, 6), name="to_seq")(x)  # channels stay last
    x = L.Conv1D(5, 3, padding="same", name="c1d")(x)
    x = L.Reshape((-1,), name="flat")(x)  # channels go into positions
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def transformer():
    tokens = keras.Input((6,), dtype="int32")
    x = L.Embedding(20, 16, name="emb")(tokens)
    a = L.MultiHeadAttention(4, 4, name="mha")(x, x)
    x = L.Add(name="res1")([x, a])
    x = L.LayerNormalization(name="ln1")(x)
    f = L.Dense(32, activation="gelu", name="ffn_in")(x)
    f = L.Dense(16, name="ffn_out")(f)
    x = L.Add(name="res2")([x, f])
    x = L.LayerNormalization(name="ln2")(x)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, L.Dense(3, name="out")(x))


def nested():
    inner = keras.Sequential(
        [keras.Input((8,)), L.Dense(6, activation="relu", name="inner_d")], name="inner"
    )
    inputs = keras.Input((10,))
    x = L.Dense(8, activation="relu", name="d1")(inputs)
    x = inner(x)
    x = L.Dense(7, activation="relu", name="d2")(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class Doubler(L.Layer):
    """A layer the dependency graph does not know."""

    def call(self, x):
        return x * 2.0


def unknown():
    inputs = keras.Input((10,))
    x = L.Dense(8, activation="relu", name="d1")(inputs)
    x = Doubler(name="odd")(x)
    x = L.Dense(7, activation="relu", name="d2")(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


# id -> (builder, input kind, whether ratio 0.5 must remove parameters)
CASES = {
    "dense_mlp": (dense_mlp, "vec10"),
    "sequential_cnn": (sequential_cnn, "img8x1"),
    "conv_bn_conv": (conv_bn_conv, "img8x3"),
    "residual_add": (residual(L.Add), "img8x3"),
    "residual_subtract": (residual(L.Subtract), "img8x3"),
    "residual_multiply": (residual(L.Multiply), "img8x3"),
    "residual_average": (residual(L.Average), "img8x3"),
    "concat": (concat, "img6x2"),
    "depthwise": (depthwise, "img6x2"),
    "separable": (separable, "img6x2"),
    "flatten": (flatten, "img4x1"),
    "reshape": (reshape, "img4x1"),
    "transformer": (transformer, "tokens6"),
    "nested": (nested, "vec10"),
    "unknown": (unknown, "vec10"),
}


def make_input(kind: str, n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shapes = {
        "vec10": (10,),
        "img8x1": (8, 8, 1),
        "img8x3": (8, 8, 3),
        "img6x2": (6, 6, 2),
        "img4x1": (4, 4, 1),
    }
    if kind == "tokens6":
        return rng.integers(0, 20, size=(n, 6)).astype("int32")
    return rng.normal(size=(n, *shapes[kind])).astype("float32")


def randomize_norms(model: keras.Model, seed: int = 0) -> keras.Model:
    """Gives BatchNorm layers non-trivial statistics and gammas so slicing errors show."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization | L.LayerNormalization):
            layer.set_weights(
                [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()]
            )
    return model


def widths(model: keras.Model) -> dict:
    out = {}
    for layer in model.layers:
        for attr in ("units", "filters", "output_dim", "num_heads"):
            if isinstance(getattr(layer, attr, None), int):
                out[layer.name] = getattr(layer, attr)
    return out
