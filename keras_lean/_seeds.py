"""Training randomness drawn from `(seed, counter)` only, so a run resumed mid-way is the same run.

Two things decide what the next steps of a fit do besides the weights and the optimizer: the
order of the samples and the state of the layers' random-seed generators (dropout, noise). Both
would otherwise advance with everything that ran before. Here both are drawn from the run's seed
and a counter (the epoch, or the step where a segment starts), so an uninterrupted run and a
resumed one, or a progressive run and its dense reference, see the same batches.

Used by `keras_lean.pipeline.resume` (the pipeline's fine-tune) and by
`keras_lean.structured.progressive` (its own loop).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Mixed into the seed of the seed states, so they differ from the data order's stream.
_SEED_STREAM = 0x5EED


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of `n` samples in `epoch`: a permutation drawn from `(seed, epoch)` only."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def rng_state_variables(model: Any) -> list:
    """The model's random-seed states: its variables that are not weights (Keras' definition).

    `Layer.variables` extends `Layer.weights` with the `SeedGenerator` states, and nothing else.
    """
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def reseed(model: Any, seed: int, counter: int) -> None:
    """Sets every seed-generator state of `model` to a value drawn from `(seed, counter)`."""
    states = rng_state_variables(model)
    if not states:
        return
    draws = np.random.default_rng([int(seed), int(counter), _SEED_STREAM]).integers(
        1, 2**31 - 1, size=len(states)
    )
    for var, draw in zip(states, draws, strict=True):
        value = np.zeros(tuple(var.shape), dtype=np.dtype(var.dtype))
        value.flat[0] = draw
        var.assign(value)
