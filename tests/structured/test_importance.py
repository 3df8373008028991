"""Importance criteria, ratio modes, round_to and minimum widths."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.structured import build_graph, prune_structured, select_units, unit_scores

from ._structured_models import conv_bn_conv, dense_mlp


def _graded_mlp():
    """d1 column j has norm proportional to j + 1; d2 rows are all equal (no extra signal)."""
    model = dense_mlp()
    d1, d2 = model.get_layer("d1"), model.get_layer("d2")
    k1 = np.ones((10, 12), "float32") * (np.arange(12, dtype="float32") + 1)
    d1.set_weights([k1, np.arange(12, dtype="float32")])
    d2.set_weights([np.ones((12, 8), "float32"), np.zeros(8, "float32")])
    return model


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_norms_keep_the_largest_channels(importance):
    pruned = prune_structured(_graded_mlp(), 0.5, importance)
    np.testing.assert_array_equal(pruned.get_layer("d1").get_weights()[1], np.arange(6, 12))


def test_bn_gamma_keeps_the_largest_gammas():
    model = conv_bn_conv()
    bn = model.get_layer("bn1")
    gamma = np.array([5, 1, 7, 2, 8, 3, 6, 4], "float32")
    bn.set_weights([gamma] + bn.get_weights()[1:])
    pruned = prune_structured(model, 0.5, "bn_gamma")
    np.testing.assert_array_equal(np.sort(pruned.get_layer("bn1").get_weights()[0]), [5, 6, 7, 8])


def test_taylor_scores_unused_channels_zero_and_prunes_them_first():
    model = dense_mlp()
    d2 = model.get_layer("d2")
    k, b = d2.get_weights()
    k[[0, 3, 5]] = 0.0  # d1 channels 0, 3, 5 no longer reach the loss
    d2.set_weights([k, b])
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(64, 10)).astype("float32"), rng.integers(0, 3, 64).astype("int32"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    graph = build_graph(model)
    scores = unit_scores(graph, "taylor", data=data, loss=loss, batch_size=16, taylor_batches=3)
    d1_units = [g for g in graph.groups if g.producers == ("d1:units",)][0].units
    assert [scores[d1_units[i]] for i in (0, 3, 5)] == [0.0, 0.0, 0.0]
    assert all(scores[d1_units[i]] > 0 for i in (1, 2, 4))
    model.compile(loss=loss)
    pruned = prune_structured(model, 0.25, "taylor", data=data)  # compiled loss is used
    kept = pruned.get_layer("d1").get_weights()[0]
    original = model.get_layer("d1").get_weights()[0]
    kept_idx = [
        j for j in range(12) if any(np.array_equal(original[:, j], kept[:, i]) for i in range(9))
    ]
    assert not {0, 3, 5} & set(kept_idx)


def test_taylor_errors():
    model = dense_mlp()
    with pytest.raises(ValueError, match="needs data"):
        prune_structured(model, 0.5, "taylor")
    x = np.zeros((4, 10), "float32"), np.zeros(4, "int32")
    with pytest.raises(ValueError, match="needs a loss"):
        prune_structured(model, 0.5, "taylor", data=x)


def test_global_ranking_prunes_the_weak_layer_more():
    model = _graded_mlp()
    graph = build_graph(model)
    scores = unit_scores(graph, "l1")
    per_layer = select_units(graph, scores, 0.5)
    global_ = select_units(graph, scores, 0.5, global_ranking=True)
    prunable = sum(g.size for g in graph.groups if g.is_prunable)
    assert len(global_) == int(0.5 * prunable)
    assert len(per_layer) == 6 + 4
    by_group = {g.producers: sum(u in global_ for u in g.units) for g in graph.groups}
    # d2's scores are uniform (no unit below the mean) while d1 has a long weak tail.
    assert by_group[("d1:units",)] > by_group[("d2:units",)]


@pytest.mark.parametrize(
    "ratio, round_to, min_channels, expected",
    [(0.5, 4, 1, 8), (0.3, 1, 1, 9), (0.9, 1, 4, 4), (0.9, 1, 1, 2), (0.5, 5, 1, 10)],
    ids=["round8", "floor", "min4", "min1", "round5"],
)
def test_round_to_and_min_channels(ratio, round_to, min_channels, expected):
    pruned = prune_structured(dense_mlp(), ratio, round_to=round_to, min_channels=min_channels)
    assert pruned.get_layer("d1").units == expected


def test_global_ranking_respects_round_to_and_min():
    pruned = prune_structured(_graded_mlp(), 0.7, global_ranking=True, round_to=2, min_channels=2)
    for name in ("d1", "d2"):
        units = pruned.get_layer(name).units
        assert units % 2 == 0 and units >= 2


def test_unknown_importance():
    with pytest.raises(ValueError, match="importance must be one of l1, l2, bn_gamma, taylor"):
        unit_scores(build_graph(dense_mlp()), "l3")
