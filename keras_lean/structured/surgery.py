"""Model surgery: rebuild a Keras model layer by layer with narrower layers and sliced weights.

`rebuild(model, graph, pruned)` creates, for every layer, a fresh layer from its config with the
new widths (`units`, `filters`, `output_dim`, `num_heads`, `intermediate_dim`, Reshape's
`target_shape`; a rule's `rebuilt_class` may name another class), calls it on the rebuilt graph
(so it is built with the new input shapes), and copies the surviving slices of every weight.
Nothing of the caller's model is shared or changed.

`replay(model, make_layer, after)` is the generic part, also used to insert and remove the
gradual-pruning mask layers. `flatten_model(model)` inlines nested models (a backbone called as a
layer, a keras-hub task's backbone), so the graph can prune through them.

`kept_output_channels(pruned)`: for a model that `rebuild` made, which of the original model's
output channels each narrowed layer kept (composed over successive rebuilds, so a model shrunk in
stages maps back to the first model). Distillation uses it to compare a narrowed layer with the
teacher's same channels (`keras_lean.distill_features`). It lives in memory beside the model
object: a reloaded or re-cloned model has none.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lean._keras_internals import (
    functional_graph,
    graph_inputs,
    graph_outputs,
    inputs_struct,
    keras_history,
    model_calls,
    nodes_by_depth,
    outputs_struct,
)
from keras_lean.structured.graph import DependencyGraph
from keras_lean.structured.importance import layer_weight

__all__ = [
    "clone_layer",
    "flatten_model",
    "has_nested_models",
    "kept_output_channels",
    "rebuild",
    "replay",
]

# model -> {layer name: indices of the original output channels it kept}; weak, so it goes with
# the model.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kept_output_channels(model: keras.Model) -> dict[str, np.ndarray]:
    """Per narrowed layer of `model`, the indices (into the original model's output channels
    of that layer, last axis) that survived the rebuilds that made `model`; {} when `model` was
    not made by `rebuild` in this process."""
    return {name: ids.copy() for name, ids in _KEPT.get(model, {}).items()}


def _record_kept(
    new_model: keras.Model, graph: DependencyGraph, pruned: frozenset, parent: keras.Model
) -> None:
    """Stores `new_model`'s kept output channels, composed with `parent`'s own record."""
    kept = dict(_KEPT.get(parent, {}))
    for name, (_, out) in graph.layer_ids.items():
        mask = graph.keep_mask(out, pruned)
        if mask is None or mask.all():
            continue
        here = np.flatnonzero(mask)
        kept[name] = kept[name][here] if name in kept else here
    _KEPT[new_model] = kept


def clone_layer(layer: Any, config: dict | None = None, cls: type | None = None) -> Any:
    """A fresh, unbuilt layer of the same class (or `cls`) from `config` (default: the layer's
    own)."""
    if isinstance(layer, keras.Model):
        return keras.models.clone_model(layer)
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a stateless keras.ops operation in a functional graph (x * 2.0, ...)
    cfg = dict(layer.get_config() if config is None else config)
    try:
        return (cls or type(layer)).from_config(cfg)
    except Exception as e:  # a user layer whose from_config cannot read its get_config
        raise ValueError(
            f"Cannot rebuild layer {layer.name!r} ({type(layer).__name__}) from its config: {e}"
        ) from e


def _input_name(tensor: Any) -> str:
    history = keras_history(tensor)
    return history[0].name if history is not None else tensor.name


def _fresh_inputs(model: keras.Model) -> dict[int, Any]:
    """New `keras.Input`s like `model`'s graph inputs, keyed by `id` of the old input tensor."""
    return {
        id(t): keras.Input(
            batch_shape=tuple(t.shape), dtype=t.dtype, sparse=t.sparse, name=_input_name(t)
        )
        for t in graph_inputs(model)
    }


def _rewired(model: keras.Model, tensors: dict[int, Any], name: str | None = None) -> keras.Model:
    """A functional model over the new tensors that replaced `model`'s inputs and outputs."""

    def remap(t):
        return tensors[id(t)]

    outs = keras.tree.map_structure(remap, outputs_struct(model))
    ins = keras.tree.map_structure(remap, inputs_struct(model))
    return keras.Model(ins, outs, name=name or model.name)


def replay(
    model: keras.Model,
    make_layer: Callable[[Any], Any],
    after: Callable[[Any], Any] | None = None,
) -> tuple[keras.Model, dict]:
    """Rebuilds `model`'s graph calling `make_layer(old_layer)` for each layer.

    Args:
        model: a built Sequential or functional model.
        make_layer: returns the new layer for an old one (called once per layer, shared layers
            stay shared), or None to drop the layer (its first input passes through).
        after: optional `after(old_layer) -> layer | None`: a layer to insert after the old
            layer's (first) output, called once per call.

    Returns:
        `(new_model, {old layer name: new layer or None})`. A Sequential comes back as a
        Sequential, a functional model as a functional model.
    """
    new_layers: dict[str, Any] = {}

    def get(layer):
        if layer.name not in new_layers:
            new_layers[layer.name] = make_layer(layer)
        return new_layers[layer.name]

    if isinstance(model, keras.Sequential):
        inp = graph_inputs(model)[0]
        seq = keras.Sequential(name=model.name)
        seq.add(keras.Input(shape=tuple(inp.shape[1:]), dtype=inp.dtype, name=_input_name(inp)))
        for call in model_calls(model):
            new = get(call.layer)
            if new is not None:
                seq.add(new)
            if after is not None:
                extra = after(call.layer)
                if extra is not None:
                    seq.add(extra)
        return seq, new_layers

    tensors = _fresh_inputs(model)
    for call in model_calls(model):
        args, kwargs = call.fill_in(tensors)
        new = get(call.layer)
        if new is None:
            outputs = [args[0]]
        else:
            outputs = keras.tree.flatten(new(*args, **kwargs))
        if after is not None:
            extra = after(call.layer)
            if extra is not None:
                outputs = [extra(outputs[0])] + outputs[1:]
        for old_t, new_t in zip(call.outputs, outputs, strict=False):
            tensors[id(old_t)] = new_t

    return _rewired(model, tensors), new_layers


def _inlinable(model: keras.Model) -> dict[int, int]:
    """Calls per nested graph model (Sequential or functional) of `model`, by `id`."""
    counts: dict[int, int] = {}
    for call in model_calls(model):
        layer = call.layer
        if isinstance(layer, keras.Model) and nodes_by_depth(layer):
            counts[id(layer)] = counts.get(id(layer), 0) + 1
    return counts


def has_nested_models(model: keras.Model) -> bool:
    """Whether `model` calls a nested Sequential or functional model exactly once."""
    return any(n == 1 for n in _inlinable(model).values())


def flatten_model(model: keras.Model) -> tuple[keras.Model, tuple[str, ...]]:
    """A copy of `model` with every nested model that is called once inlined, recursively.

    A backbone used as a layer (`x = base(inputs)`, a keras-hub task around its backbone) becomes
    part of one flat functional graph, so its channels can be followed. Layers are cloned from
    their configs and their weights copied; the caller's model is not changed. A layer keeps its
    name unless the outer graph already has it (then it becomes `<nested model>_<name>`). A nested
    model called more than once shares its weights between the calls: it is kept whole.

    Args:
        model: a built Sequential or functional model.

    Returns:
        `(flat functional model, names of the nested models kept whole)`.
    """
    pairs: list[tuple[Any, Any]] = []
    kept: list[str] = []
    used: set[str] = {c.layer.name for c in model_calls(model)}
    made: dict[int, Any] = {}

    def make(layer: Any, owner: str | None) -> Any:
        if id(layer) in made:  # a layer shared inside the graph stays shared
            return made[id(layer)]
        if isinstance(layer, keras.Model):
            new = clone_layer(layer)
        elif isinstance(layer, keras.layers.Layer):
            cfg = layer.get_config()
            if owner is not None:
                name = layer.name
                if name in used:
                    name = base = f"{owner}_{layer.name}"
                    n = 1
                    while name in used:
                        n += 1
                        name = f"{base}_{n}"
                used.add(name)
                cfg["name"] = name
            new = clone_layer(layer, cfg)
        else:
            new = layer  # a stateless keras.ops operation
        made[id(layer)] = new
        pairs.append((layer, new))
        return new

    def run(m: keras.Model, tensors: dict, owner: str | None) -> None:
        counts = _inlinable(m)
        for call in model_calls(m):
            args, kwargs = call.fill_in(tensors)
            layer = call.layer
            if counts.get(id(layer)) == 1:
                inner = dict(
                    zip(
                        (id(t) for t in graph_inputs(layer)),
                        keras.tree.flatten(args[0]),
                        strict=True,
                    )
                )
                run(layer, inner, layer.name)
                outs = [inner[id(t)] for t in graph_outputs(layer)]
            else:
                if isinstance(layer, keras.Model):
                    kept.append(layer.name)
                outs = keras.tree.flatten(make(layer, owner)(*args, **kwargs))
            for old_t, new_t in zip(call.outputs, outs, strict=False):
                tensors[id(old_t)] = new_t

    tensors = _fresh_inputs(model)
    run(model, tensors, None)

    flat = _rewired(functional_graph(model), tensors, name=model.name)
    for old, new in pairs:
        if isinstance(old, keras.layers.Layer):
            new.set_weights(old.get_weights())
    return flat, tuple(dict.fromkeys(kept))


class ResizeContext:
    """What a `ChannelRule.resize` sees: the layer's traced identities and the pruned units.

    Attributes:
        inputs: the identity arrays of the layer's inputs (first call).
        output: the identity array of its output (None without a channel axis).
        info: what the rule `remember`ed while tracing (and `heads` / `inner`).
    """

    def __init__(self, graph: DependencyGraph, layer: Any, pruned: frozenset):
        self._graph, self._pruned = graph, pruned
        self.inputs, self.output = graph.layer_ids.get(layer.name, ([], None))
        self.info = graph.layer_info.get(layer.name, {})

    def keep_mask(self, ids: np.ndarray | None) -> np.ndarray | None:
        """Which positions of `ids` survive."""
        return self._graph.keep_mask(ids, self._pruned)

    def kept(self, ids: np.ndarray | None) -> int:
        """How many positions of `ids` survive (0 for None)."""
        mask = self.keep_mask(ids)
        return 0 if mask is None else int(mask.sum())


def new_config(layer: Any, graph: DependencyGraph, pruned: frozenset) -> dict | None:
    """The layer's config at its new width, or None when the layer is left as it is."""
    rule = graph.rules.get(layer.name)
    if rule is None:  # skipped, excluded, nested model or operation: rebuilt unchanged
        return None
    return rule.resize(layer, layer.get_config(), ResizeContext(graph, layer, pruned))


def sliced_weights(layer: Any, graph: DependencyGraph, pruned: frozenset) -> list[np.ndarray]:
    """The layer's weights (in `layer.weights` order) with the pruned positions removed."""
    by_path: dict[str, list] = {}
    for s in graph.slices.get(layer.name, []):
        by_path.setdefault(s.weight, []).append(s)
    values = []
    for w in layer.weights:
        v = np.asarray(w.numpy())
        for path, slices in by_path.items():
            if layer_weight(layer, path) is w:
                for s in slices:
                    v = np.compress(graph.keep_mask(s.ids, pruned), v, axis=s.axis)
        values.append(v)
    return values


def rebuild(
    model: keras.Model,
    graph: DependencyGraph,
    pruned: frozenset | set,
    parent: keras.Model | None = None,
) -> keras.Model:
    """A new model without the `pruned` units, weights of the survivors copied.

    Args:
        model: the model `graph` was built from.
        graph: its `DependencyGraph`.
        pruned: root ids of the units to remove (all must be prunable).
        parent: the caller's model when `model` is a copy of it (flattened, masks removed):
            `kept_output_channels` of the result then composes with the parent's.

    Returns:
        A new Keras model of the same kind (Sequential or functional).
    """
    pruned = frozenset(int(u) for u in pruned)
    layers = {}

    def make(layer):
        cfg = new_config(layer, graph, pruned)
        rule = graph.rules.get(layer.name)
        cls = rule.rebuilt_class(layer, cfg) if cfg is not None else None
        new = clone_layer(layer, cfg, cls)
        layers[layer.name] = (layer, new)
        return new

    new_model, _ = replay(model, make)
    for old, new in layers.values():
        if not isinstance(old, keras.layers.Layer):
            continue
        if isinstance(old, keras.Model):
            new.set_weights(old.get_weights())
            continue
        values = sliced_weights(old, graph, pruned)
        if len(values) != len(new.weights):
            raise ValueError(
                f"Rebuilt layer {old.name!r} has {len(new.weights)} weights, expected "
                f"{len(values)}."
            )
        for var, value in zip(new.weights, values, strict=False):
            if tuple(var.shape) != value.shape:
                raise ValueError(
                    f"Rebuilt layer {old.name!r}: weight {var.path} has shape {tuple(var.shape)}, "
                    f"sliced value has {value.shape}."
                )
            var.assign(value)
    _record_kept(new_model, graph, pruned, model if parent is None else parent)
    return new_model


def width_of(layer: Any) -> int | None:
    """The width a structure report shows for a layer (units, filters, heads, ...)."""
    for attr in ("units", "filters", "output_dim", "intermediate_dim", "num_heads"):
        v = getattr(layer, attr, None)
        if isinstance(v, int):
            return v
    if isinstance(layer, keras.layers.DepthwiseConv1D | keras.layers.DepthwiseConv2D):
        if layer.built:
            return int(math.prod(layer.kernel.shape[-2:]))
    if isinstance(layer, keras.layers.BatchNormalization | keras.layers.LayerNormalization):
        if layer.built and layer.weights:
            return int(layer.weights[0].shape[-1])
    return None
