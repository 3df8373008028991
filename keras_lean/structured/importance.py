"""Importance of each prunable unit (channel, neuron, head) of a dependency graph.

Criteria (`importance=`):

- `"l1"` / `"l2"`: the L1 / L2 norm of every kernel slice a unit owns (output columns of its
  producers, input rows of its consumers, depthwise kernels, embedding columns, head slices).
- `"bn_gamma"`: |gamma| of the BatchNormalization layers in the group (network slimming); groups
  without BatchNormalization fall back to `"l1"`.
- `"taylor"`: first-order Taylor (Molchanov et al., 2019): `(sum over the unit's weights of
  weight x gradient)^2`, averaged over a few batches: the estimated loss change if the unit is
  removed.

Group scores aggregate over all members of a group. For the norm criteria each member's scores
are first divided by that member's mean score, so a layer with large weights does not dominate its
group and scores of different groups are comparable for global ranking (Torch-Pruning's "mean"
normalization); Taylor scores are already in loss units and are not rescaled.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from keras_lean.structured.graph import DependencyGraph, WeightSlice

__all__ = ["IMPORTANCE_CRITERIA", "unit_scores"]

IMPORTANCE_CRITERIA = ("l1", "l2", "bn_gamma", "taylor")


def layer_weight(layer: Any, path: str) -> Any:
    """The variable of `layer` whose path ends in `/path` (e.g. `kernel`, `query/kernel`)."""
    suffix = "/" + path
    for w in layer.weights:
        if w.path.endswith(suffix) or w.path == path:
            return w
    raise ValueError(f"Layer {layer.name!r} has no weight {path!r}.")


def _per_position(values: np.ndarray, axis: int, reduce: str) -> np.ndarray:
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    if reduce == "l1":
        return np.abs(moved).sum(axis=1)
    if reduce == "l2":
        return np.sqrt(np.square(moved).sum(axis=1))
    if reduce == "abs":
        return np.abs(moved).sum(axis=1)
    return moved.sum(axis=1)  # "sum"


def _accumulate(roots: np.ndarray, s: WeightSlice, per_pos: np.ndarray, acc: dict, normalize: bool):
    if normalize:
        mean = float(per_pos.mean()) if per_pos.size else 0.0
        per_pos = per_pos / mean if mean > 0 else np.zeros_like(per_pos)
    # Positions of one unit inside one slice (depthwise multipliers, flatten tiles) add up to the
    # unit's share of this member; the member counts once towards the unit's average.
    unit_of_pos = roots[s.ids]
    sums: dict[int, float] = {}
    for u, v in zip(unit_of_pos.tolist(), per_pos.tolist(), strict=False):
        sums[u] = sums.get(u, 0.0) + v
    for u, v in sums.items():
        total, count = acc.get(u, (0.0, 0))
        acc[u] = (total + v, count + 1)


def _norm_scores(graph: DependencyGraph, reduce: str, kinds: tuple) -> dict[int, float]:
    layers = {layer.name: layer for layer in _all_layers(graph.model)}
    acc: dict[int, tuple[float, int]] = {}
    for name, slices in graph.slices.items():
        for s in slices:
            if s.kind not in kinds:
                continue
            values = np.asarray(layer_weight(layers[name], s.weight).numpy(), dtype=np.float64)
            _accumulate(graph.roots, s, _per_position(values, s.axis, reduce), acc, True)
    return {u: total / count for u, (total, count) in acc.items()}


def _all_layers(model: keras.Model) -> list:
    return list(model.layers)


def _batches(data: Any, batch_size: int, max_batches: int):
    if isinstance(data, tuple | list) and len(data) == 2:
        x, y = data  # x may be a structure of arrays (a dict of named inputs)
        n = len(keras.tree.flatten(x)[0])
        for b, start in enumerate(range(0, n, batch_size)):
            if b >= max_batches:
                return
            cut = slice(start, start + batch_size)
            yield keras.tree.map_structure(lambda a, c=cut: a[c], x), y[cut]
        return
    for b, batch in enumerate(data):
        if b >= max_batches:
            return
        yield batch[0], batch[1]


def _taylor_scores(
    graph: DependencyGraph, data: Any, loss: Any, batch_size: int, max_batches: int
) -> dict[int, float]:
    import tensorflow as tf  # gradients need the backend's tape: TF is keras_lean's backend

    model = graph.model
    if data is None:
        raise ValueError(
            "importance='taylor' needs data=(x, y) (or an iterable of (x, y) batches) to compute "
            "gradients. Received: data=None"
        )
    loss_fn = loss if loss is not None else getattr(model, "loss", None)
    if loss_fn is None:
        raise ValueError(
            "importance='taylor' needs a loss: compile the model or pass loss=. "
            "Received: loss=None on an uncompiled model"
        )
    loss_fn = keras.losses.get(loss_fn) if isinstance(loss_fn, str | dict) else loss_fn
    layers = {layer.name: layer for layer in _all_layers(model)}
    wanted = []
    for name, slices in graph.slices.items():
        for s in slices:
            if s.kind == "stat":
                continue
            var = layer_weight(layers[name], s.weight)
            if var.trainable:
                wanted.append((s, var))
    variables = list({id(v): v for _, v in wanted}.values())
    per_batch: list[dict[int, float]] = []
    for x, y in _batches(data, batch_size, max_batches):
        with tf.GradientTape() as tape:
            pred = model(x, training=False)
            value = keras.ops.mean(loss_fn(y, pred))
        grads = dict(zip((id(v) for v in variables), tape.gradient(value, variables), strict=False))
        contrib: dict[int, float] = {}
        for s, var in wanted:
            g = grads[id(var)]
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):  # an embedding's sparse gradient
                g = tf.convert_to_tensor(g)
            wg = np.asarray(var.numpy(), np.float64) * np.asarray(g, np.float64)
            per_pos = _per_position(wg, s.axis, "sum")
            for u, v in zip(graph.roots[s.ids].tolist(), per_pos.tolist(), strict=False):
                contrib[u] = contrib.get(u, 0.0) + v
        per_batch.append(contrib)
    if not per_batch:
        raise ValueError("importance='taylor' received empty data: no batch to compute gradients.")
    units = set().union(*per_batch)
    return {u: float(np.mean([b.get(u, 0.0) ** 2 for b in per_batch])) for u in units}


def unit_scores(
    graph: DependencyGraph,
    importance: str = "l1",
    *,
    data: Any = None,
    loss: Any = None,
    batch_size: int = 32,
    taylor_batches: int = 4,
) -> dict[int, float]:
    """Scores every unit of `graph` (higher is more important).

    Args:
        graph: a `DependencyGraph`.
        importance: one of `"l1"`, `"l2"`, `"bn_gamma"`, `"taylor"`.
        data: for `"taylor"`: `(x, y)` arrays or an iterable of `(x, y)` batches.
        loss: for `"taylor"`: a Keras loss (name or callable); defaults to the model's compiled
            loss.
        batch_size: batch size when `data` is arrays.
        taylor_batches: how many batches the Taylor scores average over.

    Returns:
        A dict from unit root id to score.

    Raises:
        ValueError: for an unknown criterion, or Taylor without data or loss.
    """
    if importance not in IMPORTANCE_CRITERIA:
        raise ValueError(
            f"importance must be one of {', '.join(IMPORTANCE_CRITERIA)}. "
            f"Received: importance={importance!r}"
        )
    if importance == "taylor":
        return _taylor_scores(graph, data, loss, batch_size, taylor_batches)
    if importance == "l2":
        return _norm_scores(graph, "l2", ("kernel",))
    l1 = _norm_scores(graph, "l1", ("kernel",))
    if importance == "l1":
        return l1
    gamma = _norm_scores(graph, "abs", ("gamma",))
    # Network slimming reads BatchNorm gammas; LayerNorm gammas are not a channel's importance.
    bn_layers = {
        name
        for name, slices in graph.slices.items()
        if isinstance(graph.model.get_layer(name), keras.layers.BatchNormalization)
    }
    bn_units = {
        int(u) for name in bn_layers for s in graph.slices[name] for u in graph.roots[s.ids]
    }
    return {u: (gamma[u] if u in bn_units and u in gamma else v) for u, v in l1.items()}
