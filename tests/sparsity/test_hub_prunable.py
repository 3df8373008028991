"""keras-hub's TransformerEncoder / TransformerDecoder as prunable layers (sparsity/registry.py):
their attention projections and feed-forward kernels are masked, strip_pruning bakes the masks
in, and the registration never imports keras_hub itself."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest

from keras_lean.sparsity import (
    ConstantSparsity,
    PruneLowMagnitude,
    get_masks,
    is_prunable,
    prune_low_magnitude,
    register_prunable,
    registry,
    set_masks,
    sparsity_report,
    strip_pruning,
)
from keras_lean.sparsity.registry import prunable_layer_types, prunable_weights

keras_hub = pytest.importorskip("keras_hub")

LENGTH, VOCAB = 8, 40
SIZES = dict(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16)
ATTENTION = ("query", "key", "value", "attention_output")


def _bert():
    return keras_hub.models.BertBackbone(vocabulary_size=VOCAB, max_sequence_length=LENGTH, **SIZES)


def _gpt2():
    return keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, max_sequence_length=LENGTH, **SIZES)


def _feed(backbone):
    ids = np.random.default_rng(0).integers(1, VOCAB, (3, LENGTH)).astype("int32")
    feed = {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}
    if isinstance(backbone, keras_hub.models.BertBackbone):
        feed["segment_ids"] = np.zeros_like(ids)
    return feed


def _out(model, feed):
    out = model(feed, training=False)
    return np.asarray(out["sequence_output"] if isinstance(out, dict) else out)


def _blocks(model, cls):
    return [x for x in model._flatten_layers() if isinstance(x, cls)]


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry without the keras-hub blocks, as before keras_hub was imported; restored
    after the test."""
    hub = {getattr(keras_hub.layers, n) for n in registry.HUB_BLOCKS}
    monkeypatch.setattr(
        registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k not in hub}
    )
    monkeypatch.setattr(registry, "_hub_registered", False)


@pytest.mark.parametrize(
    ("block", "attention"),
    [
        (keras_hub.layers.TransformerEncoder, ("self_attention_layer",)),
        (keras_hub.layers.TransformerDecoder, ("self_attention",)),
    ],
    ids=["encoder", "decoder"],
)
def test_block_prunes_its_attention_and_feedforward_kernels(block, attention):
    layer = block(intermediate_dim=16, num_heads=2)
    layer.build((None, LENGTH, 8))
    assert is_prunable(layer) and block.__name__ in prunable_layer_types()
    weights = prunable_weights(layer)
    expected = {f"{a}/{p}/kernel" for a in attention for p in ATTENTION} | {
        "feedforward_intermediate_dense/kernel",
        "feedforward_output_dense/kernel",
    }
    assert {w.name for w in weights} == expected
    kernels = {
        id(x.kernel)
        for x in layer._flatten_layers()
        if isinstance(x, keras.layers.Dense | keras.layers.EinsumDense)
    }
    assert {id(w.variable) for w in weights} == kernels  # every kernel, and only kernels
    axes = {w.name.split("/")[-2]: w.input_axis for w in weights}
    # N:M groups run along each kernel's input axis: (hidden, heads, key_dim) for q/k/v,
    # (heads, key_dim, hidden) for the output projection, (in, out) for the Dense layers.
    assert axes == {
        "query": 0,
        "key": 0,
        "value": 0,
        "attention_output": 1,
        "feedforward_intermediate_dense": 0,
        "feedforward_output_dense": 0,
    }


def test_decoder_with_cross_attention_prunes_both_attentions():
    layer = keras_hub.layers.TransformerDecoder(intermediate_dim=16, num_heads=2)
    x = np.zeros((1, LENGTH, 8), "float32")
    layer(x, x)  # with an encoder sequence: a cross-attention layer too
    names = {w.name for w in prunable_weights(layer)}
    assert {f"cross_attention/{p}/kernel" for p in ATTENTION} <= names
    assert {f"self_attention/{p}/kernel" for p in ATTENTION} <= names
    assert len(names) == 10


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert-encoder", "gpt2-decoder"])
def test_prune_and_strip_a_backbone_reaches_its_blocks(build, tmp_path):
    backbone = build()
    feed = _feed(backbone)
    dense = _out(backbone, feed)
    pruned = prune_low_magnitude(backbone, ConstantSparsity(0.5, begin_step=0, frequency=1))
    wrapped = [w for w in _blocks(pruned, PruneLowMagnitude) if "transformer_layer" in w.name]
    assert len(wrapped) == 1 and len(wrapped[0].mask_variables) == 6
    # sparsity 0 (all masks ones, before any training step): identical outputs
    np.testing.assert_array_equal(_out(pruned, feed), dense)
    # every other weight masked: what a training step at 50 % would leave, without its compile
    masks = {k: (np.arange(v.size) % 2).reshape(v.shape) for k, v in get_masks(pruned).items()}
    set_masks(pruned, masks)
    stripped = strip_pruning(pruned)
    assert not _blocks(stripped, PruneLowMagnitude)
    np.testing.assert_allclose(_out(stripped, feed), _out(pruned, feed), atol=1e-5)
    (block,) = [x for x in stripped.layers if "transformer_layer" in x.name]
    for w in prunable_weights(block):  # the zeros are baked into the block's own kernels
        values = np.asarray(w.variable)
        assert np.all(values.ravel()[::2] == 0), w.name
    rows = {r.name: r.sparsity for r in sparsity_report(stripped).layers}
    assert rows[block.name] == pytest.approx(0.5)
    path = tmp_path / "stripped.keras"
    stripped.save(path)
    np.testing.assert_allclose(_out(keras.saving.load_model(path), feed), _out(stripped, feed))


@pytest.mark.parametrize(
    "block",
    [keras_hub.layers.TransformerEncoder, keras_hub.layers.TransformerDecoder],
    ids=["encoder", "decoder"],
)
def test_a_training_step_masks_the_block_kernels(block):
    """The schedule's mask update inside the train step reaches the nested kernels."""
    model = keras.Sequential(
        [keras.Input((LENGTH, 8)), block(16, 2, name="block"), keras.layers.Dense(1, name="head")]
    )
    pruned = prune_low_magnitude(
        model, ConstantSparsity(0.75, begin_step=0, frequency=1), filters=["block"]
    )
    pruned.compile(optimizer="adam", loss="mse", jit_compile=False)
    x = np.random.default_rng(0).normal(size=(4, LENGTH, 8)).astype("float32")
    pruned.fit(x, np.zeros((4, LENGTH, 1), "float32"), epochs=1, verbose=0)
    rows = {r.name: r.sparsity for r in sparsity_report(strip_pruning(pruned)).layers}
    assert rows == {"block": pytest.approx(0.75, abs=0.01), "head": 0.0}


def test_registration_waits_for_keras_hub_and_never_imports_it(clean_registry, monkeypatch):
    hub = sys.modules.pop("keras_hub")
    try:
        assert is_prunable(keras.layers.Dense(2))
        assert "keras_hub" not in sys.modules  # looking up a layer did not import it
        assert "TransformerEncoder" not in prunable_layer_types()
    finally:
        sys.modules["keras_hub"] = hub
    assert {"TransformerEncoder", "TransformerDecoder"} <= set(prunable_layer_types())


def test_an_earlier_user_registration_wins(clean_registry):
    register_prunable(keras_hub.layers.TransformerEncoder, None)
    layer = keras_hub.layers.TransformerEncoder(intermediate_dim=16, num_heads=2)
    layer.build((None, LENGTH, 8))
    assert not is_prunable(layer) and prunable_weights(layer) is None
    decoder = keras_hub.layers.TransformerDecoder(intermediate_dim=16, num_heads=2)
    decoder.build((None, LENGTH, 8))
    assert is_prunable(decoder)
