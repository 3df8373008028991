"""Hidden-width pruning of keras-hub transformers (Minitron's width pruning).

A transformer's hidden width is one residual stream: the token, position and segment embeddings
write it, every block reads and adds to it, the LayerNorms normalize it, and the head reads it.
Removing hidden channel `j` therefore removes it everywhere at once, as one coupled group:

- embeddings (`Embedding`, `ReversibleEmbedding`, keras-hub `PositionEmbedding`,
  `TokenAndPositionEmbedding`): the column `j` of every table (and row `j` of an untied reverse
  embedding);
- every keras-hub `TransformerEncoder` / `TransformerDecoder`: the input row `j` of the attention
  query / key / value projections and of the first feed-forward Dense, the output column `j` of
  the attention output projection and of the second feed-forward Dense, and channel `j` of each
  LayerNorm. The attention's inner width stays: a block whose hidden width falls is rebuilt as
  `hub_layers.PrunedTransformerEncoder` / `...Decoder` with `head_dim` kept (keras-hub would
  derive `key_dim = hidden_dim // num_heads`);
- LayerNorms, residual adds, dropouts, token slicing (`x[:, 0, :]`) and global pooling between
  them (the channels pass through);
- the head: a `Dense` reading the hidden state loses input row `j` (BERT's pooler, a classifier);
  the tied reverse embedding of a causal LM loses the same column as the token embedding.

`prune_hidden_width` ranks the channels by the mean |activation| of the residual stream over
calibration data (Minitron's activation importance) or, without data, by the L2 norm of the
embedding columns, and rebuilds the model physically narrower. Any other layer that reads the
hidden state stops it with an error naming the layer (its channels could not be followed).

A model output in the hidden space (a bare backbone's `sequence_output`) becomes narrower too;
prune the task model (backbone and head) to keep the output shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np

from keras_lean._hub import FFN_INTERMEDIATE, FFN_OUTPUT, is_hub_class
from keras_lean._keras_internals import (
    hub_attention_sublayers,
    inputs_struct,
    model_calls,
)
from keras_lean.structured.hardware import resolve_round_to
from keras_lean.structured.masks import keep_count
from keras_lean.structured.surgery import clone_layer, flatten_model, has_nested_models, replay

__all__ = ["WIDTH_IMPORTANCE", "hidden_width_scores", "prune_hidden_width"]

#: Importance criteria of `prune_hidden_width` (besides `"auto"`).
WIDTH_IMPORTANCE = ("activation", "l2")

L = keras.layers

#: Layers the hidden channels pass through unchanged (element-wise, or over the token axis).
_PASS = (
    L.Dropout,
    L.Activation,
    L.Identity,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.GaussianDropout,
    L.GaussianNoise,
    L.AlphaDropout,
    L.ActivityRegularization,
    L.GlobalAveragePooling1D,
    L.GlobalMaxPooling1D,
)
_MERGE = (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum, L.Multiply)

#: keras-hub's own blocks and keras_lean's: a subclass may compute something else.
_BLOCK_CLASSES = frozenset(
    {
        ("keras_hub", "TransformerEncoder"),
        ("keras_hub", "TransformerDecoder"),
        ("keras_lean", "PrunedTransformerEncoder"),
        ("keras_lean", "PrunedTransformerDecoder"),
    }
)


@dataclasses.dataclass
class _Plan:
    """How each layer of the model meets the hidden channels."""

    hidden: int = 0
    tensors: list = dataclasses.field(default_factory=list)  # hidden-space tensors, in order
    ids: set = dataclasses.field(default_factory=set)
    roles: dict = dataclasses.field(default_factory=dict)  # layer name -> set of roles
    encoder_hidden: dict = dataclasses.field(default_factory=dict)  # block -> cross K/V hidden
    layers: dict = dataclasses.field(default_factory=dict)  # layer name -> layer

    def mark(self, tensor: Any, where: str) -> None:
        width = tensor.shape[-1]
        if width is None or (self.hidden and int(width) != self.hidden):
            raise ValueError(
                f"prune_hidden_width: {where} writes the hidden state with width {width}, but "
                f"the embeddings write {self.hidden}: the hidden channels cannot be one group."
            )
        self.hidden = int(width)
        if id(tensor) not in self.ids:
            self.ids.add(id(tensor))
            self.tensors.append(tensor)

    def role(self, layer: Any, role: str) -> None:
        self.roles.setdefault(layer.name, set()).add(role)
        self.layers[layer.name] = layer


def _is_block(layer: Any) -> bool:
    cls = type(layer)
    return (cls.__module__.split(".", 1)[0], cls.__name__) in _BLOCK_CLASSES


def _embedding_kind(layer: Any) -> str | None:
    for name in ("TokenAndPositionEmbedding", "PositionEmbedding"):
        if is_hub_class(layer, name):
            return name
    if any(c.__name__ == "ReversibleEmbedding" for c in type(layer).__mro__):
        return "ReversibleEmbedding"
    return "Embedding" if isinstance(layer, L.Embedding) else None


def _keeps_last_axis(call: Any) -> bool:
    """Whether a `x[key]` operation leaves the last (channel) axis of `x` whole."""
    args, _ = call.arguments()
    key = args[1] if len(args) > 1 else None
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        tail = key[key.index(Ellipsis) + 1 :]
        return not tail or tail[-1] == slice(None)
    used = [k for k in key if k is not None]
    return len(used) < len(call.inputs[0].shape) or used[-1] == slice(None)


def _unsupported(layer: Any, why: str = "") -> ValueError:
    return ValueError(
        f"prune_hidden_width cannot follow the hidden channels through layer {layer.name!r} "
        f"({type(layer).__name__}){': ' + why if why else ''}. Hidden-width pruning supports "
        "keras-hub embeddings, TransformerEncoder / TransformerDecoder blocks, LayerNorms, "
        "residual adds, dropout, token slicing, global pooling and Dense heads."
    )


def _trace_call(plan: _Plan, call: Any) -> None:
    layer = call.layer
    args, kwargs = call.arguments()
    hidden_in = [t for t in call.inputs if id(t) in plan.ids]
    kind = _embedding_kind(layer)
    if kind is not None:
        if kind == "ReversibleEmbedding" and kwargs.get("reverse", False):
            if not hidden_in:
                raise _unsupported(layer, "its reverse call does not read the hidden state")
            plan.role(layer, "reverse")
            return
        plan.role(layer, "embedding")
        plan.mark(call.outputs[0], f"embedding {layer.name!r}")
        return
    if not hidden_in:
        return  # a layer outside the residual stream: rebuilt as it is
    out = call.outputs[0] if call.outputs else None
    name = f"layer {layer.name!r}"
    if _is_block(layer):
        if id(call.inputs[0]) not in plan.ids:
            raise _unsupported(layer, "its decoder / encoder input is not the hidden state")
        encoder = kwargs.get("encoder_sequence", args[1] if len(args) > 1 else None)
        plan.encoder_hidden[layer.name] = encoder is not None and id(encoder) in plan.ids
        plan.role(layer, "block")
        plan.mark(out, name)
    elif is_hub_class(layer, "TransformerEncoder") or is_hub_class(layer, "TransformerDecoder"):
        raise _unsupported(layer, "a subclass of a keras-hub block may compute something else")
    elif isinstance(layer, L.LayerNormalization):
        axis = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        rank = len(call.inputs[0].shape)
        if [a % rank for a in axis] != [rank - 1]:
            raise _unsupported(layer, "it normalizes over more than the channel axis")
        plan.role(layer, "norm")
        plan.mark(out, name)
    elif isinstance(layer, _MERGE):
        if len(hidden_in) != len(call.inputs):
            raise _unsupported(layer, "it merges the hidden state with another tensor")
        plan.role(layer, "pass")
        plan.mark(out, name)
    elif isinstance(layer, _PASS) or (
        type(layer).__name__ == "GetItem" and not isinstance(layer, L.Layer)
    ):
        if type(layer).__name__ == "GetItem" and not _keeps_last_axis(call):
            raise _unsupported(layer, "it indexes the channel axis")
        plan.role(layer, "pass")
        plan.mark(out, name)
    elif type(layer) is L.Dense:
        plan.role(layer, "dense_in")  # reads the hidden state; its output is its own space
    else:
        raise _unsupported(layer)


def _trace(model: keras.Model) -> _Plan:
    plan = _Plan()
    for call in model_calls(model, "prune_hidden_width"):
        _trace_call(plan, call)
    if not plan.hidden:
        raise ValueError(
            f"prune_hidden_width found no embedding layer writing the hidden state of "
            f"{model.name!r}: it prunes keras-hub transformers (BertBackbone, GPT2Backbone, their "
            "tasks), whose residual stream starts at Embedding / PositionEmbedding layers."
        )
    for name, roles in plan.roles.items():
        if "reverse" in roles and "embedding" not in roles:
            raise _unsupported(plan.layers[name], "it is used in reverse only")
    return plan


# -- importance ----------------------------------------------------------------------------------


def _calibration_batches(data: Any, batch_size: int, max_batches: int):
    """The input batches of `data`: `x`, `(x, y)` or an iterable of `x` / `(x, y)` batches."""
    if isinstance(data, tuple | list) and len(data) == 2:
        data = data[0]
    if isinstance(data, dict | np.ndarray) or keras.ops.is_tensor(data):
        n = len(keras.tree.flatten(data)[0])
        for b, start in enumerate(range(0, n, batch_size)):
            if b >= max_batches:
                return
            cut = slice(start, start + batch_size)
            yield keras.tree.map_structure(lambda a, c=cut: a[c], data)
        return
    for b, batch in enumerate(data):
        if b >= max_batches:
            return
        yield batch[0] if isinstance(batch, tuple | list) else batch


def _activation_scores(model, plan, data, batch_size, max_batches) -> np.ndarray:
    probe = keras.Model(inputs_struct(model), list(plan.tensors))
    total = np.zeros(plan.hidden, np.float64)
    batches = 0
    for x in _calibration_batches(data, batch_size, max_batches):
        outs = probe(x, training=False)
        mask = x.get("padding_mask") if isinstance(x, dict) else None
        mask = None if mask is None else np.asarray(keras.ops.convert_to_numpy(mask), "float64")
        for out in outs:
            a = np.abs(np.asarray(keras.ops.convert_to_numpy(out), np.float64))
            if mask is not None and a.shape[:-1] == mask.shape:
                w = mask[..., None]
                total += (a * w).sum(axis=tuple(range(a.ndim - 1))) / max(w.sum(), 1.0)
            else:
                total += a.reshape(-1, plan.hidden).mean(axis=0)
        batches += 1
    if not batches:
        raise ValueError("prune_hidden_width received empty calibration data: no batch to run.")
    return total / batches


def _l2_scores(plan: _Plan) -> np.ndarray:
    total = np.zeros(plan.hidden, np.float64)
    for name, roles in plan.roles.items():
        if "embedding" not in roles:
            continue
        for w in plan.layers[name].weights:
            v = np.asarray(keras.ops.convert_to_numpy(w), np.float64)
            if v.shape[-1] == plan.hidden:
                total += np.square(v.reshape(-1, plan.hidden)).sum(axis=0)
    return np.sqrt(total)


def hidden_width_scores(
    model: keras.Model,
    importance: str = "auto",
    *,
    data: Any = None,
    batch_size: int = 32,
    calibration_batches: int = 8,
) -> np.ndarray:
    """The importance of each hidden channel of a keras-hub transformer (higher is kept).

    Args:
        model: a built keras-hub backbone or task model (or a functional model around one).
        importance: `"activation"`: the mean |activation| of every hidden-state tensor of the
            graph (embeddings, each block's output, the LayerNorms'), summed (Minitron);
            `"l2"`: the L2 norm of each channel's column over all embedding tables;
            `"auto"`: `"activation"` when `data` is given, else `"l2"`.
        data: calibration inputs: `x` (a dict of arrays for keras-hub), `(x, y)`, or an
            iterable of `x` or `(x, y)` batches. Padding positions (`padding_mask`) are left out.
        batch_size: batch size when `data` is arrays.
        calibration_batches: at most this many batches are run.

    Returns:
        A float array of length `hidden_dim`.
    """
    _check_importance(importance, data)
    model = flatten_model(model)[0] if has_nested_models(model) else model
    plan = _trace(model)
    return _scores(model, plan, importance, data, batch_size, calibration_batches)


def _check_importance(importance: str, data: Any) -> None:
    if importance != "auto" and importance not in WIDTH_IMPORTANCE:
        raise ValueError(
            f"importance must be one of auto, {', '.join(WIDTH_IMPORTANCE)}. "
            f"Received: importance={importance!r}"
        )
    if importance == "activation" and data is None:
        raise ValueError(
            "importance='activation' needs calibration data (data=x, (x, y) or batches). "
            "Received: data=None; use importance='l2' to rank by the embedding columns instead."
        )


def _scores(model, plan, importance, data, batch_size, calibration_batches) -> np.ndarray:
    if importance == "l2" or (importance == "auto" and data is None):
        return _l2_scores(plan)
    return _activation_scores(model, plan, data, batch_size, calibration_batches)


# -- rebuild -------------------------------------------------------------------------------------


def _rel(layer: Any, weight: Any) -> list[str]:
    return weight.path.split(f"{layer.name}/", 1)[-1].split("/")


def _block_axis(layer: Any, parts: list[str], encoder_hidden: bool) -> int | None:
    """The axis of a block weight that runs over the hidden channels (None: no such axis)."""
    leaf = parts[-1]
    sub = parts[-2] if len(parts) > 1 else ""
    owner = parts[-3] if len(parts) > 2 else ""
    cross = hub_attention_sublayers(layer).get("_cross_attention_layer")
    if sub in ("query", "key", "value"):
        if leaf != "kernel":
            return None
        if cross is not None and owner == cross.name and sub != "query" and not encoder_hidden:
            return None  # cross attention's key / value read the encoder's own width
        return 0
    if sub == "attention_output" or sub == FFN_OUTPUT:
        return -1 if leaf == "kernel" else 0
    if sub == FFN_INTERMEDIATE:
        return 0 if leaf == "kernel" else None
    if sub.endswith("layer_norm"):
        return 0
    return None


def _weight_axis(layer: Any, roles: set, weight: Any, plan: _Plan) -> int | None:
    parts = _rel(layer, weight)
    leaf = parts[-1]
    if "block" in roles:
        return _block_axis(layer, parts, plan.encoder_hidden.get(layer.name, False))
    if "embedding" in roles:
        if leaf == "reverse_embeddings":
            return 0
        return -1 if leaf == "embeddings" else None
    if "norm" in roles:
        return 0
    if "dense_in" in roles:
        return 0 if leaf in ("kernel", "lora_kernel_a") else None
    return None


def _new_config(
    layer: Any, roles: set, keep: int, head_dim: int | None, plan: _Plan
) -> tuple[dict, type]:
    config = layer.get_config()
    cls = type(layer)
    if "embedding" in roles:
        for key in ("output_dim", "embedding_dim"):
            if key in config:
                config[key] = keep
    # keras-hub's decoder saves its build shapes and builds from them in __init__
    narrowed = ["decoder_sequence_shape"]
    if plan.encoder_hidden.get(layer.name, False):
        narrowed.append("encoder_sequence_shape")
    for key in narrowed:
        shape = config.get(key) if "block" in roles else None
        if isinstance(shape, list | tuple) and shape:
            config[key] = [*shape[:-1], keep]
    if "block" in roles and head_dim is not None:  # the block takes its width from the input
        from keras_lean.structured.hub_layers import pruned_class_for

        cls = pruned_class_for(layer)
        config["head_dim"] = head_dim
    return config, cls


def _head_dim(layer: Any) -> int:
    attention = next(iter(hub_attention_sublayers(layer).values()))
    for w in attention.weights:
        if w.path.endswith("query/kernel"):
            return int(w.shape[-1])
    raise ValueError(f"{layer.name}: found no attention query kernel.")


def _rebuild(model: keras.Model, plan: _Plan, kept: np.ndarray) -> keras.Model:
    narrower = len(kept) < plan.hidden
    pairs: list[tuple[Any, Any]] = []

    def make(layer):
        roles = plan.roles.get(getattr(layer, "name", None), set())
        if not roles & {"embedding", "block"} or not narrower:
            new = clone_layer(layer)  # its config does not hold the hidden width
        else:
            head_dim = _head_dim(layer) if "block" in roles else None
            config, cls = _new_config(layer, roles, len(kept), head_dim, plan)
            new = clone_layer(layer, config, cls)
        pairs.append((layer, new))
        return new

    new_model, _ = replay(model, make)
    for old, new in pairs:
        if isinstance(old, keras.Model):
            new.set_weights(old.get_weights())
        elif isinstance(old, L.Layer):
            _copy_sliced(old, new, plan.roles.get(old.name, set()), plan, kept)
    return new_model


def _copy_sliced(old: Any, new: Any, roles: set, plan: _Plan, kept: np.ndarray) -> None:
    if len(old.weights) != len(new.weights):
        raise ValueError(
            f"Rebuilt layer {old.name!r} has {len(new.weights)} weights, expected "
            f"{len(old.weights)}."
        )
    for w_old, w_new in zip(old.weights, new.weights, strict=True):
        value = np.asarray(keras.ops.convert_to_numpy(w_old))
        axis = _weight_axis(old, roles, w_old, plan) if roles else None
        if axis is not None:
            if value.shape[axis] != plan.hidden:
                raise ValueError(
                    f"prune_hidden_width: weight {w_old.path} has {value.shape[axis]} positions "
                    f"on axis {axis}, expected the hidden width {plan.hidden}."
                )
            value = np.take(value, kept, axis=axis)
        if tuple(w_new.shape) != value.shape:
            raise ValueError(
                f"Rebuilt layer {old.name!r}: weight {w_new.path} has shape "
                f"{tuple(w_new.shape)}, sliced value has {value.shape}."
            )
        w_new.assign(value)


def prune_hidden_width(
    model: keras.Model,
    ratio: float,
    importance: str = "auto",
    *,
    data: Any = None,
    round_to: int | str = 1,
    min_channels: int = 1,
    batch_size: int = 32,
    calibration_batches: int = 8,
) -> keras.Model:
    """Removes hidden channels (the residual stream's width) from a keras-hub transformer.

    The same channels go from the embeddings, every TransformerEncoder / TransformerDecoder
    block, every LayerNorm of the stream and the head (one coupled group, Minitron's width
    pruning); each block keeps its heads' width (`hub_layers.Pruned*` with `head_dim`).

    Args:
        model: a built keras-hub backbone (`BertBackbone`, `GPT2Backbone`, ...) or task model
            (`BertTextClassifier`, `GPT2CausalLM`, ...), or a functional model around one. Not
            changed.
        ratio: fraction of the hidden channels removed, in [0, 1). 0 returns an equal copy.
        importance: `"auto"` (default: `"activation"` with `data`, else `"l2"`),
            `"activation"` or `"l2"` (see `hidden_width_scores`).
        data: calibration inputs for `"activation"`: `x`, `(x, y)` or an iterable of batches.
        round_to: the surviving width is a multiple of this (or `"auto"`: this CPU's vector
            lanes), capped at the original width.
        min_channels: at least this many channels survive.
        batch_size: batch size when `data` is arrays.
        calibration_batches: at most this many calibration batches are run.

    Returns:
        A new functional Keras model, narrower, with the surviving weights copied (a keras-hub
        task comes back as the flat functional model `flatten_model` makes). It saves to
        `.keras` and loads with no `custom_objects` once `keras_lean.structured` is imported.

    Raises:
        ValueError: for a bad argument, a model with no embeddings writing a hidden state, or a
            layer reading the hidden state whose channels cannot be followed (named).

    Example:

    >>> small = prune_hidden_width(classifier, 0.25, data=x_calibration)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a Keras 3 functional model (a keras-hub backbone or task). Received: "
            f"{type(model).__name__}"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ValueError(f"ratio must be a float in [0, 1). Received: ratio={ratio!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(
            f"min_channels must be an integer >= 1. Received: min_channels={min_channels!r}"
        )
    round_to = resolve_round_to(round_to)
    _check_importance(importance, data)
    model = flatten_model(model)[0] if has_nested_models(model) else model
    plan = _trace(model)
    scores = _scores(model, plan, importance, data, batch_size, calibration_batches)
    keep = keep_count(plan.hidden, float(ratio), round_to, min_channels)
    order = sorted(range(plan.hidden), key=lambda j: (-scores[j], j))
    kept = np.array(sorted(order[:keep]), dtype=np.int64)
    return _rebuild(model, plan, kept)
