"""The k-th value masks (threshold_mask, topk_mask) equal the `top_k(k=size)` ones they replace,
ties included, eagerly and compiled; CI runs this file under TensorFlow and JAX."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from keras_lean.sparsity import masks as mm


def _old_threshold_mask(scores, sparsity):
    """The previous implementation (a full `top_k`), the reference."""
    size = int(np.prod(scores.shape))
    flat = ops.reshape(scores, (size,))
    values, indices = ops.top_k(flat, k=size)
    k = mm.keep_count(size, sparsity)
    threshold, position = ops.take(values, k - 1), ops.take(indices, k - 1)
    keep = ops.logical_or(
        ops.greater_equal(flat, threshold),
        ops.cast(ops.one_hot(position, size, dtype="float32"), "bool"),
    )
    return ops.reshape(ops.cast(keep, "float32"), scores.shape)


def _old_topk_mask(scores, sparsity):
    size = int(np.prod(scores.shape))
    flat = ops.reshape(ops.cast(scores, "float32"), (size,))
    _, indices = ops.top_k(flat, k=size)
    k = mm.keep_count(size, sparsity)
    ranked_keep = ops.cast(ops.less(ops.arange(size, dtype="int32"), k), "float32")
    return ops.reshape(
        ops.scatter(ops.expand_dims(indices, -1), ranked_keep, (size,)), scores.shape
    )


def _cases():
    rng = np.random.default_rng(0)
    normal = rng.standard_normal((37, 23)).astype("float32")
    tied = np.round(rng.standard_normal((16, 12)), 1).astype("float32")  # many equal values
    zeros = np.zeros((5, 7), "float32")
    signed_zeros = np.array([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 2.0, -0.0], "float32")
    few = np.repeat(np.float32([3.0, 1.0, 2.0]), 9).reshape(3, 9)
    extreme = np.array([3.4e38, 1e-45, 0.0, -1e-45, -3.4e38, 1.0, np.inf, -np.inf], "float32")
    return {
        "random": normal,
        "tied": tied,
        "all-zero": zeros,
        "signed-zeros": signed_zeros,
        "three-values": few,
        "extremes": extreme,
    }


CASES = _cases()
SPARSITIES = [0.0, 0.13, 0.5, 0.8, 0.97]


@pytest.mark.parametrize("name", list(CASES))
def test_threshold_mask_equals_the_top_k_version(name):
    scores = np.abs(CASES[name])  # magnitudes, as the wrapper scores them
    for sparsity in SPARSITIES:
        new = ops.convert_to_numpy(mm.threshold_mask(scores, sparsity))
        old = ops.convert_to_numpy(_old_threshold_mask(scores, sparsity))
        np.testing.assert_array_equal(new, old, err_msg=f"sparsity {sparsity}")


def _stable_top(scores, k):
    """NumPy's reference: the k largest, equal values in memory order (-0.0 equals +0.0)."""
    keep = np.zeros(scores.size, "float32")
    keep[np.argsort(-scores.ravel(), kind="stable")[:k]] = 1
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("name", list(CASES))
def test_topk_mask_equals_the_top_k_version(name):
    scores = CASES[name]  # movement scores have both signs
    for sparsity in SPARSITIES:
        new = ops.convert_to_numpy(mm.topk_mask(scores, sparsity))
        k = int(ops.convert_to_numpy(mm.keep_count(scores.size, sparsity)))
        np.testing.assert_array_equal(new, _stable_top(scores, k), err_msg=f"sparsity {sparsity}")
        if name == "signed-zeros" and keras.backend.backend() == "jax":
            continue  # JAX's top_k ranks +0.0 above -0.0; TF's and the new mask tie them
        old = ops.convert_to_numpy(_old_topk_mask(scores, sparsity))
        np.testing.assert_array_equal(new, old, err_msg=f"sparsity {sparsity}")


def test_masks_agree_compiled_with_a_traced_sparsity():
    """Inside a compiled step the sparsity is a tensor; XLA must give the same masks."""
    scores = np.abs(CASES["tied"])
    if keras.backend.backend() == "jax":
        import jax

        compile_ = jax.jit
    else:
        import tensorflow as tf

        def compile_(fn):
            return tf.function(fn, jit_compile=True)

    for fn, old in ((mm.threshold_mask, _old_threshold_mask), (mm.topk_mask, _old_topk_mask)):
        compiled = compile_(fn)
        for sparsity in (0.25, 0.6):
            s = np.float32(sparsity)
            np.testing.assert_array_equal(
                ops.convert_to_numpy(compiled(scores, s)),
                ops.convert_to_numpy(old(scores, s)),
                err_msg=f"{fn.__name__} at {sparsity}",
            )
