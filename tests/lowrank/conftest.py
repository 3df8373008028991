"""Tiny models shared by the lowrank tests (built fresh per test: each test clears the session)."""

from __future__ import annotations

import keras
import numpy as np
import pytest


def make_mlp() -> keras.Model:
    inputs = keras.Input((12,))
    x = keras.layers.Dense(32, activation="relu", name="fc1")(inputs)
    x = keras.layers.Dense(24, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return keras.Model(inputs, outputs, name="mlp")


def make_cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name="cnn")


def make_bert(**kwargs):
    keras_hub = pytest.importorskip("keras_hub")
    config = dict(
        vocabulary_size=100,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
    )
    config.update(kwargs)
    return keras_hub.models.BertBackbone(**config)


def bert_inputs(batch: int = 3, seq: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(1, 100, (batch, seq)).astype("int32"),
        "segment_ids": np.zeros((batch, seq), "int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


@pytest.fixture
def mlp():
    return make_mlp()


@pytest.fixture
def cnn():
    return make_cnn()


@pytest.fixture
def bert():
    return make_bert()


@pytest.fixture
def x_bert():
    return bert_inputs()


@pytest.fixture
def randomize():
    return randomize_adapters


def randomize_adapters(model: keras.Model, scale: float = 0.1, seed: int = 1) -> None:
    """Gives every LoRA factor nonzero values (Keras starts B at zero, which would hide bugs)."""
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        if "lora" in variable.name:
            variable.assign(rng.normal(0, scale, variable.shape).astype("float32"))


@pytest.fixture
def x_mlp():
    return np.random.default_rng(0).normal(size=(5, 12)).astype("float32")


@pytest.fixture
def x_cnn():
    return np.random.default_rng(0).random((5, 8, 8, 1)).astype("float32")
