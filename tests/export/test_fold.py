"""fold_batchnorm: BatchNormalization merged into the Conv/Depthwise/Dense before it."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.export import fold_batchnorm

L = keras.layers


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("f4"),
                    rng.normal(size=beta.shape).astype("f4"),
                    rng.normal(size=mean.shape).astype("f4"),
                    rng.uniform(0.5, 2.0, var.shape).astype("f4"),
                ]
            )
    return model


def _net():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = L.ReLU()(L.BatchNormalization(name="bn1")(x))  # folds (no bias: one is added)
    y = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    y = L.BatchNormalization(name="bn_dw")(y)  # folds (depthwise: multiplier layout)
    y = L.Conv2D(6, 1, name="pw")(y)
    z = L.BatchNormalization(name="bn_shared")(y)  # pw's output also feeds the add: stays
    x = L.Add()([x, y, z])
    x = L.Conv2D(4, 3, activation="relu", name="c_act")(x)
    x = L.BatchNormalization(name="bn_after_act")(x)  # after an activation: stays
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(5, name="d")(x)
    x = L.BatchNormalization(name="bn_d")(x)  # folds
    return keras.Model(inputs, x)


def test_folds_what_it_can_and_keeps_the_outputs():
    model = _randomize_bn(_net())
    folded, names = fold_batchnorm(model)
    assert sorted(names) == ["bn1", "bn_d", "bn_dw"]
    left = sorted(la.name for la in folded.layers if isinstance(la, L.BatchNormalization))
    assert left == ["bn_after_act", "bn_shared"]
    assert folded.get_layer("c1").use_bias and folded.count_params() < model.count_params()
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(folded(x), model(x, training=False), rtol=1e-4, atol=1e-4)
    assert len(model.get_layer("c1").weights) == 1  # the caller's model is untouched


def test_sequential_stays_sequential_and_saves(tmp_path):
    model = _randomize_bn(
        keras.Sequential(
            [
                keras.Input((10,)),
                L.Dense(8, name="d1"),
                L.BatchNormalization(name="bn"),
                L.ReLU(),
                L.Dense(3, name="out"),
            ]
        )
    )
    folded, names = fold_batchnorm(model)
    assert names == ("bn",) and isinstance(folded, keras.Sequential)
    path = tmp_path / "folded.keras"
    folded.save(path)
    x = np.random.default_rng(0).normal(size=(5, 10)).astype("float32")
    np.testing.assert_allclose(
        keras.models.load_model(path)(x), model(x, training=False), rtol=1e-4, atol=1e-4
    )


def test_nothing_to_fold_returns_an_equal_copy():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(2, activation="relu", name="d")(inputs))
    folded, names = fold_batchnorm(model)
    assert names == () and folded is not model
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(folded(x), model(x))


def test_rejects_a_subclassed_model():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed model"):
        fold_batchnorm(Sub())
