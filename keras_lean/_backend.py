"""What differs between Keras backends, in one place (the rest of keras_lean uses `keras.ops`).

- `name()` / `is_jax()`: the backend this process runs (fixed per process by `KERAS_BACKEND`).
- Pruning masks under JAX. The JAX trainer is stateless: the forward pass returns its new
  non-trainable values, and the optimizer's `stateless_apply` only sees the trainable and the
  optimizer variables. A mask constraint (pruned weights exactly zero after every update) would
  read a stale or purged mask there. So under JAX a mask is a *trainable* variable with Keras'
  `overwrite_with_gradient` (the float8 mechanism): `carry_mask(old, new)` is `new` in the
  forward pass and hands `new` back as the mask's "gradient", which the optimizer writes into
  the mask before it applies the constraints. TensorFlow keeps non-trainable masks.
- TensorFlow traces a `tf.function` that creates variables twice: `build_train_state` builds a
  compiled model's optimizer and metric variables before `fit`, so its first step traces once.
- Energy windows synchronize JAX's asynchronous dispatch in `keras_lean.energy.tracker`
  (`_sync_devices`, the one sync spot).
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = [
    "name",
    "is_jax",
    "masks_ride_gradients",
    "carry_mask",
    "step_dtype",
    "build_train_state",
]


def name() -> str:
    """The Keras backend of this process ("tensorflow", "jax", ...)."""
    return keras.backend.backend()


def is_jax() -> bool:
    return name() == "jax"


def step_dtype() -> str:
    """The dtype of pruning-step counters: int64 as TFMOT, int32 under JAX (no int64 without
    `jax_enable_x64`: asking for it warns and gives int32 anyway). 2**31 steps is plenty."""
    return "int32" if is_jax() else "int64"


def masks_ride_gradients() -> bool:
    """True when pruning masks must be trainable `overwrite_with_gradient` variables."""
    return is_jax()


@ops.custom_gradient
def _carry(old, new):
    def grad(*args, upstream=None):
        # The optimizer overwrites the mask with this "gradient": the new mask.
        return new, ops.zeros_like(new)

    return new, grad


def carry_mask(old, new):
    """`new` (the mask this step uses); its gradient with respect to `old` is `new`."""
    return _carry(old, ops.stop_gradient(new))


def saved_state(layer) -> dict:
    """`layer.save_own_variables` into a dict of NumPy copies, for loading into another layer.

    Copies, not the arrays themselves: JAX's train step donates the buffers of the variables it
    updates, so a twin sharing an array with the caller's model would delete the caller's weights
    on its first `fit`.
    """
    import numpy as np

    store: dict = {}
    layer.save_own_variables(store)
    return {key: np.array(ops.convert_to_numpy(value)) for key, value in store.items()}


def build_train_state(model, x, y) -> None:
    """Creates the optimizer's and the compiled metrics' variables of `model` before `fit`.

    TensorFlow traces a `tf.function` that creates variables twice (once creating them, then
    once more without); the first train step of `fit` creates the optimizer's slots and the
    compiled metrics' variables unless they exist, so building them first halves the trace of
    every (re)compiled model, the largest fixed cost of a shrink. Public Keras only: the
    optimizer's `build`, one eager `compute_metrics` on the first sample of `(x, y)`, then
    `reset_metrics`. The other backends do not trace twice: nothing is done there.

    Args:
        model: a compiled model (not trained, its weights untouched).
        x: training inputs (an array or a structure of arrays).
        y: training targets.
    """
    if keras.backend.backend() != "tensorflow":
        return
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    xs, ys = keras.tree.map_structure(lambda a: a[:1], (x, y))
    try:
        model.compute_metrics(xs, ys, model(xs, training=False), sample_weight=None)
    except (ValueError, TypeError, RuntimeError):
        pass  # metrics an eager update cannot build (a strategy refusing it): the step builds them
    finally:
        model.reset_metrics()
