"""Whole attention heads removed from keras-hub TransformerEncoder blocks (tiny BERT from config).

Pinned to the keras-hub versions pyproject.toml allows (keras-hub>=0.20,<0.33): keras-hub derives
key_dim = hidden_dim // num_heads, so a pruned block becomes `PrunedTransformerEncoder`, which
keeps each head's width while `num_heads` falls.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.flops import count_flops
from keras_lean.structured import build_graph, prune_structured
from keras_lean.structured.api import resolve_importance

keras_hub = pytest.importorskip("keras_hub")

from keras_lean.structured.hub_layers import PrunedTransformerEncoder  # noqa: E402

HIDDEN, HEADS, FF, LAYERS = 16, 4, 32, 2
HEAD_DIM = HIDDEN // HEADS
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _flat_bert(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=LAYERS,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=FF,
        max_sequence_length=16,
    )
    x = keras.layers.Dropout(0.1)(backbone.output["pooled_output"])
    return keras.Model(backbone.inputs, keras.layers.Dense(3, name="logits")(x))


def _inputs(batch=4, seq=8):
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, 64, (batch, seq)).astype("int32"),
        "segment_ids": np.zeros((batch, seq), "int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def _weights(layer):
    return {w.path.split("/", 1)[1]: w for w in layer.weights}


def _silence(layer, heads, neurons, qkv=True):
    """Makes `heads` and feed-forward `neurons` of a block contribute exactly nothing: their
    output-projection rows (and, with `qkv`, their query/key/value columns) and their feed-forward
    weights become zero."""
    w = _weights(layer)

    def zero(path, axis, index):
        v = w[path].numpy()
        sl = [slice(None)] * v.ndim
        sl[axis] = index
        v[tuple(sl)] = 0.0
        w[path].assign(v)

    zero("self_attention_layer/attention_output/kernel", 0, heads)
    if qkv:
        for part in ("query", "key", "value"):
            zero(f"self_attention_layer/{part}/kernel", 1, heads)
            zero(f"self_attention_layer/{part}/bias", 0, heads)
    zero("feedforward_intermediate_dense/kernel", 1, neurons)
    zero("feedforward_intermediate_dense/bias", 0, neurons)
    zero("feedforward_output_dense/kernel", 0, neurons)


def test_graph_has_one_head_group_per_encoder():
    graph = build_graph(_flat_bert(), exclude=("logits",))
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert [(g.producers, g.size, g.is_prunable) for g in heads] == [
        (("transformer_layer_0:heads",), HEADS, True),
        (("transformer_layer_1:heads",), HEADS, True),
    ]
    assert sorted(graph.heads) == ["transformer_layer_0", "transformer_layer_1"]


def test_ratio_zero_keeps_the_keras_hub_class_and_the_outputs():
    model = _flat_bert()
    same = prune_structured(model, 0.0, exclude=("logits",))
    assert type(same.get_layer("transformer_layer_0")) is keras_hub.layers.TransformerEncoder
    np.testing.assert_array_equal(same(_inputs()), model(_inputs()))


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"], ids=["l1", "l2", "taylor"])
def test_silent_heads_are_the_ones_removed_and_the_outputs_stay(importance):
    model = _flat_bert()
    enc = model.get_layer("transformer_layer_0")
    heads, neurons = [1, 3], list(range(0, FF, 2))
    _silence(enc, heads, neurons)
    query = _weights(enc)["self_attention_layer/query/kernel"].numpy()
    x, y = _inputs(), np.array([0, 1, 2, 0])

    small = prune_structured(
        model,
        0.5,
        importance,
        data=(x, y),
        loss=LOSS,
        batch_size=4,
        exclude=("logits", "transformer_layer_1"),
    )
    new = small.get_layer("transformer_layer_0")
    assert isinstance(new, PrunedTransformerEncoder)
    assert (new.num_heads, new.head_dim, new.intermediate_dim) == (HEADS // 2, HEAD_DIM, FF // 2)
    kept = _weights(new)["self_attention_layer/query/kernel"].numpy()
    np.testing.assert_array_equal(kept, query[:, [0, 2], :])
    assert tuple(_weights(new)["self_attention_layer/attention_output/kernel"].shape) == (
        HEADS // 2,
        HEAD_DIM,
        HIDDEN,
    )
    assert small.get_layer("transformer_layer_1").num_heads == HEADS  # excluded
    np.testing.assert_allclose(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_taylor_finds_heads_whose_output_is_cut_even_with_live_projections():
    # l1 still sees the query/key/value weights of these heads; their gradient x weight is 0.
    model = _flat_bert()
    _silence(model.get_layer("transformer_layer_0"), [0, 2], list(range(FF // 2)), qkv=False)
    x, y = _inputs(batch=8), np.arange(8) % 3
    small = prune_structured(
        model, 0.5, "taylor", data=(x, y), loss=LOSS, exclude=("logits", "transformer_layer_1")
    )
    np.testing.assert_allclose(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_at_least_one_head_survives():
    small = prune_structured(_flat_bert(), 0.99, "l1", exclude=("logits",))
    assert [small.get_layer(f"transformer_layer_{i}").num_heads for i in range(LAYERS)] == [1, 1]
    assert small(_inputs()).shape == (4, 3)


def test_pruned_encoder_saves_reloads_trains_and_exports(tmp_path):
    import tensorflow as tf

    small = prune_structured(_flat_bert(), 0.5, "l1", exclude=("logits",))
    x, y = _inputs(), np.array([0, 1, 2, 0])
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: registered under keras_lean
    enc = loaded.get_layer("transformer_layer_0")
    assert isinstance(enc, PrunedTransformerEncoder)
    assert (enc.num_heads, enc.get_config()["head_dim"]) == (HEADS // 2, HEAD_DIM)
    np.testing.assert_allclose(loaded(x), small(x), rtol=1e-6, atol=1e-6)

    before = [w.numpy().copy() for w in enc.weights]
    loaded.compile(keras.optimizers.Adam(1e-2), LOSS)
    history = loaded.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, enc.weights, strict=True))

    export_dir = str(tmp_path / "saved_model")
    loaded.export(export_dir, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(export_dir)  # kept: its variables live as long as it does
    served = reloaded.serve([x[t.name] for t in loaded.inputs])
    np.testing.assert_allclose(served, loaded(x), rtol=1e-5, atol=1e-5)


def test_flops_follow_the_head_count():
    model = _flat_bert()
    small = prune_structured(model, 0.5, "l1", exclude=("logits",))
    before = count_flops(model).by_name()["transformer_layer_0"].flops
    after = count_flops(small).by_name()["transformer_layer_0"].flops
    d, h, f = HIDDEN, HEADS // 2, FF // 2
    inner = h * HEAD_DIM
    # 1 token: q/k/v projections, 2 attention matmuls, output projection; ff; 2 LayerNorms; adds
    expected = 3 * inner * (2 * d + 1) + 4 * inner + d * (2 * inner + 1)
    expected += f * (2 * d + 1) + d * (2 * f + 1) + 14 * d + 2 * d
    assert after == expected < before


def test_a_subclass_of_the_encoder_keeps_its_heads():
    class MyEncoder(keras_hub.layers.TransformerEncoder):
        pass

    inputs = keras.Input((8, HIDDEN))
    x = keras.layers.Dense(HIDDEN, name="proj")(inputs)
    x = MyEncoder(FF, HEADS, name="mine")(x)
    graph = build_graph(keras.Model(inputs, keras.layers.Dense(2, name="out")(x)))
    heads = next(g for g in graph.groups if g.kind == "heads")
    assert not heads.is_prunable and "subclass of a keras-hub block" in heads.reason


@pytest.mark.parametrize(
    ("with_data", "with_loss", "expected"),
    [(True, True, "taylor"), (False, True, "l1"), (True, False, "l1")],
    ids=["data-and-loss", "no-data", "no-loss"],
)
def test_auto_importance_is_taylor_for_transformers_given_data(with_data, with_loss, expected):
    graph = build_graph(_flat_bert(), exclude=("logits",))
    data = (_inputs(), np.zeros(4)) if with_data else None
    assert resolve_importance("auto", graph, data, LOSS if with_loss else None) == expected
    assert resolve_importance("l2", graph, data, LOSS) == "l2"


def test_auto_importance_is_l1_without_attention():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(8)(inputs)))
    graph = build_graph(model)
    assert resolve_importance("auto", graph, (np.zeros((2, 6)), np.zeros(2)), "mse") == "l1"
