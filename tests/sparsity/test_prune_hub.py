"""prune_low_magnitude / strip_pruning on models holding a keras-hub backbone (a functional
subclass whose graph has `keras.ops` operations such as GetItem, which are not layers)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.pipeline.text import TokenIds
from keras_lean.sparsity import (
    ConstantSparsity,
    PruneLowMagnitude,
    get_masks,
    prune_low_magnitude,
    set_masks,
    sparsity_report,
    strip_pruning,
)

keras_hub = pytest.importorskip("keras_hub")

LENGTH, VOCAB = 8, 40


def _bert():
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=LENGTH,
    )


def _classifier():
    """The pipeline's text classifier shape: token ids -> nested BertBackbone -> pooled head."""
    ids = keras.Input((LENGTH,), name="token_ids")
    packed = TokenIds(0, name="token_inputs")(ids)
    hidden = _bert()(packed)["sequence_output"]
    pooled = keras.layers.GlobalAveragePooling1D()(hidden, mask=packed["padding_mask"])
    return keras.Model(ids, keras.layers.Dense(3, activation="softmax", name="head")(pooled))


def _ids(n=6):
    return np.random.default_rng(0).integers(1, VOCAB, (n, LENGTH)).astype("float32")


def test_functional_subclass_counts_as_graph():
    from keras_lean.sparsity.api import _clones_as_graph

    assert _clones_as_graph(_bert())
    assert not _clones_as_graph(keras.layers.Dense(2))


@pytest.mark.parametrize("nested", [True, False], ids=["classifier-with-nested-bert", "bert"])
def test_strip_pruning_on_bert(nested, tmp_path):
    model = _classifier() if nested else _bert()
    pruned = prune_low_magnitude(
        model,
        ConstantSparsity(0.5, begin_step=0, frequency=1),
        filters=["*dense*", "head"] if nested else ["*dense*"],
    )
    wrapped = [w for w in pruned._flatten_layers() if isinstance(w, PruneLowMagnitude)]
    assert wrapped, "no layer of the BERT graph was wrapped"
    # every other weight masked (what a training step at 50 % would do, without the compile time)
    set_masks(
        pruned, {k: (np.arange(v.size) % 2).reshape(v.shape) for k, v in get_masks(pruned).items()}
    )
    if nested:
        feed = _ids()
    else:
        ids = _ids().astype("int32")
        feed = {"token_ids": ids, "padding_mask": ids > 0, "segment_ids": np.zeros_like(ids)}
    stripped = strip_pruning(pruned)
    assert not [w for w in stripped._flatten_layers() if isinstance(w, PruneLowMagnitude)]

    def out(m):
        o = m(feed, training=False)
        return np.asarray(o["sequence_output"] if isinstance(o, dict) else o)

    np.testing.assert_allclose(out(stripped), out(pruned), atol=1e-5)
    rows = {r.name: r.sparsity for r in sparsity_report(stripped).layers}
    assert rows["pooled_dense"] == pytest.approx(0.5)
    if nested:
        assert rows["head"] == pytest.approx(0.5)
    path = tmp_path / "stripped.keras"
    stripped.save(path)
    np.testing.assert_allclose(out(keras.saving.load_model(path)), out(stripped), atol=1e-6)


def test_subclass_with_own_call_is_still_refused():
    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x) * 2

    model = Custom()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed model"):
        prune_low_magnitude(model)
