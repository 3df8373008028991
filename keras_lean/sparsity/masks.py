"""Mask math with `keras.ops`: magnitude top-k (TFMOT's rule), blocks, N:M, movement top-k.

Every function is shape-static (no data-dependent shapes), so it runs inside a compiled train
step, under XLA and in a distribution strategy's replica context.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

__all__ = [
    "block_mask",
    "keep_count",
    "m_by_n_mask",
    "m_by_n_ok",
    "threshold_mask",
    "topk_mask",
]


def keep_count(size: int, sparsity):
    """Number of weights kept at `sparsity`: `max(round(size * (1 - sparsity)), 1)` (as TFMOT).

    Computed in float32 like TFMOT, so both keep the same count at every step.
    """
    kept = ops.round(ops.cast(size, "float32") * (1.0 - ops.cast(sparsity, "float32")))
    return ops.cast(ops.maximum(kept, 1.0), "int32")


def _sortable_keys(flat):
    """uint32 keys in the order of the float32 values (-0.0 counts as +0.0, as `>=` does).

    The IEEE bits of a non-negative float grow with its value; flipping every bit of a negative
    one and the sign bit of the others puts all of them in one increasing order.
    """
    flat = ops.where(ops.equal(flat, 0.0), ops.zeros_like(flat), flat)
    bits = ops.view(flat, "uint32")
    sign = np.uint32(0x80000000)
    negative = ops.greater_equal(bits, sign)
    return ops.where(negative, ops.bitwise_invert(bits), ops.bitwise_or(bits, sign))


def _set_bit_if_enough(i, carry):
    """One pass of `_kth_largest_key`: keep bit `31 - i` if that many values still reach it.

    Module-level (keys and k ride in the carry) so JAX reuses the compiled loop across calls.
    """
    found, keys, k = carry
    candidate = ops.bitwise_or(found, ops.left_shift(np.uint32(1), ops.cast(31 - i, "uint32")))
    at_least = ops.sum(ops.cast(ops.greater_equal(keys, candidate), "int32"))
    return ops.where(ops.greater_equal(at_least, k), candidate, found), keys, k


def _kth_largest_key(keys, k):
    """The key of the k-th largest value (k >= 1), built bit by bit from the top.

    32 counting passes over the weights: O(32 n) and shape-static, against the full sort that
    `top_k(k=n)` is (about a hundred times slower on CPU for a 200k-weight kernel). A loop, not
    32 unrolled passes, keeps the compiled train step small (XLA compiles it ~4x faster).
    """
    start = (ops.zeros((), "uint32"), keys, ops.cast(k, "int32"))
    return ops.fori_loop(0, 32, _set_bit_if_enough, start)[0]


def threshold_mask(scores, sparsity):
    """TFMOT's magnitude mask: keep `scores >= (k-th largest score)` (ties kept).

    Args:
        scores: non-negative tensor (e.g. `|w|`), any shape, finite.
        sparsity: scalar target sparsity in [0, 1).

    Returns:
        A 0/1 tensor shaped like `scores`, float32.
    """
    size = int(np.prod(scores.shape))
    keys = _sortable_keys(ops.reshape(ops.cast(scores, "float32"), (size,)))
    threshold = _kth_largest_key(keys, keep_count(size, sparsity))
    keep = ops.greater_equal(keys, threshold)
    return ops.reshape(ops.cast(keep, "float32"), scores.shape)


def topk_mask(scores, sparsity):
    """Keeps exactly the k highest scores (ties broken by position); used for movement scores.

    Among scores equal to the k-th largest, the first ones in memory order are kept, as
    `top_k` ranks them.

    Args:
        scores: tensor of any sign and shape, finite.
        sparsity: scalar target sparsity in [0, 1).

    Returns:
        A 0/1 float32 tensor shaped like `scores` with exactly `keep_count` ones.
    """
    size = int(np.prod(scores.shape))
    keys = _sortable_keys(ops.reshape(ops.cast(scores, "float32"), (size,)))
    k = keep_count(size, sparsity)
    threshold = _kth_largest_key(keys, k)
    above = ops.greater(keys, threshold)
    ties = ops.cast(ops.equal(keys, threshold), "int32")
    room = k - ops.sum(ops.cast(above, "int32"))  # how many of the ties still fit
    keep = ops.logical_or(
        above, ops.logical_and(ops.greater(ties, 0), ops.less_equal(ops.cumsum(ties), room))
    )
    return ops.reshape(ops.cast(keep, "float32"), scores.shape)


def _pad_to(x, multiple: tuple[int, int], value: float):
    rows, cols = x.shape
    pad_r = (-rows) % multiple[0]
    pad_c = (-cols) % multiple[1]
    if pad_r == 0 and pad_c == 0:
        return x
    return ops.pad(x, [[0, pad_r], [0, pad_c]], constant_values=value)


def block_mask(scores, sparsity, block_size: tuple[int, int], pooling: str, mask_fn=None):
    """Block-granular mask of a 2-D score tensor, as TFMOT's block pruning.

    Blocks are pooled (AVG over the elements inside the weight, as TFMOT's 'SAME' pooling, or
    MAX), blocks are ranked with `mask_fn` (default `threshold_mask`), and the block mask is
    expanded back to the weight's shape.
    """
    mask_fn = mask_fn or threshold_mask
    rows, cols = scores.shape
    bh, bw = block_size
    padded = _pad_to(scores, block_size, 0.0)
    pr, pc = padded.shape
    blocks = ops.reshape(padded, (pr // bh, bh, pc // bw, bw))
    if pooling == "MAX":
        pooled = ops.max(blocks, axis=(1, 3))
    else:
        counts = _pad_to(ops.ones((rows, cols), "float32"), block_size, 0.0)
        counts = ops.sum(ops.reshape(counts, (pr // bh, bh, pc // bw, bw)), axis=(1, 3))
        pooled = ops.sum(blocks, axis=(1, 3)) / counts
    small = mask_fn(pooled, sparsity)
    full = ops.repeat(ops.repeat(small, bh, axis=0), bw, axis=1)
    return full[:rows, :cols]


def _to_groups(x, axis: int):
    """Moves `axis` last and flattens the rest: (-1, size_of_axis)."""
    moved = ops.moveaxis(x, axis, -1)
    return ops.reshape(moved, (-1, x.shape[axis])), moved.shape


def m_by_n_mask(scores, m: int, n: int, axis: int):
    """Keeps the n - m highest scores in every group of n consecutive weights along `axis`.

    A last partial group (axis size not a multiple of n) keeps at most n - m weights too.

    Args:
        scores: non-negative tensor (e.g. `|w|`).
        m: zeros per group (0 < m < n).
        n: group size.
        axis: the weight's input (reduction) axis.

    Returns:
        0/1 float32 tensor shaped like `scores`.
    """
    groups, moved_shape = _to_groups(ops.cast(scores, "float32"), axis)
    rows, cols = groups.shape
    padded = _pad_to(groups, (1, n), -1.0)  # padding is never preferred over a real weight
    blocks = ops.reshape(padded, (-1, n))
    _, idx = ops.top_k(blocks, k=n - m)
    keep = ops.minimum(ops.sum(ops.one_hot(idx, n, dtype="float32"), axis=-2), 1.0)
    keep = ops.reshape(keep, padded.shape)[:, :cols]
    keep = ops.reshape(keep, moved_shape)
    return ops.moveaxis(keep, -1, axis)


def m_by_n_ok(weights: np.ndarray, m: int, n: int, axis: int) -> bool:
    """True if every group of n consecutive weights along `axis` has at least m zeros.

    A last partial group of r < n weights must have at most n - m nonzeros.
    """
    w = np.moveaxis(np.asarray(weights), axis, -1)
    w = w.reshape(-1, w.shape[-1])
    cols = w.shape[1]
    pad = (-cols) % n
    nonzero = np.pad(w != 0, [(0, 0), (0, pad)]).reshape(w.shape[0], -1, n).sum(-1)
    return bool(np.all(nonzero <= n - m))


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
