from __future__ import annotations

import numpy as np
import pytest
from keras import ops

from keras_lean.sparsity import masks as mm


def test_threshold_mask_keeps_k_largest_and_ties():
    scores = np.array([[0.1, 0.5, 0.3], [0.9, 0.2, 0.05]], "float32")
    mask = ops.convert_to_numpy(mm.threshold_mask(scores, 0.5))
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 0, 0]])
    tied = np.ones((2, 4), "float32")
    assert ops.convert_to_numpy(mm.threshold_mask(tied, 0.5)).sum() == 8  # TFMOT keeps ties


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_keep_count_matches_tfmot_formula(sparsity):
    size = 37
    expected = max(int(np.round(np.float32(size) * (np.float32(1) - np.float32(sparsity)))), 1)
    assert int(ops.convert_to_numpy(mm.keep_count(size, sparsity))) == expected


def test_topk_mask_is_exact_even_with_ties():
    scores = np.zeros((4, 5), "float32")
    mask = ops.convert_to_numpy(mm.topk_mask(scores, 0.75))
    assert mask.sum() == 5
    scores = np.arange(10, dtype="float32")[::-1] - 3.0  # negative scores too
    mask = ops.convert_to_numpy(mm.topk_mask(scores, 0.7))
    np.testing.assert_array_equal(mask, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_mask_prunes_whole_blocks(pooling):
    rng = np.random.default_rng(0)
    w = np.abs(rng.normal(size=(6, 8))).astype("float32")
    mask = ops.convert_to_numpy(mm.block_mask(w, 0.5, (2, 4), pooling))
    blocks = mask.reshape(3, 2, 2, 4).transpose(0, 2, 1, 3).reshape(6, 8)
    assert set(np.unique(blocks.reshape(6, 8).sum(axis=1))) <= {0.0, 8.0}
    pooled = w.reshape(3, 2, 2, 4)
    pooled = pooled.mean(axis=(1, 3)) if pooling == "AVG" else pooled.max(axis=(1, 3))
    kept = mask.reshape(3, 2, 2, 4)[:, 0, :, 0]
    assert kept.sum() == 3
    assert pooled[kept > 0].min() >= pooled[kept == 0].max()


def test_block_mask_partial_edge_blocks_average_only_real_weights():
    w = np.array([[1.0, 1.0, 5.0]], "float32")  # blocks (1, 2): [1, 1] and [5, pad]
    mask = ops.convert_to_numpy(mm.block_mask(w, 0.5, (1, 2), "AVG"))
    np.testing.assert_array_equal(mask, [[0, 0, 1]])


@pytest.mark.parametrize(
    "shape,axis",
    [((8, 3), 0), ((3, 3, 8, 2), -2), ((6, 5), 0)],
    ids=["dense", "conv", "partial-group"],
)
def test_m_by_n_mask(shape, axis):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape).astype("float32")
    mask = ops.convert_to_numpy(mm.m_by_n_mask(np.abs(w), 2, 4, axis))
    assert mm.m_by_n_ok(w * mask, 2, 4, axis)
    assert not mm.m_by_n_ok(w, 2, 4, axis)
    moved = np.moveaxis(mask, axis, -1).reshape(-1, shape[axis])
    full = shape[axis] // 4 * 4
    assert (moved[:, :full].reshape(moved.shape[0], -1, 4).sum(-1) == 2).all()
