"""Optimizer state across a shrink: slot variables sliced exactly the way the weights were.

When surgery rebuilds a model narrower mid-training, a fresh optimizer would forget Adam's moments,
SGD's momentum and the iteration count (so bias correction and learning-rate schedules restart).
This module carries them over, for any optimizer whose per-weight state is created from the weight
(`add_variable_from_reference`, what every built-in Keras optimizer does), without asking surgery
how it sliced:

- `trace_weight_slices(model, transform)` runs `transform(model)` once on a copy of the trainable
  weights that hold their own global element index (exact in the variable's float dtype; a tensor
  set too large for one pass is traced digit by digit, one pass per digit), reads the indices back
  from the result, and so learns, for every trainable weight of the result, which elements of
  which weight of `model` it holds. The result's weights are then set from `model`'s true values.
- `carry_optimizer_state(optimizer, old_model, new_model, index_maps)` builds a new optimizer of
  the same class and config for `new_model` and copies every optimizer variable: slots gathered
  with their weight's index map, scalars (iterations, learning rate, loss scale) as they are.

The transform must only *select* elements (slicing, copying, reordering), which is what
`keras_lean.structured` surgery does; a transform that computes new values (folding, factorizing)
is refused with an error naming the weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np

__all__ = ["WeightIndexMap", "carry_optimizer_state", "trace_weight_slices"]

# The largest B such that every integer in [0, B) is exact in the dtype (2 ** (mantissa + 1)).
_EXACT_INTEGERS = {"float16": 2**11, "bfloat16": 2**8, "float32": 2**24, "float64": 2**53}


@dataclasses.dataclass(frozen=True)
class WeightIndexMap:
    """Where one trainable weight of a transformed model comes from.

    Attributes:
        source: index, in the old model's `trainable_variables`, of the weight this one was
            sliced from; None for a weight that could not be traced (not floating point).
        indices: flat element indices into that weight, one per element of this weight (in
            C order), or None with `source`.
    """

    source: int | None
    indices: np.ndarray | None

    def gather(self, values: np.ndarray, shape: tuple) -> np.ndarray:
        """The elements of `values` (the source weight, or a slot shaped like it) this maps to."""
        return np.asarray(values).reshape(-1)[self.indices].reshape(shape)


def _dtype_name(variable: Any) -> str:
    return keras.backend.standardize_dtype(variable.dtype)


def trace_weight_slices(
    model: keras.Model, transform: Callable[[keras.Model], keras.Model]
) -> tuple[keras.Model, tuple[WeightIndexMap, ...]]:
    """Runs `transform(model)` and finds which elements of `model`'s weights the result kept.

    While `transform` runs, `model`'s floating-point trainable weights temporarily hold their
    element indices; their values are restored before this returns (also on error), so `model` is
    left as it was. The result's trainable weights are then set from `model`'s values.

    Args:
        model: a built Keras model.
        transform: a function from `model` to a new model whose trainable weights are selections
            of `model`'s (e.g. `lambda m: rebuild(m, graph, pruned)`). Called once per digit of
            the largest index (once for fewer than 2**24 float32 elements).

    Returns:
        `(new_model, index_maps)`: the transformed model with its true weights, and one
        `WeightIndexMap` per entry of `new_model.trainable_variables`.

    Raises:
        ValueError: if a weight of the result is not a selection of one weight of `model`.

    Example:

    >>> small, maps = trace_weight_slices(model, lambda m: rebuild(m, graph, pruned))
    >>> maps[0].source, maps[0].indices[:4]
    """
    old_vars = list(model.trainable_variables)
    traced = [i for i, v in enumerate(old_vars) if _dtype_name(v) in _EXACT_INTEGERS]
    sizes = {i: int(np.prod(old_vars[i].shape)) for i in traced}
    offsets: dict[int, int] = {}
    total = 1  # index 0 is reserved: a weight the transform did not take from `model` reads 0
    for i in traced:
        offsets[i], total = total, total + sizes[i]
    base = min((_EXACT_INTEGERS[_dtype_name(old_vars[i])] for i in traced), default=2**24)
    passes = 1
    while base**passes < total:
        passes += 1
    saved = [np.array(v.numpy()) for v in old_vars]
    result = None
    digits: list[list[np.ndarray | None]] = []
    try:
        for p in range(passes):
            for i in traced:
                tag = (np.arange(sizes[i], dtype=np.int64) + offsets[i]) // base**p % base
                old_vars[i].assign(tag.reshape(old_vars[i].shape).astype(saved[i].dtype))
            out = transform(model)
            if result is None:
                result = out
            digits.append(
                [
                    np.asarray(v.numpy(), dtype=np.float64)
                    if _dtype_name(v) in _EXACT_INTEGERS
                    else None
                    for v in out.trainable_variables
                ]
            )
    finally:
        for v, value in zip(old_vars, saved, strict=True):
            v.assign(value)
    starts = np.array([offsets[i] for i in traced], dtype=np.int64)
    maps = []
    for j, var in enumerate(result.trainable_variables):
        if digits[0][j] is None:
            maps.append(WeightIndexMap(None, None))
            continue
        maps.append(_decode(var, [d[j] for d in digits], base, traced, starts, sizes))
    for var, m in zip(result.trainable_variables, maps, strict=True):
        if m.source is not None:
            var.assign(m.gather(saved[m.source], tuple(var.shape)))
    return result, tuple(maps)


def _decode(var, digits, base, traced, starts, sizes) -> WeightIndexMap:
    """The index map of one traced weight of the result, from its per-pass digits."""
    flat = np.zeros(int(np.prod(var.shape)), dtype=np.int64)
    for p, d in enumerate(digits):
        d = d.reshape(-1)
        if not np.all(np.isfinite(d)) or np.any(d != np.round(d)) or np.any(d < 0):
            raise ValueError(_not_selected(var))
        flat += d.astype(np.int64) * base**p
    if flat.size == 0:
        return WeightIndexMap(traced[0] if traced else None, flat)
    k = int(np.searchsorted(starts, flat[0], side="right")) - 1
    if k < 0:
        raise ValueError(_not_selected(var))
    source = traced[k]
    local = flat - starts[k]
    if np.any(local < 0) or np.any(local >= sizes[source]):
        raise ValueError(_not_selected(var) + " (it mixes elements of several weights)")
    return WeightIndexMap(source, local)


def _not_selected(var: Any) -> str:
    return (
        f"Weight {var.path!r} of the transformed model is not a selection of one weight of the "
        "original model: the transform computed or initialized it, so its optimizer state "
        "cannot be carried over."
    )


# -- optimizer ---------------------------------------------------------------------------------


def _optimizer_chain(optimizer: Any) -> list:
    """The optimizer and the ones it wraps (`LossScaleOptimizer.inner_optimizer`, ...)."""
    chain = []
    while optimizer is not None and optimizer not in chain:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return chain


@contextlib.contextmanager
def _recording_references(optimizer: Any) -> Iterator[dict[int, Any]]:
    """Records, while open, which model variable each new optimizer variable was made from."""
    refs: dict[int, Any] = {}
    chain = _optimizer_chain(optimizer)
    for opt in chain:
        original = opt.add_variable_from_reference

        def record(reference_variable, *args, _original=original, **kwargs):
            created = _original(reference_variable, *args, **kwargs)
            refs[id(created)] = reference_variable
            return created

        opt.add_variable_from_reference = record  # an instance attribute shadows the method
    try:
        yield refs
    finally:
        for opt in chain:
            del opt.add_variable_from_reference


def _fresh_like(optimizer: Any) -> Any:
    try:
        return type(optimizer).from_config(optimizer.get_config())
    except Exception as e:  # a user optimizer whose from_config cannot read its get_config
        raise ValueError(
            f"Cannot create a new {type(optimizer).__name__} from its config to carry the "
            f"optimizer state over: {e}"
        ) from e


def carry_optimizer_state(
    optimizer: keras.optimizers.Optimizer,
    old_model: keras.Model,
    new_model: keras.Model,
    index_maps: tuple[WeightIndexMap, ...] | list[WeightIndexMap],
) -> keras.optimizers.Optimizer:
    """A new optimizer for `new_model` holding `optimizer`'s state, sliced like the weights.

    `optimizer` (not changed) must have been built on `old_model.trainable_variables`, and
    `index_maps` must come from `trace_weight_slices(old_model, ...)` for `new_model`. Every
    per-weight slot (Adam's m and v, SGD's momentum, EMA averages, gradient accumulators) is
    gathered with its weight's map; scalars (iterations, learning rate, loss scale) are copied, so
    the next step continues as if only the removed elements had changed. An optimizer that was
    never built is returned as a fresh unbuilt copy (there is no state to carry).

    Args:
        optimizer: a Keras 3 optimizer, e.g. `old_model.optimizer` (a `LossScaleOptimizer`
            under mixed precision is carried with its inner optimizer).
        old_model: the model `optimizer` trained.
        new_model: the transformed model.
        index_maps: one `WeightIndexMap` per `new_model.trainable_variables` entry.

    Returns:
        A new optimizer of the same class and config, built on `new_model`'s trainable
        variables, for `new_model.compile(optimizer=...)`.

    Raises:
        ValueError: maps that do not cover each old trainable weight exactly once, or an
            optimizer variable that matches no weight (shapes differ and it was not created
            from a model variable), naming it.

    Example:

    >>> small, maps = trace_weight_slices(model, lambda m: rebuild(m, graph, pruned))
    >>> small.compile(carry_optimizer_state(model.optimizer, model, small, maps), loss)
    """
    new = _fresh_like(optimizer)
    if not optimizer.built:
        return new
    old_vars = list(old_model.trainable_variables)
    new_vars = list(new_model.trainable_variables)
    if len(index_maps) != len(new_vars):
        raise ValueError(
            f"index_maps must have one entry per trainable variable of new_model "
            f"({len(new_vars)}). Received {len(index_maps)} entries."
        )
    ordered = _in_old_order(old_vars, new_vars, index_maps)
    with _recording_references(new) as refs:
        new.build([new_vars[j] for j in ordered])
    old_slots, new_slots = optimizer.variables, new.variables
    if len(old_slots) != len(new_slots):
        raise ValueError(
            f"{type(optimizer).__name__} has {len(old_slots)} variables but a fresh one built "
            f"for the new model has {len(new_slots)}: it was not built on old_model's "
            "trainable variables."
        )
    position = {id(v): j for j, v in enumerate(new_vars)}
    for old, slot in zip(old_slots, new_slots, strict=True):
        ref = refs.get(id(slot))
        value = np.asarray(old.numpy())
        if ref is not None and id(ref) in position:
            j = position[id(ref)]
            m = index_maps[j]
            src = m.source if m.source is not None else j
            if tuple(old.shape) != tuple(old_vars[src].shape):
                raise ValueError(
                    f"Optimizer variable {old.path!r} has shape {tuple(old.shape)} but the weight "
                    f"it should belong to, {old_vars[src].path!r}, has "
                    f"{tuple(old_vars[src].shape)}: the optimizer was not built on old_model's "
                    "trainable variables."
                )
            if m.source is not None:
                value = m.gather(value, tuple(slot.shape))
        if tuple(value.shape) != tuple(slot.shape):
            raise ValueError(
                f"Cannot carry optimizer variable {old.path!r} of {type(optimizer).__name__} "
                f"over: its shape changes from {tuple(old.shape)} to {tuple(slot.shape)} and it "
                "was not created from a model variable (add_variable_from_reference)."
            )
        slot.assign(value.astype(keras.backend.standardize_dtype(slot.dtype)))
    return new


def _in_old_order(old_vars: list, new_vars: list, index_maps) -> list[int]:
    """Indices of `new_vars` ordered by the old variable each comes from."""
    sources = [m.source if m.source is not None else j for j, m in enumerate(index_maps)]
    if sorted(sources) != list(range(len(old_vars))):
        raise ValueError(
            "The new model's trainable variables must come one each from the old model's "
            f"{len(old_vars)} trainable variables (a shrink keeps every weight, narrower). "
            f"Received sources {sources}."
        )
    return sorted(range(len(new_vars)), key=lambda j: sources[j])
