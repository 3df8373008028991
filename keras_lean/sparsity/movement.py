"""Movement pruning (Sanh et al., 2020): keep the weights moving away from zero.

Movement scores are `S = -sum_t w_t * dL/dw_t`. A layer never sees its gradient inside `call`,
and a gradient hook would see each replica's *local* gradient (different replicas would then
disagree on the masks). keras_lean therefore measures the movement itself: at the start of each
train step the wrapper compares the weight with its value at the previous step,

    S += w_{t-1} * (w_t - w_{t-1})

For plain SGD `w_t - w_{t-1} = -lr * grad`, so this is exactly `lr * (-w * grad)`: the same ranking
as Sanh's scores (for a constant learning rate; a decaying one weighs late steps less). For Adam,
momentum, etc. it scores the update actually applied, which keeps the meaning "weights that move
away from zero score high, weights that shrink score low". Weights and their previous values are
mirrored, so every replica computes the same scores and masks, with no extra communication, and it
is all `keras.ops`, so it runs under XLA.

Pruned weights are held at zero by the mask constraint, so their scores freeze at the value they
had when pruned (no regrowth), as in magnitude pruning. Use a gradual schedule
(`PolynomialDecay`) so scores have time to accumulate before the first masks are set: at
`begin_step` no movement has been seen yet.
"""

from __future__ import annotations

from keras import ops

__all__ = ["accumulate_scores", "reset_scores"]


def accumulate_scores(wrapper, step) -> None:
    """Adds this step's movement to `wrapper`'s scores (called in the wrapper's train call).

    Args:
        wrapper: a built `PruneLowMagnitude` with `criterion="movement"`.
        step: the pruning step being run (int tensor); at step 1 there is no previous weight.
    """
    started = ops.cast(ops.greater(step, 1), "float32")
    for w, score, previous in zip(
        wrapper.pruned_weights, wrapper._scores, wrapper._previous, strict=True
    ):
        current = ops.cast(w.variable.value, "float32")
        before = previous.value
        score.assign(score.value + started * before * (current - before))
        previous.assign(current)


def reset_scores(wrapper) -> None:
    """Zeroes the movement scores of a wrapper (e.g. before a new fine-tuning phase)."""
    for score in wrapper._scores:
        score.assign(ops.zeros_like(score.value))
