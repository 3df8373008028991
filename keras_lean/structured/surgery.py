"""Model surgery: rebuild a Keras model layer by layer with narrower layers and sliced weights.

`rebuild(model, graph, pruned)` creates, for every layer, a fresh layer from its config with the
new widths (`units`, `filters`, `output_dim`, `num_heads`, `intermediate_dim`, Reshape's
`target_shape`), calls it on the rebuilt graph (so it is built with the new input shapes), and
copies the surviving slices of every weight. Nothing of the caller's model is shared or changed.

`replay(model, make_layer, after)` is the generic part, also used to insert and remove the
gradual-pruning mask layers. `flatten_model(model)` inlines nested models (a backbone called as a
layer, a keras-hub task's backbone), so the graph can prune through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lean.structured.graph import (
    DependencyGraph,
    graph_inputs,
    graph_outputs,
    model_calls,
)
from keras_lean.structured.importance import layer_weight

__all__ = ["clone_layer", "flatten_model", "has_nested_models", "rebuild", "replay"]


def clone_layer(layer: Any, config: dict | None = None) -> Any:
    """A fresh, unbuilt layer of the same class from `config` (default: the layer's own)."""
    if isinstance(layer, keras.Model):
        return keras.models.clone_model(layer)
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a stateless keras.ops operation in a functional graph (x * 2.0, ...)
    cfg = dict(layer.get_config() if config is None else config)
    try:
        return type(layer).from_config(cfg)
    except Exception as e:  # a user layer whose from_config cannot read its get_config
        raise ValueError(
            f"Cannot rebuild layer {layer.name!r} ({type(layer).__name__}) from its config: {e}"
        ) from e


def _input_name(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else tensor.name


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

    outs = keras.tree.map_structure(remap, getattr(model, "_outputs_struct", model.outputs))
    ins = keras.tree.map_structure(remap, getattr(model, "_inputs_struct", model.inputs))
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
        args, kwargs = call.node.arguments.fill_in(tensors)
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
        if isinstance(layer, keras.Model) and getattr(
            getattr(layer, "_functional", layer), "_nodes_by_depth", None
        ):
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
            args, kwargs = call.node.arguments.fill_in(tensors)
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

    fn = model._functional if isinstance(model, keras.Sequential) else model
    flat = _rewired(fn, tensors, name=model.name)
    for old, new in pairs:
        if isinstance(old, keras.layers.Layer):
            new.set_weights(old.get_weights())
    return flat, tuple(dict.fromkeys(kept))


def _count(mask: np.ndarray | None) -> int:
    return int(mask.sum())


def new_config(layer: Any, graph: DependencyGraph, pruned: frozenset) -> dict | None:
    """The layer's config at its new width, or None when the layer is unchanged."""
    cfg = layer.get_config()
    name = layer.name
    ins, out = graph.layer_ids.get(name, ([], None))
    keep_out = graph.keep_mask(out, pruned)
    L = keras.layers
    if name in graph.heads:
        cfg["num_heads"] = _count(graph.keep_mask(graph.heads[name], pruned))
        if layer._output_shape is not None and isinstance(layer._output_shape, int):
            cfg["output_shape"] = _count(keep_out)
        elif layer._output_shape is not None and len(tuple(layer._output_shape)) == 1:
            cfg["output_shape"] = (_count(keep_out),)
        return cfg
    if name in graph.inner:  # a keras-hub TransformerEncoder: only its feed-forward width changes
        cfg["intermediate_dim"] = _count(graph.keep_mask(graph.inner[name], pruned))
        return cfg
    if name not in graph.slices and name not in graph.reshape_mode:
        return None
    if isinstance(layer, L.Embedding):
        cfg["output_dim"] = _count(keep_out)
    elif isinstance(layer, L.Dense):
        cfg["units"] = _count(keep_out)
    elif isinstance(layer, L.SeparableConv1D | L.SeparableConv2D):
        cfg["filters"] = _count(keep_out)
    elif isinstance(layer, L.DepthwiseConv1D | L.DepthwiseConv2D):
        pass  # width follows the input
    elif isinstance(layer, L.Conv1D | L.Conv2D | L.Conv3D):
        cfg["filters"] = _count(keep_out)
    elif isinstance(layer, L.Reshape):
        x = ins[0]
        kept = _count(graph.keep_mask(x, pruned))
        target = tuple(layer.target_shape)
        if graph.reshape_mode[name] == "flat":
            cfg["target_shape"] = (target[0] // len(x) * kept,) if target[0] != -1 else (-1,)
        else:
            cfg["target_shape"] = target[:-1] + (kept,)
    return cfg


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


def rebuild(model: keras.Model, graph: DependencyGraph, pruned: frozenset | set) -> keras.Model:
    """A new model without the `pruned` units, weights of the survivors copied.

    Args:
        model: the model `graph` was built from.
        graph: its `DependencyGraph`.
        pruned: root ids of the units to remove (all must be prunable).

    Returns:
        A new Keras model of the same kind (Sequential or functional).
    """
    pruned = frozenset(int(u) for u in pruned)
    layers = {}

    def make(layer):
        cfg = new_config(layer, graph, pruned)
        new = clone_layer(layer, cfg)
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
