"""Training randomness fixed per epoch, so a run resumed at an epoch boundary is the same run.

A fine-tune checkpoint (`RUN/checkpoint.keras`) holds the weights, masks, pruning step and
optimizer state after an epoch. Two things it cannot hold decide what the next epochs do: the
order in which `fit` shuffles the training data, and the state of the layers' random-seed
generators (dropout). Both advance with everything that ran before (earlier epochs, the XLA
probe, a method's preparation), so a resumed run would shuffle and drop differently from an
uninterrupted one and end with other weights and masks.

`EpochOrderedData` removes that history: epoch `e` visits the samples in the permutation drawn
from `(seed, e)` and, as it begins, sets every seed generator of the model to a state drawn
from `(seed, e)` too. An uninterrupted run and one resumed from the checkpoint of epoch `k`
then run epochs `k, k+1, ...` identically. It is a `keras.utils.PyDataset` (backend-neutral)
that `fit` takes in place of `x, y`.

Example:
    >>> data = EpochOrderedData(x, y, batch_size=32, seed=0, initial_epoch=2, epochs=4)
    >>> model.fit(data, epochs=4, initial_epoch=2, steps_per_epoch=data.steps_per_epoch,
    ...           shuffle=False, callbacks=[data.callback()])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from keras_lean._seeds import epoch_permutation, reseed, rng_state_variables
from keras_lean.pipeline.distribution import check_global_batch, local_batch


class EpochOrderedData:
    """Training batches of epochs `initial_epoch .. epochs - 1`, ordered by `(seed, epoch)`.

    One `keras.utils.PyDataset` spans all the epochs of one `fit` call: batch `i` belongs to
    epoch `initial_epoch + i // steps_per_epoch`, so what a batch holds is a pure function of
    its index, whatever Keras prefetches. `fit` must get `steps_per_epoch=data.steps_per_epoch`
    (so one iterator runs through the epochs), `shuffle=False` (the order is this class's) and
    `data.callback()` (which reseeds the model's seed generators as each epoch begins).

    Built lazily as a `PyDataset` subclass so importing this module imports no Keras.

    Args:
        x: training inputs (an array, or a dict / list / tuple of arrays of the same length).
        y: training labels.
        batch_size: batch size (>= 1); the last batch of each epoch may be smaller.
        seed: the run's seed.
        initial_epoch: the first epoch (`fit`'s `initial_epoch`), >= 0.
        epochs: one past the last epoch (`fit`'s `epochs`), > `initial_epoch`.

    Raises:
        ValueError: a bad batch size or epoch range, or no samples.
    """

    def __new__(
        cls, x: Any, y: Any, *, batch_size: int, seed: int, initial_epoch: int = 0, epochs: int
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
        if not 0 <= initial_epoch < epochs:
            raise ValueError(
                "EpochOrderedData needs 0 <= initial_epoch < epochs. Received: "
                f"initial_epoch={initial_epoch!r}, epochs={epochs!r}"
            )
        if len(y) == 0:
            raise ValueError("EpochOrderedData needs at least one training sample. Received: 0")
        return _dataset_class()(x, np.asarray(y), batch_size, int(seed), initial_epoch, epochs)


_CLASS: list[type] = []


def _take(x: Any, idx: np.ndarray) -> Any:
    if isinstance(x, dict):
        return {k: np.asarray(v)[idx] for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(np.asarray(v)[idx] for v in x)
    return np.asarray(x)[idx]


def _dataset_class() -> type:
    if _CLASS:
        return _CLASS[0]
    import keras

    class _EpochOrderedData(keras.utils.PyDataset):
        def __init__(self, x, y, batch_size, seed, initial_epoch, epochs):
            super().__init__(workers=1, use_multiprocessing=False)
            check_global_batch(batch_size)  # several processes: each feeds an equal share
            self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
            self.initial_epoch, self.epochs = initial_epoch, epochs
            self.steps_per_epoch = math.ceil(len(y) / batch_size)
            self._orders: dict[int, np.ndarray] = {}

        def __len__(self) -> int:
            return (self.epochs - self.initial_epoch) * self.steps_per_epoch

        def order(self, epoch: int) -> np.ndarray:
            """The sample order of `epoch` (cached for the epochs this `fit` runs)."""
            if epoch not in self._orders:
                self._orders = {epoch: epoch_permutation(len(self.y), self.seed, epoch)}
            return self._orders[epoch]

        def __getitem__(self, index: int):
            if not 0 <= index < len(self):
                raise IndexError(f"batch index {index} out of range [0, {len(self)})")
            epoch = self.initial_epoch + index // self.steps_per_epoch
            b = index % self.steps_per_epoch
            idx = self.order(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
            idx = local_batch(idx)  # several processes: this one's part of the global batch
            return _take(self.x, idx), self.y[idx]

        def callback(self) -> keras.callbacks.Callback:
            """Reseeds the model's seed generators from `(seed, epoch)` as each epoch begins."""
            seed = self.seed

            class EpochSeeds(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    reseed(self.model, seed, epoch)

            return EpochSeeds()

    _CLASS.append(_EpochOrderedData)
    return _EpochOrderedData


__all__ = ["EpochOrderedData", "epoch_permutation", "reseed", "rng_state_variables"]
