"""Gradual (masked) structured pruning inside keras-hub transformer blocks: whole heads and
feed-forward neurons of a tiny BERT-like encoder, a tiny GPT-2-like decoder and a decoder with
cross attention are masked during `fit`, then `shrink` removes them (heads keep their width).

Pinned to the keras-hub versions pyproject.toml allows (keras-hub>=0.20,<0.33).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity.schedules import ConstantSparsity
from keras_lean.structured import keep_count, prune_structured_gradually, shrink

keras_hub = pytest.importorskip("keras_hub")

from keras_lean._keras_internals import (  # noqa: E402
    HUB_FFN_INTERMEDIATE_ATTR,
    hub_attention_sublayers,
    mha_projections,
)
from keras_lean.structured.hub_layers import (  # noqa: E402
    MaskedTransformerDecoder,
    MaskedTransformerEncoder,
    PrunedTransformerDecoder,
    PrunedTransformerEncoder,
)
from tests.structured._hub_models import bert_classifier, gpt2_causal_lm  # noqa: E402

VOCAB, HIDDEN, HEADS, FF, SEQ = 64, 16, 4, 32, 8
HEAD_DIM = HIDDEN // HEADS
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _bert():
    return bert_classifier(vocab=VOCAB, heads=HEADS, hidden=HIDDEN, ff=FF, max_len=16, dropout=0.0)


def _gpt2():
    return gpt2_causal_lm(vocab=VOCAB, heads=HEADS, hidden=HIDDEN, ff=FF, max_len=16, dropout=0.0)


def _cross():
    """A decoder block with cross attention (self and cross attention share the head mask)."""
    keras.utils.set_random_seed(0)
    dec = keras.Input((SEQ, HIDDEN), name="dec")
    enc = keras.Input((SEQ, 12), name="enc")
    x = keras_hub.layers.TransformerDecoder(FF, HEADS, name="block")(dec, enc)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model([dec, enc], keras.layers.Dense(3, name="logits")(x))


def _inputs(case, batch=8):
    rng = np.random.default_rng(1)
    if case == "cross":
        x = [rng.normal(size=(batch, SEQ, d)).astype("float32") for d in (HIDDEN, 12)]
        return x, rng.integers(0, 3, batch)
    ids = rng.integers(1, VOCAB, (batch, SEQ)).astype("int32")
    ones = np.ones((batch, SEQ), "int32")
    if case == "bert":
        x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": ones}
        return x, rng.integers(0, 3, batch)
    return {"token_ids": ids, "padding_mask": ones}, np.roll(ids, -1, axis=1)


CASES = {"bert": _bert, "gpt2": _gpt2, "cross": _cross}
EXCLUDE = ("logits",)


def _masked(case, sparsity):
    model = CASES[case]()
    masked = prune_structured_gradually(
        model, ConstantSparsity(sparsity, 0, frequency=1), exclude=EXCLUDE
    )
    return model, masked


def _blocks(model, classes):
    return [la for la in model._flatten_layers() if isinstance(la, classes)]


def _out(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def _train(masked, case, steps=2):
    x, y = _inputs(case)
    masked.compile(keras.optimizers.SGD(0.01), LOSS)
    masked.fit(x, y, batch_size=len(y) // steps, epochs=1, verbose=0)
    return x


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_ratio_zero_schedule_masks_nothing_and_keeps_the_outputs(case):
    model, masked = _masked(case, 0.0)
    blocks = _blocks(masked, (MaskedTransformerEncoder, MaskedTransformerDecoder))
    assert len(blocks) == (1 if case == "cross" else 2)
    x, _ = _inputs(case)
    np.testing.assert_array_equal(_out(masked, x), _out(model, x))
    masked(x, training=True)  # a train-step mask update at sparsity 0
    assert all(m is None or m.all() for b in blocks for m in b.unit_masks().values())
    np.testing.assert_array_equal(_out(masked, x), _out(model, x))


def _scramble(layer, heads_off, inner_off, rng):
    """New random weights for the given heads and feed-forward neurons of a block."""
    for mha in hub_attention_sublayers(layer).values():
        for part in ("query", "key", "value"):
            kernel = mha_projections(mha)[part].kernel
            w = keras.ops.convert_to_numpy(kernel).copy()
            w[:, heads_off, :] = rng.normal(size=w[:, heads_off, :].shape)
            kernel.assign(w)
    kernel = getattr(layer, HUB_FFN_INTERMEDIATE_ATTR).kernel
    w = keras.ops.convert_to_numpy(kernel).copy()
    w[:, inner_off] = rng.normal(size=w[:, inner_off].shape) * 10
    kernel.assign(w)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_masked_heads_and_neurons_are_switched_off_exactly(case):
    _, masked = _masked(case, 0.5)
    x, _ = _inputs(case)
    for _ in range(2):  # two train-step mask updates, eagerly (the shrink test runs `fit`)
        masked(x, training=True)
    before = _out(masked, x)
    rng = np.random.default_rng(0)
    blocks = _blocks(masked, (MaskedTransformerEncoder, MaskedTransformerDecoder))
    for block in blocks:
        masks = block.unit_masks()
        assert int(masks["heads"].sum()) == keep_count(HEADS, 0.5, 1, 1)
        assert int(masks["inner"].sum()) == keep_count(FF, 0.5)
        _scramble(block, masks["heads"] == 0, masks["inner"] == 0, rng)
    np.testing.assert_array_equal(_out(masked, x), before)
    masks = blocks[0].unit_masks()  # a kept unit does count
    _scramble(blocks[0], masks["heads"] == 1, masks["inner"] == 1, rng)
    assert not np.allclose(_out(masked, x), before, atol=1e-3)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_shrink_removes_the_masked_units_keeping_head_width_and_outputs(case):
    model = CASES[case]()
    weights = [w.copy() for w in model.get_weights()]
    classes = [type(la) for la in model._flatten_layers()]
    masked = prune_structured_gradually(
        model, ConstantSparsity(0.5, 0, frequency=1), exclude=EXCLUDE
    )
    x = _train(masked, case)
    masked_out = _out(masked, x)
    small = shrink(masked)
    assert not {id(v) for v in small.weights} & {id(v) for v in masked.weights}
    np.testing.assert_array_equal(_out(masked, x), masked_out)  # shrink left it as it was
    assert [type(la) for la in model._flatten_layers()] == classes  # the caller's model
    for a, b in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    pruned = (PrunedTransformerEncoder, PrunedTransformerDecoder)
    blocks = _blocks(small, pruned)
    assert len(blocks) == len(_blocks(masked, (MaskedTransformerEncoder, MaskedTransformerDecoder)))
    assert not _blocks(small, (MaskedTransformerEncoder, MaskedTransformerDecoder))
    for block in blocks:
        assert (block.num_heads, block.intermediate_dim) == (keep_count(HEADS, 0.5), FF // 2)
        for mha in hub_attention_sublayers(block).values():
            assert (mha.num_heads, mha.key_dim) == (HEADS // 2, HEAD_DIM)
    assert small.count_params() < model.count_params()
    np.testing.assert_allclose(_out(small, x), masked_out, atol=1e-5)


@pytest.mark.parametrize("case", ["bert", "gpt2"], ids=["bert", "gpt2"])
def test_masked_and_shrunk_models_save_and_reload_without_custom_objects(case, tmp_path):
    _, masked = _masked(case, 0.5)
    x, _ = _inputs(case)
    masked(x, training=True)  # one train-step mask update, eagerly (fit is tested above)
    expected = _out(masked, x)
    masked.save(tmp_path / "masked.keras")
    masked_again = keras.saving.load_model(tmp_path / "masked.keras")  # masks saved with it
    np.testing.assert_allclose(_out(masked_again, x), expected, atol=1e-6)
    shrink(masked_again).save(tmp_path / "small.keras")
    again = keras.saving.load_model(tmp_path / "small.keras")
    assert _blocks(again, (PrunedTransformerEncoder, PrunedTransformerDecoder))
    np.testing.assert_allclose(_out(again, x), expected, atol=1e-5)


def test_a_block_that_keeps_every_head_shrinks_to_keras_hubs_own_class():
    """At 20 % no head goes (4 - floor(0.8)) but 6 of 32 neurons do: the shrunk block is
    keras-hub's own class (no head_dim), with fewer feed-forward neurons."""
    model, masked = _masked("cross", 0.2)
    x, _ = _inputs("cross")
    masked(x, training=True)
    small = shrink(masked)
    block = small.get_layer("block")
    assert type(block) is keras_hub.layers.TransformerDecoder
    assert (block.num_heads, block.intermediate_dim) == (HEADS, keep_count(FF, 0.2))
    np.testing.assert_allclose(_out(small, x), _out(masked, x), atol=1e-5)


class _CustomEncoder(keras_hub.layers.TransformerEncoder):
    pass


def test_a_subclassed_block_is_refused_naming_the_layer():
    inputs = keras.Input((SEQ, HIDDEN))
    x = _CustomEncoder(FF, HEADS, name="my_block")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match=r"cannot mask inside layer 'my_block'.*exclude"):
        prune_structured_gradually(model, ConstantSparsity(0.5, 0, frequency=1))
    with pytest.warns(UserWarning, match="removes nothing"):
        masked = prune_structured_gradually(
            model, ConstantSparsity(0.5, 0, frequency=1), exclude=("my_block",)
        )
    assert not _blocks(masked, MaskedTransformerEncoder)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs head_mask or inner_mask"),
        ({"head_mask": {"ranks": [0, 1]}}, "head_mask has 2 ranks for 4 units"),
        ({"inner_mask": {"ranks": [0], "bad": 1}}, "inner_mask must be None or a dict"),
    ],
    ids=["none", "wrong-size", "unknown-key"],
)
def test_masked_block_arguments_are_checked(kwargs, match):
    schedule = ConstantSparsity(0.5, 0, frequency=1)
    with pytest.raises(ValueError, match=match):
        MaskedTransformerEncoder(FF, HEADS, pruning_schedule=schedule, **kwargs)
