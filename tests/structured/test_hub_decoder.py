"""Heads and feed-forward neurons removed from keras-hub TransformerDecoder blocks: a tiny GPT-2
causal LM built from config (no download), and a decoder with cross attention.

Pinned to the keras-hub versions pyproject.toml allows (keras-hub>=0.20,<0.33).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.structured import build_graph, prune_structured

keras_hub = pytest.importorskip("keras_hub")

from keras_lean.structured.hub_layers import PrunedTransformerDecoder  # noqa: E402
from tests.structured._hub_models import gpt2_causal_lm  # noqa: E402

VOCAB, HIDDEN, HEADS, FF, LAYERS = 64, 16, 4, 32, 2
HEAD_DIM = HIDDEN // HEADS
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _gpt2():
    return gpt2_causal_lm(vocab=VOCAB, heads=HEADS, hidden=HIDDEN, ff=FF, max_len=16, layers=LAYERS)


def _inputs(batch=4, seq=8):
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, VOCAB, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def _decoders(model):
    return [la for la in model.layers if isinstance(la, keras_hub.layers.TransformerDecoder)]


def _weights(layer):
    return {w.path.split("/", 1)[1]: w for w in layer.weights}


def _zero(weight, axis, index):
    v = weight.numpy()
    sl = [slice(None)] * v.ndim
    sl[axis] = index
    v[tuple(sl)] = 0.0
    weight.assign(v)


def test_ratio_zero_gives_the_same_logits():
    lm = _gpt2()
    same = prune_structured(lm, 0.0)
    assert [type(d) for d in _decoders(same)] == [keras_hub.layers.TransformerDecoder] * LAYERS
    np.testing.assert_array_equal(same(_inputs()), lm(_inputs()))


def test_graph_has_heads_and_feed_forward_per_decoder():
    graph = build_graph(_gpt2().backbone)
    prunable = sorted((g.producers[0], g.kind, g.size) for g in graph.groups if g.is_prunable)
    assert prunable == [
        ("transformer_layer_0:heads", "heads", HEADS),
        ("transformer_layer_0:intermediate", "channels", FF),
        ("transformer_layer_1:heads", "heads", HEADS),
        ("transformer_layer_1:intermediate", "channels", FF),
    ]


def test_silent_heads_go_and_the_causal_lm_saves_reloads_and_trains(tmp_path):
    lm = _gpt2()
    dec = lm.backbone.get_layer("transformer_layer_1")
    w = _weights(dec)
    _zero(w["self_attention/attention_output/kernel"], 0, [0, 1])
    for part in ("query", "key", "value"):
        _zero(w[f"self_attention/{part}/kernel"], 1, [0, 1])
        _zero(w[f"self_attention/{part}/bias"], 0, [0, 1])
    _zero(w["feedforward_intermediate_dense/kernel"], 1, list(range(FF // 2, FF)))
    _zero(w["feedforward_intermediate_dense/bias"], 0, list(range(FF // 2, FF)))
    _zero(w["feedforward_output_dense/kernel"], 0, list(range(FF // 2, FF)))
    x = _inputs()
    y = np.roll(x["token_ids"], -1, axis=1)

    small = prune_structured(
        lm, 0.5, "auto", data=(x, y), loss=LOSS, exclude=("transformer_layer_0",)
    )
    new = small.get_layer("transformer_layer_1")
    assert isinstance(new, PrunedTransformerDecoder)
    assert (new.num_heads, new.head_dim, new.intermediate_dim) == (HEADS // 2, HEAD_DIM, FF // 2)
    assert small.get_layer("transformer_layer_0").num_heads == HEADS
    np.testing.assert_allclose(small(x), lm(x), rtol=1e-5, atol=1e-5)

    path = tmp_path / "lm.keras"
    small.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("transformer_layer_1"), PrunedTransformerDecoder)
    np.testing.assert_allclose(loaded(x), small(x), rtol=1e-6, atol=1e-6)
    loaded.compile(keras.optimizers.Adam(1e-2), LOSS)
    history = loaded.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][1] < history.history["loss"][0]


def test_self_and_cross_attention_lose_the_same_heads(tmp_path):
    keras.utils.set_random_seed(1)
    dec_in = keras.Input((6, HIDDEN), name="decoder")
    enc_in = keras.Input((5, 8), name="encoder")
    enc = keras.layers.Dense(HIDDEN, name="enc_proj")(enc_in)
    x = keras_hub.layers.TransformerDecoder(FF, HEADS, name="dec")(dec_in, enc)
    model = keras.Model([dec_in, enc_in], keras.layers.Dense(2, name="out")(x))
    data = [
        np.random.default_rng(0).normal(size=s).astype("float32") for s in ((3, 6, 16), (3, 5, 8))
    ]
    small = prune_structured(model, 0.5, "l1", exclude=("out", "enc_proj"))
    layer = small.get_layer("dec")
    assert (layer.num_heads, layer.head_dim) == (HEADS // 2, HEAD_DIM)
    shapes = {p: tuple(v.shape) for p, v in _weights(layer).items()}
    assert shapes["self_attention/query/kernel"] == (HIDDEN, HEADS // 2, HEAD_DIM)
    assert shapes["cross_attention/key/kernel"] == (HIDDEN, HEADS // 2, HEAD_DIM)
    assert shapes["cross_attention/attention_output/kernel"] == (
        HEADS // 2,
        HEAD_DIM,
        HIDDEN,
    )
    path = tmp_path / "dec.keras"
    small.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(data), small(data), rtol=1e-6, atol=1e-6)


def test_bad_head_dim_is_refused():
    with pytest.raises(ValueError, match="head_dim must be a positive integer"):
        PrunedTransformerDecoder(FF, HEADS, head_dim=0, name="bad")
