"""Channel rules: the built-in layers go through the registry, and a user's block plugs in."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity import ConstantSparsity
from keras_lean.structured import (
    ChannelRule,
    PassThrough,
    Producer,
    UnsupportedLayer,
    build_graph,
    get_channel_rule,
    prune_structured,
    prune_structured_gradually,
    register_channel_rule,
    rules,
    shrink,
)

L = keras.layers


@pytest.fixture(autouse=True)
def restore_rules():
    saved = dict(rules._CLASS_RULES)
    yield
    rules._CLASS_RULES.clear()
    rules._CLASS_RULES.update(saved)


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class Gated(keras.layers.Layer):
    """(x @ kernel + bias) * sigmoid(x @ gate): each unit owns a column of both kernels."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        d = input_shape[-1]
        self.kernel = self.add_weight(name="kernel", shape=(d, self.units))
        self.gate = self.add_weight(name="gate", shape=(d, self.units))
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros")

    def call(self, x):
        return (x @ self.kernel + self.bias) * keras.ops.sigmoid(x @ self.gate)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class GatedRule(ChannelRule):
    def trace(self, layer, ctx):
        x = ctx.need_input()
        out = ctx.produce(layer.units, "units")
        for weight in ("kernel", "gate"):
            ctx.slice(weight, 0, x)
            ctx.slice(weight, 1, out)
        ctx.slice("bias", 0, out, kind="bias")
        return out

    def resize(self, layer, config, ctx):
        config["units"] = ctx.kept(ctx.output)
        return config


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class Twice(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def _gated_model():
    inputs = keras.Input((12,))
    x = Gated(16, name="gated")(inputs)
    x = Twice(name="twice")(x)
    x = L.Dense(10, activation="relu", name="hidden")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def _x(n=16):
    return np.random.default_rng(0).normal(size=(n, 12)).astype("float32")


@pytest.mark.parametrize(
    "layer,rule_class",
    [
        (L.Dense(2), Producer),
        (L.Conv2D(2, 3), Producer),
        (L.ReLU(), PassThrough),
        (L.MaxPooling2D(), PassThrough),
        (L.EinsumDense("ab,bc->ac", 3), rules.UnsupportedRule),
        (L.Conv2DTranspose(2, 3), rules.UnsupportedRule),
    ],
    ids=["dense", "conv", "relu", "pool", "einsum", "transpose"],
)
def test_builtin_layers_have_registered_rules(layer, rule_class):
    assert isinstance(get_channel_rule(layer), rule_class)


def test_the_graph_and_surgery_use_the_registered_rule():
    model = _gated_model()
    before = {s.name: s.reason for s in build_graph(model).skipped}
    assert before["gated"] == "layer type Gated is not known to the dependency graph"
    register_channel_rule(Gated, GatedRule())
    register_channel_rule(Twice, PassThrough())
    graph = build_graph(model)
    assert not graph.skipped
    assert isinstance(graph.rules["gated"], GatedRule)
    assert [g.producers for g in graph.groups if g.is_prunable] == [
        ("gated:units",),
        ("hidden:units",),
    ]
    assert {s.weight for s in graph.slices["gated"]} == {"kernel", "gate", "bias"}
    np.testing.assert_allclose(prune_structured(model, 0.0)(_x()), model(_x()), atol=1e-5)
    small = prune_structured(model, 0.5)
    assert small.get_layer("gated").units == 8
    assert tuple(small.get_layer("hidden").kernel.shape) == (8, 5)
    # kernel, gate and bias lose the same units, and the survivors keep their order
    old, new = model.get_layer("gated"), small.get_layer("gated")
    old_k, new_k = old.kernel.numpy(), new.kernel.numpy()
    kept = [int(np.flatnonzero(np.all(old_k == new_k[:, [j]], axis=0))[0]) for j in range(8)]
    assert kept == sorted(kept)
    np.testing.assert_array_equal(new.gate.numpy(), old.gate.numpy()[:, kept])
    rows = model.get_layer("hidden").kernel.numpy()[kept]  # the next layer loses the same rows
    new_hidden = small.get_layer("hidden").kernel.numpy()
    assert all(np.any(np.all(rows == new_hidden[:, [j]], axis=0)) for j in range(5))


def test_gradual_masks_and_shrink_follow_a_user_rule():
    register_channel_rule(Gated, GatedRule())
    register_channel_rule(Twice, PassThrough())
    model = _gated_model()
    masked = prune_structured_gradually(model, ConstantSparsity(0.5, begin_step=0, frequency=1))
    mask_names = [layer.name for layer in masked.layers if "mask" in layer.name]
    assert mask_names == ["gated_mask", "hidden_mask"]  # Twice preserves zeros: no mask
    masked.compile("adam", "mse")
    masked.fit(_x(), np.zeros((16, 3), "float32"), epochs=1, verbose=0)
    small = shrink(masked)
    assert small.get_layer("gated").units == 8 and small.get_layer("hidden").units == 5
    np.testing.assert_allclose(small(_x()), masked(_x()), atol=1e-5)


def test_pass_through_without_zero_preservation_gets_a_mask():
    register_channel_rule(Gated, GatedRule())
    register_channel_rule(Twice, PassThrough(zero_preserving=False))
    masked = prune_structured_gradually(_gated_model(), ConstantSparsity(0.5, 0, frequency=1))
    assert "twice_mask" in [layer.name for layer in masked.layers]


def test_a_rule_that_gives_up_halfway_leaves_no_trace():
    class HalfRule(GatedRule):
        def trace(self, layer, ctx):
            x = ctx.need_input()
            ctx.slice("kernel", 0, x)
            ctx.unite([x, x])
            raise UnsupportedLayer("gate width unknown")

    register_channel_rule(Gated, HalfRule())
    graph = build_graph(_gated_model())
    assert ("gated", "gate width unknown") in [(s.name, s.reason) for s in graph.skipped]
    assert "gated" not in graph.slices and "gated" not in graph.rules
    assert prune_structured(_gated_model(), 0.5).get_layer("gated").units == 16


def test_a_registration_for_a_subclass_wins_over_its_base():
    class NoPrune(L.Dense):
        pass

    register_channel_rule(NoPrune, rules.UnsupportedRule("kept whole on purpose"))
    inputs = keras.Input((6,))
    x = NoPrune(8, name="fixed")(inputs)
    x = L.Dense(8, name="free")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    reasons = {s.name: s.reason for s in build_graph(model).skipped}
    assert reasons == {"fixed": "kept whole on purpose"}
    small = prune_structured(model, 0.5)
    assert small.get_layer("fixed").units == 8 and small.get_layer("free").units == 4


@pytest.mark.parametrize(
    "args,match",
    [
        (("Dense", PassThrough()), r"layer_class must be a keras.layers.Layer subclass"),
        ((L.Dense, "units"), r"rule must be a keras_lean.structured.ChannelRule instance"),
        ((L.Dense, GatedRule), r"Received: type"),
    ],
    ids=["class-name", "not-a-rule", "rule-class-not-instance"],
)
def test_register_channel_rule_errors(args, match):
    with pytest.raises(TypeError, match=match):
        register_channel_rule(*args)
