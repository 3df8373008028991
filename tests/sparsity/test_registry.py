"""Which layers are prunable: the built-in registry and user layers (`PrunableLayer` protocol)."""

from __future__ import annotations

import abc
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_lean.sparsity import (
    ConstantSparsity,
    PrunableLayer,
    PrunableWeight,
    check_m_by_n,
    get_masks,
    is_prunable,
    prunable_weights,
    prune_low_magnitude,
    pruning_wrappers,
    register_prunable,
    registry,
    sparsity_report,
    strip_pruning,
)

L = keras.layers


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class Scaled(keras.layers.Layer):
    """A user layer with TFMOT's protocol: `w` is pruned, `scale` is not."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(input_shape[-1], self.units))
        self.scale = self.add_weight(name="scale", shape=(self.units,), initializer="ones")

    def call(self, x):
        return (x @ self.w) * self.scale

    def get_prunable_weights(self):
        return [self.w]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class _TfmotLikePrunableLayer(abc.ABC):
    """What `tfmot.sparsity.keras.PrunableLayer` is: an ABC with one abstract method."""

    @abc.abstractmethod
    def get_prunable_weights(self):
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class AbcScaled(Scaled, _TfmotLikePrunableLayer):
    pass


@pytest.fixture
def restore_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def _data(n=64, d=16, out=4):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)).astype("float32"), rng.normal(size=(n, out)).astype("float32")


@pytest.mark.parametrize(
    "layer_class,expected",
    [
        (L.Dense, ["kernel"]),
        (L.EinsumDense, ["kernel"]),
        (L.Conv2D, ["kernel"]),
        (L.DepthwiseConv2D, ["depthwise_kernel"]),
        (L.SeparableConv2D, ["depthwise_kernel", "pointwise_kernel"]),
        (L.Embedding, ["embeddings"]),
        (L.MultiHeadAttention, ["query/kernel", "key/kernel", "value/kernel", "output/kernel"]),
    ],
    ids=["dense", "einsum", "conv", "depthwise", "separable", "embedding", "mha"],
)
def test_builtins_are_registry_entries(layer_class, expected):
    assert layer_class in registry._REGISTRY and layer_class.__name__ in (
        registry.prunable_layer_types()
    )
    layer = {
        L.Dense: lambda: L.Dense(3),
        L.EinsumDense: lambda: L.EinsumDense("ab,bc->ac", output_shape=3),
        L.Conv2D: lambda: L.Conv2D(3, 3),
        L.DepthwiseConv2D: lambda: L.DepthwiseConv2D(3),
        L.SeparableConv2D: lambda: L.SeparableConv2D(3, 3),
        L.Embedding: lambda: L.Embedding(10, 4),
        L.MultiHeadAttention: lambda: L.MultiHeadAttention(2, 4),
    }[layer_class]()
    if isinstance(layer, L.MultiHeadAttention):
        layer.build((None, 5, 8), (None, 5, 8))
    elif isinstance(layer, L.Embedding):
        layer.build((None, 5))
    elif isinstance(layer, L.Dense | L.EinsumDense):
        layer.build((None, 8))
    else:
        layer.build((None, 8, 8, 4))
    assert [w.name for w in prunable_weights(layer)] == expected


def test_transposed_convolutions_and_other_layers_are_not_prunable():
    for layer in (L.Conv2DTranspose(2, 3), L.Flatten(), L.BatchNormalization(), L.Dropout(0.1)):
        assert not is_prunable(layer) and prunable_weights(layer) is None


@pytest.mark.parametrize("cls", [Scaled, AbcScaled], ids=["duck-typed", "tfmot-style-abc"])
def test_a_user_layer_with_get_prunable_weights_is_pruned(cls, tmp_path):
    layer = cls(8, name="mix")
    assert isinstance(layer, PrunableLayer) and is_prunable(layer)
    model = keras.Sequential([keras.Input((16,)), layer, L.Dense(4, name="head")])
    pruned = prune_low_magnitude(model, ConstantSparsity(0.75, begin_step=0, frequency=1))
    assert sorted(w.layer.name for w in pruning_wrappers(pruned)) == ["head", "mix"]
    pruned.compile("adam", "mse")
    pruned.fit(*_data(), epochs=1, verbose=0)
    assert set(get_masks(pruned)) == {"mix/w", "head/kernel"}
    small = strip_pruning(pruned)
    w = small.get_layer("mix").w.numpy()
    assert abs((w == 0).mean() - 0.75) < 0.01
    assert np.count_nonzero(small.get_layer("mix").scale.numpy()) == 8  # not pruned
    rows = {r.name: r for r in sparsity_report(small).layers}
    assert rows["mix"].params == 16 * 8 and abs(rows["mix"].sparsity - 0.75) < 0.01
    x, _ = _data(8)
    np.testing.assert_allclose(small.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5
    )


def test_n_by_m_runs_along_the_input_axis_of_a_user_weight():
    model = keras.Sequential([keras.Input((16,)), Scaled(8, name="mix")])
    pruned = prune_low_magnitude(model, ConstantSparsity(0.5, frequency=1), sparsity_m_by_n=(2, 4))
    pruned.compile("adam", "mse")
    pruned.fit(*_data(out=8), epochs=1, verbose=0)
    assert check_m_by_n(pruned, 4, 2) == {"mix": True}
    w = strip_pruning(pruned).get_layer("mix").w.numpy()  # (16 inputs, 8 outputs)
    assert ((w.T.reshape(8, 4, 4) != 0).sum(-1) <= 2).all()


def test_the_protocol_takes_precedence_over_the_registry():
    class BiasOnlyDense(L.Dense):
        def get_prunable_weights(self):
            return [self.bias]

    layer = BiasOnlyDense(4)
    layer.build((None, 3))
    assert [w.variable is layer.bias for w in prunable_weights(layer)] == [True]


def test_get_prunable_weights_must_return_variables():
    class Bad(L.Dense):
        def get_prunable_weights(self):
            return [np.zeros(3)]

    layer = Bad(4, name="bad")
    layer.build((None, 3))
    with pytest.raises(TypeError, match=r"get_prunable_weights\(\) of layer 'bad' must return"):
        prunable_weights(layer)


def test_register_prunable_adds_and_removes_layer_classes(restore_registry):
    class Frozen(L.Dense):
        pass

    class Third(keras.layers.Layer):  # a layer whose source the user cannot edit
        def build(self, input_shape):
            self.table = self.add_weight(name="table", shape=(input_shape[-1], 6))

        def call(self, x):
            return x @ self.table

    assert is_prunable(Frozen(2)) and not is_prunable(Third())
    register_prunable(Frozen, None)
    register_prunable(Third, lambda layer: [PrunableWeight("table", layer.table, 0)])
    assert not is_prunable(Frozen(2))
    third = Third()
    third.build((None, 5))
    assert is_prunable(third) and prunable_weights(third)[0].variable is third.table
    with pytest.raises(ValueError, match=r"Layer 'frozen' of type Frozen cannot be pruned"):
        prune_low_magnitude(Frozen(2, name="frozen"))


@pytest.mark.parametrize(
    "args,match",
    [
        (("Dense", None), r"layer_class must be a keras.layers.Layer subclass"),
        ((int, None), r"layer_class must be a keras.layers.Layer subclass"),
        ((L.Dense, "kernel"), r"weights_fn must be a callable"),
    ],
    ids=["string", "not-a-layer", "not-callable"],
)
def test_register_prunable_errors(args, match):
    with pytest.raises(TypeError, match=match):
        register_prunable(*args)


_TFMOT_SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np
    from keras_lean.sparsity import ConstantSparsity, prune_low_magnitude, strip_pruning
    from keras_lean.sparsity.schedules import import_tfmot

    tfmot = import_tfmot()

    class Mix(keras.layers.Layer, tfmot.sparsity.keras.PrunableLayer):
        def build(self, shape):
            self.w = self.add_weight(name="w", shape=(shape[-1], 8))
        def call(self, x):
            return x @ self.w
        def get_prunable_weights(self):
            return [self.w]

    model = keras.Sequential([keras.Input((16,)), Mix(name="mix")])
    pruned = prune_low_magnitude(model, ConstantSparsity(0.5, begin_step=0, frequency=1))
    pruned.compile("sgd", "mse")
    pruned.fit(np.ones((8, 16), "f4"), np.ones((8, 8), "f4"), verbose=0)
    mask = pruned.layers[0].mask_variables[0].numpy()
    print("ZEROS", int((mask == 0).sum()))
    """
)


def test_a_layer_written_for_tfmot_prunable_layer_works_unchanged():
    pytest.importorskip("tensorflow_model_optimization")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run(
        [sys.executable, "-c", _TFMOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    zeros = [line for line in out.stdout.splitlines() if line.startswith("ZEROS")]
    assert zeros == ["ZEROS 64"]  # half of the 16 x 8 kernel
