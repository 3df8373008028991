"""Tests for keras_lean.flops against hand counts."""

from __future__ import annotations

import keras
import pytest

from keras_lean.flops import FlopsReport, count_flops, training_flops

L = keras.layers


def _small_cnn():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)  # 8*8*4 out, 9*1 in
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.MaxPooling2D(2, name="pool")(x)  # 4*4*4 out, window 4
    y = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)  # 4*4*8
    y = L.Conv2D(4, 1, name="pw")(y)  # 4*4*4 out, 8 in
    x = L.Add(name="add")([x, y])  # 64 elements
    x = L.Flatten(name="flat")(x)
    outputs = L.Dense(10, name="head")(x)  # 64 -> 10
    return keras.Model(inputs, outputs)


def test_hand_count_small_cnn():
    report = count_flops(_small_cnn())
    rows = report.by_name()
    hand = {
        "conv": 256 * (2 * 9 * 1 + 1),
        "bn": 2 * 256,
        "relu": 0,
        "pool": 64 * 4,
        "dw": 128 * (2 * 9 + 1),
        "pw": 64 * (2 * 8 + 1),
        "add": 64,
        "flat": 0,
        "head": 10 * (2 * 64 + 1),
    }
    assert {n: rows[n].flops for n in hand} == hand
    assert report.total == sum(hand.values())
    assert report.params == _small_cnn().count_params()
    assert rows["conv"].params == 4 * 9 + 4
    assert all(r.note == "" for r in report.rows)


def test_training_flops_is_three_times_forward():
    model = _small_cnn()
    assert training_flops(model, 100) == 3 * 100 * count_flops(model).total


def test_nested_and_shared_layers():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(3, name="inner_dense")], name="inner")
    shared = L.Dense(6, use_bias=False, name="shared")
    inputs = keras.Input((6,))
    x = shared(shared(inputs))  # called twice: FLOPs twice, params once
    outputs = inner(x)
    model = keras.Model(inputs, outputs)
    report = count_flops(model)
    rows = report.by_name()
    assert rows["shared"].flops == 2 * (2 * 36)
    assert rows["shared"].params == 36
    assert rows["inner/inner_dense"].flops == 3 * (2 * 6 + 1)
    assert report.params == model.count_params()


def test_attention_and_einsum():
    tokens = keras.Input((5,), dtype="int32")
    x = L.Embedding(20, 8, name="emb")(tokens)
    x = L.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = L.LayerNormalization(name="ln")(x)
    x = L.EinsumDense("abc,cd->abd", (5, 3), bias_axes="d", name="ein")(x)
    model = keras.Model(tokens, x)
    rows = count_flops(model).by_name()
    t, d, h, k = 5, 8, 2, 4
    proj = 3 * t * h * k * (2 * d + 1)
    attn = 2 * h * t * t * k * 2
    out = t * d * (2 * h * k + 1)
    assert rows["emb"].flops == 0
    assert rows["mha"].flops == proj + attn + out
    assert rows["ln"].flops == 7 * t * d
    assert rows["ein"].flops == 2 * t * d * 3 + t * 3


def test_wrapper_is_counted_as_inner_layer():
    class Wrap(L.Wrapper):
        def call(self, x):
            return self.layer(x)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Wrap(L.Dense(2), name="w")(inputs))
    row = count_flops(model).by_name()["w"]
    assert (row.class_name, row.flops, row.params) == ("Dense", 2 * (2 * 4 + 1), 10)


def test_unknown_layer_is_noted():
    class Odd(L.Layer):
        def call(self, x):
            return x * 2.0

    inputs = keras.Input((4,))
    model = keras.Model(inputs, Odd(name="odd")(inputs))
    row = count_flops(model).by_name()["odd"]
    assert row.flops == 0 and "Odd" in row.note


def test_ops_in_a_functional_graph_have_no_parameters():
    inputs = keras.Input((3, 4))
    x = L.Dense(5, name="d")(inputs)[:, 0] * 2.0  # GetItem and Multiply operations, not layers
    report = count_flops(keras.Model(inputs, x))
    assert report.params == 4 * 5 + 5
    assert report.total == 3 * 5 * (2 * 4 + 1)


def test_report_to_dict():
    report = count_flops(_small_cnn())
    d = report.to_dict()
    assert isinstance(report, FlopsReport)
    assert d["total_flops"] == report.total and len(d["layers"]) == len(report.rows)


def test_errors():
    with pytest.raises(ValueError, match="samples must be an integer >= 0"):
        training_flops(_small_cnn(), -1)
    with pytest.raises(ValueError, match="expects a Keras 3 model"):
        count_flops(L.Dense(3))
    with pytest.raises(ValueError, match="not built"):
        count_flops(keras.Sequential([L.Dense(3)]))


def test_structured_masks_are_not_parameters():
    from keras_lean.sparsity.schedules import ConstantSparsity
    from keras_lean.structured import prune_structured_gradually

    model = _small_cnn()
    masked = prune_structured_gradually(model, ConstantSparsity(0.5, begin_step=0, frequency=1))
    before, after = count_flops(model), count_flops(masked)
    assert after.params == before.params
    assert after.total == before.total
    assert all(r.note == "" for r in after.rows)


def _decoder_hand_count(t, d, h, k, ff, s=None):
    """A TransformerDecoder by hand: per attention 3 projections + 2 matmuls + the output
    projection; per sub-block a LayerNorm (7/element) and a residual add (1/element)."""

    def attention(tq, tk):
        return (
            tq * h * k * (2 * d + 1)
            + 2 * tk * h * k * (2 * d + 1)
            + 2 * 2 * h * tq * tk * k
            + tq * d * (2 * h * k + 1)
        )

    blocks = 2 if s is None else 3
    f = attention(t, t) + (0 if s is None else attention(t, s))
    return f + t * ff * (2 * d + 1) + t * d * (2 * ff + 1) + blocks * 8 * t * d


@pytest.mark.parametrize("cross", [False, True], ids=["self-attention", "with-cross-attention"])
def test_transformer_decoder(cross):
    keras_hub = pytest.importorskip("keras_hub")
    t, s, d, h, ff = 6, 4, 8, 2, 12
    dec = keras.Input((t, d))
    enc = keras.Input((s, d))
    block = keras_hub.layers.TransformerDecoder(ff, h, name="dec")
    model = keras.Model([dec, enc] if cross else dec, block(dec, enc) if cross else block(dec))
    row = count_flops(model).by_name()["dec"]
    assert row.note == ""
    assert row.flops == _decoder_hand_count(t, d, h, d // h, ff, s if cross else None)
    assert row.params == block.count_params()


def test_pruned_decoder_counts_its_head_dim():
    pytest.importorskip("keras_hub")
    from keras_lean.structured.hub_layers import PrunedTransformerDecoder

    t, d, ff = 5, 8, 12
    inputs = keras.Input((t, d))
    block = PrunedTransformerDecoder(ff, 1, head_dim=4, name="dec")  # one head of 4 of 8
    row = count_flops(keras.Model(inputs, block(inputs))).by_name()["dec"]
    assert row.flops == _decoder_hand_count(t, d, 1, 4, ff)


def test_gpt2_causal_lm_counts_blocks_and_tied_output_projection():
    pytest.importorskip("keras_hub")
    from tests.structured._hub_models import gpt2_backbone

    t, d, h, ff, vocab, layers = 6, 8, 2, 16, 30, 2
    backbone = gpt2_backbone(vocab=vocab, heads=h, hidden=d, ff=ff, max_len=t, layers=layers)
    ids = keras.Input((t,), dtype="int32")
    mask = keras.Input((t,), dtype="bool")
    hidden = backbone({"token_ids": ids, "padding_mask": mask})
    logits = backbone.token_embedding(hidden, reverse=True)
    report = count_flops(keras.Model([ids, mask], logits))
    rows = report.by_name()
    for i in range(layers):
        row = rows[f"gpt2_backbone/transformer_layer_{i}"]
        assert row.flops == _decoder_hand_count(t, d, h, d // h, ff)
    assert rows["token_embedding"].flops == 2 * t * d * vocab
    assert rows["gpt2_backbone/token_embedding"].flops == 0
    assert not [r.name for r in report.rows if "not counted" in r.note]
