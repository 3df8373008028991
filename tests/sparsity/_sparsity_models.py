"""Tiny models shared by the sparsity tests."""

from __future__ import annotations

import keras
import numpy as np


def small_cnn(name: str = "cnn") -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def compile_model(model, optimizer=None, jit_compile=False):
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def random_data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n).astype("int32")
