"""Dependency graph: coupling patterns map channels correctly, unknown layers are reported."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.structured import build_graph, prune_structured
from keras_lean.structured.surgery import flatten_model

from ._structured_models import concat, depthwise, flatten, nested, residual, separable, transformer
from ._structured_models import unknown as unknown_model

L = keras.layers


def _tag_biases(model, names, offset=0.0):
    """Sets each named layer's bias to offset + channel index so surviving indices are readable."""
    for i, name in enumerate(names):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel, offset + 100.0 * i + np.arange(len(bias), dtype="float32")])


def _kept(model, name, base):
    return (model.get_layer(name).get_weights()[-1] - base).round().astype(int)


def test_residual_branches_keep_identical_channel_sets():
    model = residual(L.Add)()
    _tag_biases(model, ["stem", "branch", "after"])
    # Make the importance of stem and branch disagree, so a wrong coupling would show.
    k = model.get_layer("branch").get_weights()
    k[0] = k[0] * np.linspace(3.0, 0.1, 8, dtype="float32")
    model.get_layer("branch").set_weights(k)
    graph = build_graph(model)
    coupled = [g for g in graph.groups if {"stem:filters", "branch:filters"} <= set(g.producers)]
    assert len(coupled) == 1 and coupled[0].size == 8
    pruned = prune_structured(model, 0.5)
    stem, branch = _kept(pruned, "stem", 0), _kept(pruned, "branch", 100)
    assert len(stem) == 4
    np.testing.assert_array_equal(stem, branch)
    bn = model.get_layer("branch_bn").get_weights()[0]
    np.testing.assert_array_equal(pruned.get_layer("branch_bn").get_weights()[0], bn[stem])
    after = model.get_layer("after").get_weights()[0]
    kept_after = _kept(pruned, "after", 200)
    np.testing.assert_array_equal(
        pruned.get_layer("after").get_weights()[0], after[:, :, stem][..., kept_after]
    )


def test_concat_offsets_map_to_the_right_rows():
    model = concat()
    _tag_biases(model, ["a", "b", "after"])
    pruned = prune_structured(model, 0.5)
    kept_a, kept_b = _kept(pruned, "a", 0), _kept(pruned, "b", 100)
    assert (len(kept_a), len(kept_b)) == (2, 3)
    rows = np.concatenate([kept_a, 4 + kept_b])
    cols = _kept(pruned, "after", 200)
    original = model.get_layer("after").get_weights()[0]
    np.testing.assert_array_equal(
        pruned.get_layer("after").get_weights()[0], original[:, :, rows][..., cols]
    )


def test_flatten_keeps_the_right_dense_rows():
    model = flatten()
    _tag_biases(model, ["c1", "d1"])
    pruned = prune_structured(model, 0.5)
    kept = _kept(pruned, "c1", 0)
    assert len(kept) == 3
    # After 2x2 pooling: 4 positions x 6 channels; channel c of position p is row p * 6 + c.
    rows = np.array([p * 6 + c for p in range(4) for c in kept])
    cols = _kept(pruned, "d1", 100)
    original = model.get_layer("d1").get_weights()[0]
    np.testing.assert_array_equal(pruned.get_layer("d1").get_weights()[0], original[rows][:, cols])


def test_depthwise_multiplier_carries_channels():
    model = depthwise()
    _tag_biases(model, ["c1"])
    pruned = prune_structured(model, 0.5)
    kept = _kept(pruned, "c1", 0)
    dw_kernel, dw_bias = model.get_layer("dw").get_weights()
    new_kernel, new_bias = pruned.get_layer("dw").get_weights()
    np.testing.assert_array_equal(new_kernel, dw_kernel[:, :, kept, :])
    np.testing.assert_array_equal(new_bias, dw_bias.reshape(6, 2)[kept].ravel())
    assert pruned.get_layer("dw_bn").get_weights()[0].shape == (2 * len(kept),)


def test_separable_slices_depthwise_and_pointwise():
    model = separable()
    _tag_biases(model, ["c1"])
    sep = model.get_layer("sep")
    dw, pw, _ = sep.get_weights()
    sep.set_weights([dw, pw, 100.0 + np.arange(8, dtype="float32")])
    pruned = prune_structured(model, 0.5)
    kept, cols = _kept(pruned, "c1", 0), _kept(pruned, "sep", 100)
    assert (len(kept), len(cols)) == (3, 4)
    new_dw, new_pw, _ = pruned.get_layer("sep").get_weights()
    np.testing.assert_array_equal(new_dw, dw[:, :, kept, :])
    rows = np.array([c * 2 + j for c in kept for j in range(2)])
    np.testing.assert_array_equal(new_pw, pw[:, :, rows][..., cols])


def test_attention_heads_embedding_and_feed_forward():
    model = transformer()
    graph = build_graph(model)
    kinds = {g.producers: g.kind for g in graph.groups}
    assert kinds[("mha:heads",)] == "heads"
    stream = [g for g in graph.groups if "emb:output_dim" in g.producers][0]
    # Embedding, attention output and FFN output share the residual stream.
    assert {"emb", "mha", "ln1", "ln2", "ffn_out", "ffn_in"} <= set(stream.layers)
    pruned = prune_structured(model, 0.5)
    mha = pruned.get_layer("mha")
    assert mha.num_heads == 2
    assert pruned.get_layer("emb").output_dim == 8
    assert pruned.get_layer("ffn_in").units == 16
    assert pruned.get_layer("ln1").get_weights()[0].shape == (8,)
    assert tuple(mha._query_dense.kernel.shape) == (8, 2, 4)
    assert tuple(mha._output_dense.kernel.shape) == (2, 4, 8)


def test_heads_keep_their_own_slices():
    model = transformer()
    pruned = prune_structured(model, 0.5, exclude=("emb",))  # stream blocked: only heads/ffn
    old, new = model.get_layer("mha"), pruned.get_layer("mha")
    q_old, q_new = old._query_dense.kernel.numpy(), new._query_dense.kernel.numpy()
    kept = [h for h in range(4) if any(np.array_equal(q_old[:, h], q_new[:, j]) for j in range(2))]
    assert len(kept) == 2
    np.testing.assert_array_equal(
        new._output_dense.kernel.numpy(), old._output_dense.kernel.numpy()[kept]
    )
    np.testing.assert_array_equal(
        new._value_dense.kernel.numpy(), old._value_dense.kernel.numpy()[:, kept]
    )


def test_unknown_layer_is_reported_and_its_groups_kept():
    model = unknown_model()
    graph = build_graph(model)
    assert ("odd", "layer type Doubler is not known to the dependency graph") in [
        (s.name, s.reason) for s in graph.skipped
    ]
    pruned = prune_structured(model, 0.5)
    assert pruned.get_layer("d1").units == 8  # feeds the unknown layer
    assert pruned.get_layer("d2").units == 4


def test_nested_model_is_reported_by_the_graph_and_inlined_by_prune():
    model = nested()
    graph = build_graph(model)
    reasons = dict((s.name, s.reason) for s in graph.skipped)
    assert "nested model" in reasons["inner"]
    pruned = prune_structured(model, 0.5)
    # Inlined: the nested Dense is pruned like any other, its neighbours through it.
    widths = {n: pruned.get_layer(n).units for n in ("d1", "inner_d", "d2", "out")}
    assert widths == {"d1": 4, "inner_d": 3, "d2": 4, "out": 3}
    assert "inner" not in [layer.name for layer in pruned.layers]
    assert model.get_layer("inner").get_layer("inner_d").units == 6  # the caller's model is intact
    same = prune_structured(model, 0.0)
    x = np.random.default_rng(0).normal(size=(4, 10)).astype("float32")
    np.testing.assert_allclose(same(x), model(x), rtol=1e-5, atol=1e-5)


def test_flatten_keeps_a_shared_nested_model_whole_and_renames_clashes():
    inner = keras.Sequential([keras.Input((8,)), L.Dense(8, name="d1")], name="inner")
    once = keras.Sequential([keras.Input((8,)), L.Dense(8, name="d1")], name="once")
    inputs = keras.Input((8,))
    x = L.Dense(8, name="d1")(inputs)
    x = inner(inner(x))  # called twice: shares its weights, stays a nested model
    x = once(x)  # called once: inlined, its d1 renamed
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    flat, kept = flatten_model(model)
    assert kept == ("inner",)
    assert [layer.name for layer in flat.layers][1:] == ["d1", "inner", "once_d1", "out"]
    v = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    np.testing.assert_allclose(flat(v), model(v), rtol=1e-5, atol=1e-5)


def test_excluded_and_output_layers_are_never_narrowed():
    model = unknown_model()
    graph = build_graph(model, exclude=("d2",))
    out_group = [g for g in graph.groups if g.producers == ("out:units",)][0]
    assert not out_group.is_prunable and "model output" in out_group.reason
    assert ("d2", "excluded by the caller") in [(s.name, s.reason) for s in graph.skipped]
    pruned = prune_structured(model, 0.5, exclude=("d*",))
    assert pruned.count_params() == model.count_params()


def test_softmax_and_moved_channels_block():
    inputs = keras.Input((4, 4, 2))
    x = L.Conv2D(6, 1, name="c1")(inputs)
    x = L.Reshape((4, 24), name="mix")(x)  # channels leave the last axis
    x = L.Dense(5, name="d1")(x)
    x = L.Softmax(name="sm")(x)
    x = L.Flatten()(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    reasons = dict((s.name, s.reason) for s in build_graph(model).skipped)
    assert "moves channels off the last axis" in reasons["mix"]
    assert "mixes channels" in reasons["sm"]
    pruned = prune_structured(model, 0.5)
    assert pruned.get_layer("c1").filters == 6 and pruned.get_layer("d1").units == 5


def test_shared_layer_ties_its_calls():
    inputs = keras.Input((6,))
    x = L.Dense(8, name="d0")(inputs)
    shared = L.Dense(8, activation="relu", name="shared")
    x = shared(shared(x))
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    graph = build_graph(model)
    tied = [g for g in graph.groups if "d0:units" in g.producers][0]
    assert "shared:units" in tied.producers
    data = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    np.testing.assert_allclose(prune_structured(model, 0.0)(data), model(data), atol=1e-5)
    pruned = prune_structured(model, 0.5)
    assert pruned.get_layer("shared").units == 4 and pruned(data).shape == (3, 2)


def test_unsupported_models_raise():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed model"):
        build_graph(Sub())
    with pytest.raises(ValueError, match="is not built"):
        build_graph(keras.Sequential([L.Dense(2)]))
    with pytest.raises(ValueError, match="Expected a Keras 3 Sequential or functional model"):
        build_graph(L.Dense(2))


def test_keras_ops_in_the_graph_are_reported_and_kept():
    inputs = keras.Input((6,))
    x = L.Dense(8, name="d1")(inputs)
    x = L.Dense(8, name="d2")(keras.ops.relu(x) * 2.0)
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    reasons = dict((s.name, s.reason) for s in build_graph(model).skipped)
    assert reasons["relu"] == "operation Relu is not a layer"
    data = np.ones((2, 6), "float32")
    np.testing.assert_allclose(prune_structured(model, 0.0)(data), model(data), atol=1e-5)
    pruned = prune_structured(model, 0.5)
    assert pruned.get_layer("d1").units == 8 and pruned.get_layer("d2").units == 4
