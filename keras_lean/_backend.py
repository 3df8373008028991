"""What differs between Keras backends, in one place (the rest of keras_lean uses `keras.ops`).

- `name()` / `is_jax()`: the backend this process runs (fixed per process by `KERAS_BACKEND`).
- Pruning masks under JAX. The JAX trainer is stateless: the forward pass returns its new
  non-trainable values, and the optimizer's `stateless_apply` only sees the trainable and the
  optimizer variables. A mask constraint (pruned weights exactly zero after every update) would
  read a stale or purged mask there. So under JAX a mask is a *trainable* variable with Keras'
  `overwrite_with_gradient` (the float8 mechanism): `carry_mask(old, new)` is `new` in the
  forward pass and hands `new` back as the mask's "gradient", which the optimizer writes into
  the mask before it applies the constraints. TensorFlow keeps non-trainable masks.
- Energy windows synchronize JAX's asynchronous dispatch in `keras_lean.energy.tracker`
  (`_sync_devices`, the one sync spot).
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["name", "is_jax", "masks_ride_gradients", "carry_mask", "step_dtype"]


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
