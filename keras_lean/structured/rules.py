"""Channel rules: how each layer type maps input channels to output channels, and is resized.

The dependency graph (`graph.py`) knows no layer type itself. For every layer call it looks up the
layer's `ChannelRule` (the registration of the nearest class in the layer's MRO) and asks it to
`trace` the call; surgery (`surgery.py`) asks the same rule to `resize` the layer's config once
units are removed; gradual pruning asks `zero_preserving` whether a zero channel stays zero
through the layer (then no mask is needed after it) and `masked_variant` for a layer that masks
units inside itself (MultiHeadAttention's heads). The built-in layers are registered below
with `register_channel_rule`, the same call a user makes for a custom block (see
docs/extending.md), in the spirit of Torch-Pruning's customized pruners.

What a rule sees while tracing (`ctx`, a `graph.CallContext`):

- `ctx.inputs`: one identity array per input tensor (None for a tensor without a tracked channel
  axis, e.g. integer token ids); `ctx.x` is the first; `ctx.input_shape(i)` its static shape.
- `ctx.need_input()`: `ctx.x`, or an `UnsupportedLayer` when the input has no channel axis.
- `ctx.produce(n, role)`: `n` fresh identities, the layer's new output channels (`role` names
  them in reports: `"units"`, `"filters"`).
- `ctx.slice(weight, axis, ids, kind="kernel")`: axis `axis` of the layer's weight `weight`
  (its path inside the layer: `"kernel"`, `"query/kernel"`) carries the identities `ids`;
  surgery removes the pruned positions. `kind` is `"kernel"`, `"bias"`, `"gamma"`, `"beta"` or
  `"stat"` (what importance criteria read).
- `ctx.unite(arrays)`: the arrays hold the same channels position by position (an element-wise
  merge); returns the first.
- `ctx.block(ids, reason)`: these channels are never removed; `ctx.note(reason)` reports the
  layer in `skipped` without blocking anything; `ctx.remember(key, value)` keeps a value for
  `resize`; `ctx.argument(i, name)` is the tensor passed as positional argument `i` or keyword
  `name` (None if absent) and `ctx.ids_of(tensor)` its identities (MultiHeadAttention's query,
  value and key).
- Raise `UnsupportedLayer(reason)` when the channels cannot be followed: the graph then blocks
  every channel the layer touches and lists it in `skipped` with the reason (nothing the rule
  recorded before raising is kept).

What a rule sees while resizing (`ctx`, a `surgery.ResizeContext`): `ctx.inputs`, `ctx.output`
(the identity arrays of the trace), `ctx.info` (what `remember` kept), `ctx.kept(ids)` (how many
positions of `ids` survive). `resize` returns the new config; weights are sliced by surgery from
the `slice` records, so a rule never touches weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lean._hub import FFN_INTERMEDIATE, FFN_OUTPUT, is_transformer_block
from keras_lean._keras_internals import (
    einsum_output_shape,
    hub_attention_sublayers,
    mha_projections,
    uses_gate,
)
from keras_lean.structured.masks import MaskedLayerNormalization, MaskedMultiHeadAttention

__all__ = [
    "ChannelRule",
    "PassThrough",
    "Producer",
    "UnsupportedLayer",
    "UnsupportedRule",
    "get_channel_rule",
    "register_channel_rule",
]

L = keras.layers


class UnsupportedLayer(Exception):
    """Raised by a rule when a layer's channels cannot be followed (the message is the reason)."""


class ChannelRule:
    """How one layer type moves channels (`trace`) and is narrowed (`resize`).

    Subclass it and override what your layer needs; the defaults say "not supported" (`trace`),
    "config unchanged" (`resize`) and "a zero channel may become non-zero" (`zero_preserving`).
    """

    def trace(self, layer: Any, ctx: Any) -> np.ndarray | None:
        """Records the layer's weight slices and returns the identities of its output channels
        (None when the output has no tracked channel axis)."""
        raise UnsupportedLayer(
            f"layer type {type(layer).__name__} is not known to the dependency graph"
        )

    def resize(self, layer: Any, config: dict, ctx: Any) -> dict:
        """The layer's config once the pruned units are gone (default: unchanged)."""
        return config

    def zero_preserving(self, layer: Any) -> bool:
        """Whether an all-zero input channel gives an all-zero output channel (then gradual
        pruning needs no mask after this layer)."""
        return False

    def rebuilt_class(self, layer: Any, config: dict) -> type:
        """The class surgery rebuilds the layer as, from the `config` `resize` returned (default:
        the layer's own; keras-hub blocks that lose heads become `hub_layers.Pruned*`)."""
        return type(layer)

    def masked_variant(self, layer: Any, ctx: Any) -> Any | None:
        """For gradual pruning: a replacement layer that masks units *inside* this layer
        (attention heads, normalization statistics), or None (default: the plain layer, with a
        `ChannelMask` after it where needed). `ctx` is an `api.GradualContext`."""
        return None


_CLASS_RULES: dict[type, ChannelRule] = {}
_PREDICATE_RULES: list[tuple[Callable[[Any], bool], ChannelRule]] = []


def register_channel_rule(layer_class: type, rule: ChannelRule) -> None:
    """Registers the channel rule of `layer_class` (and of its subclasses without their own).

    Args:
        layer_class: a Keras layer class, yours or a built-in one (replacing its rule).
        rule: a `ChannelRule` instance.

    Raises:
        TypeError: if `layer_class` is not a Keras layer class or `rule` not a `ChannelRule`.

    Example:

    >>> register_channel_rule(MyGatedDense, MyGatedDenseRule())
    >>> small = prune_structured(model, 0.5)  # MyGatedDense layers are narrowed too
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"layer_class must be a keras.layers.Layer subclass. Received: {layer_class!r}"
        )
    if not isinstance(rule, ChannelRule):
        raise TypeError(
            "rule must be a keras_lean.structured.ChannelRule instance. "
            f"Received: {type(rule).__name__}"
        )
    _CLASS_RULES[layer_class] = rule


def _register_predicate(predicate: Callable[[Any], bool], rule: ChannelRule) -> None:
    """A rule for layers recognised without importing their package (keras-hub)."""
    _PREDICATE_RULES.append((predicate, rule))


def get_channel_rule(layer: Any) -> ChannelRule | None:
    """The rule the graph uses for `layer`, or None for a layer type it does not know."""
    for cls in type(layer).__mro__:
        if cls in _CLASS_RULES:
            return _CLASS_RULES[cls]
    for predicate, rule in _PREDICATE_RULES:
        if predicate(layer):
            return rule
    return None


# -- generic rules -----------------------------------------------------------------------------


class PassThrough(ChannelRule):
    """Output channels are the input channels, position by position (activations, pooling, ...).

    Args:
        zero_preserving: whether a zero channel stays zero (False for noise layers).
    """

    def __init__(self, zero_preserving: bool = True):
        self._zero = zero_preserving

    def trace(self, layer, ctx):
        return ctx.x

    def zero_preserving(self, layer):
        return self._zero


class UnsupportedRule(ChannelRule):
    """A layer type the graph leaves alone, with the reason (default: "<type> is not supported
    by the dependency graph")."""

    def __init__(self, reason: str | None = None):
        self._reason = reason

    def trace(self, layer, ctx):
        raise UnsupportedLayer(
            self._reason or f"{type(layer).__name__} is not supported by the dependency graph"
        )


class Producer(ChannelRule):
    """A layer that creates `config[width_key]` new channels from its input's (Dense, Conv).

    Args:
        width_key: the config key of the output width (`"units"`, `"filters"`).
        kernel: the kernel's weight path; its axis `in_axis` reads the input channels and its
            last axis writes the output channels.
        in_axis: the kernel axis of the input channels (0 for Dense, -2 for convolutions).
        out_axis: the kernel axis of the output channels.
    """

    def __init__(
        self, width_key: str, kernel: str = "kernel", in_axis: int = -2, out_axis: int = -1
    ):
        self.width_key, self.kernel = width_key, kernel
        self.in_axis, self.out_axis = in_axis, out_axis

    def check(self, layer) -> None:
        """Raises `UnsupportedLayer` for configurations the rule cannot follow."""

    def trace(self, layer, ctx):
        self.check(layer)
        x = ctx.need_input()
        out = ctx.produce(int(getattr(layer, self.width_key)), self.width_key)
        ctx.slice(self.kernel, self.in_axis, x)
        ctx.slice(self.kernel, self.out_axis, out)
        if layer.use_bias:
            ctx.slice("bias", 0, out, "bias")
        if getattr(layer, "lora_rank", None):
            # Keras' enable_lora: A reads the kernel's input axis, B writes its output axis.
            # They are sliced with the kernel; the rebuilt layer keeps `lora_rank` (its
            # config), so it stays adapted at the new width.
            ctx.slice("lora_kernel_a", self.in_axis, x)
            ctx.slice("lora_kernel_b", -1, out)
        return out

    def resize(self, layer, config, ctx):
        config[self.width_key] = ctx.kept(ctx.output)
        return config


class _Dense(Producer):
    def __init__(self):
        super().__init__("units", in_axis=0, out_axis=1)


class _Conv(Producer):
    def __init__(self):
        super().__init__("filters")

    def check(self, layer):
        if layer.groups != 1:
            raise UnsupportedLayer(f"grouped convolution (groups={layer.groups}) is not supported")


class _Separable(ChannelRule):
    def trace(self, layer, ctx):
        x = ctx.need_input()
        out = ctx.produce(layer.filters, "filters")
        ctx.slice("depthwise_kernel", -2, x)
        ctx.slice("pointwise_kernel", -2, np.repeat(x, layer.depth_multiplier))
        ctx.slice("pointwise_kernel", -1, out)
        if layer.use_bias:
            ctx.slice("bias", 0, out, "bias")
        return out

    def resize(self, layer, config, ctx):
        config["filters"] = ctx.kept(ctx.output)
        return config


class _Depthwise(ChannelRule):
    def trace(self, layer, ctx):
        x = ctx.need_input()
        out = np.repeat(x, layer.depth_multiplier)  # the width follows the input
        ctx.slice("kernel", -2, x)
        if layer.use_bias:
            ctx.slice("bias", 0, out, "bias")
        return out


class _Embedding(ChannelRule):
    def trace(self, layer, ctx):
        out = ctx.produce(layer.output_dim, "output_dim")
        ctx.slice("embeddings", 1, out)
        return out

    def resize(self, layer, config, ctx):
        config["output_dim"] = ctx.kept(ctx.output)
        return config


def _short(weight) -> str:
    return weight.path.rsplit("/", 1)[-1]


class _BatchNorm(ChannelRule):
    def trace(self, layer, ctx):
        x = ctx.need_input()
        if layer.axis not in (-1, len(ctx.input_shape()) - 1):
            raise UnsupportedLayer(f"BatchNormalization over axis {layer.axis} (not the channels)")
        for w in layer.weights:
            short = _short(w)
            ctx.slice(short, 0, x, short if short in ("gamma", "beta") else "stat")
        return x


class _LayerNorm(ChannelRule):
    def trace(self, layer, ctx):
        x = ctx.need_input()
        rank = len(ctx.input_shape())
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        if [a % rank for a in axes] != [rank - 1]:
            raise UnsupportedLayer(f"LayerNormalization over axes {layer.axis} (not the last)")
        for w in layer.weights:
            ctx.slice(_short(w), 0, x, _short(w))
        return x

    def masked_variant(self, layer, ctx):
        # mean and variance over the surviving channels only: what the shrunk layer computes
        if not (ctx.sliced and ctx.prunable(ctx.inputs[0])):
            return None
        masked = isinstance(layer, MaskedLayerNormalization)
        cfg = layer.plain_config() if masked else layer.get_config()
        return MaskedLayerNormalization(**ctx.mask_args(ctx.inputs[0]), **cfg)


# Activations that mix channels (removing one changes the others) / that keep zeros at zero.
_CROSS_CHANNEL_ACTIVATIONS = ("softmax", "log_softmax")
_ZERO_PRESERVING_ACTIVATIONS = (
    "relu",
    "relu6",
    "linear",
    "tanh",
    "gelu",
    "silu",
    "swish",
    "elu",
    "selu",
    "leaky_relu",
    "softsign",
    "mish",
)


def _activation_name(layer) -> str:
    return getattr(layer.activation, "__name__", str(layer.activation))


class _Activation(ChannelRule):
    def trace(self, layer, ctx):
        act = _activation_name(layer)
        if act in _CROSS_CHANNEL_ACTIVATIONS:
            raise UnsupportedLayer(f"activation {act!r} mixes channels")
        return ctx.x

    def zero_preserving(self, layer):
        return _activation_name(layer) in _ZERO_PRESERVING_ACTIVATIONS


class _Merge(ChannelRule):
    def trace(self, layer, ctx):
        ins = ctx.inputs
        if len({len(a) for a in ins if a is not None}) > 1 or any(a is None for a in ins):
            raise UnsupportedLayer("merge of tensors with different channel counts (broadcast)")
        return ctx.unite(ins)

    def zero_preserving(self, layer):
        return True


class _Concatenate(ChannelRule):
    def trace(self, layer, ctx):
        ins = ctx.inputs
        if any(a is None for a in ins):
            raise UnsupportedLayer("concatenation of tensors without channels")
        if layer.axis in (-1, len(ctx.input_shape()) - 1):
            return np.concatenate(ins)
        return ctx.unite(ins)

    def zero_preserving(self, layer):
        return True


def _spatial(ctx, what: str) -> tuple:
    spatial = ctx.input_shape()[1:-1]
    if any(d is None for d in spatial):
        raise UnsupportedLayer(f"{what} of a tensor with unknown spatial size")
    return spatial


class _Flatten(ChannelRule):
    def trace(self, layer, ctx):
        x = ctx.need_input()
        # channel c of the input owns positions p * C + c of the flat output
        return np.tile(x, math.prod(_spatial(ctx, "Flatten")))

    def zero_preserving(self, layer):
        return True


class _Reshape(ChannelRule):
    def trace(self, layer, ctx):
        x = ctx.need_input()
        target = tuple(layer.target_shape)
        spatial = _spatial(ctx, "Reshape")
        if len(target) == 1:
            ctx.remember("reshape_mode", "flat")
            return np.tile(x, math.prod(spatial))
        known = [d for d in target[:-1] if d != -1]
        if target[-1] == len(x) and (-1 in target[:-1] or math.prod(known) == math.prod(spatial)):
            ctx.remember("reshape_mode", "last")
            return x
        raise UnsupportedLayer(
            f"Reshape to {target} moves channels off the last axis (only flattening or keeping "
            "the channel axis last is supported)"
        )

    def resize(self, layer, config, ctx):
        x = ctx.inputs[0]
        kept = ctx.kept(x)
        target = tuple(layer.target_shape)
        if ctx.info["reshape_mode"] == "flat":
            config["target_shape"] = (target[0] // len(x) * kept,) if target[0] != -1 else (-1,)
        else:
            config["target_shape"] = target[:-1] + (kept,)
        return config

    def zero_preserving(self, layer):
        return True


class _MultiHeadAttention(ChannelRule):
    """Heads are the units: the query/key/value columns of a head and its output-projection rows
    go together; the output width is the query's (or `output_shape`, a new block)."""

    def trace(self, layer, ctx):
        if uses_gate(layer):
            raise UnsupportedLayer("MultiHeadAttention with use_gate=True is not supported")
        query, value = ctx.argument(0, "query"), ctx.argument(1, "value")
        key = ctx.argument(2, "key")
        q, v, k = (ctx.ids_of(t) for t in (query, value, value if key is None else key))
        if q is None or v is None or k is None:
            raise UnsupportedLayer("MultiHeadAttention input has no channel axis")
        heads = ctx.produce(layer.num_heads, "heads", heads=True)
        for part, ids in (("query", q), ("key", k), ("value", v)):
            ctx.slice(f"{part}/kernel", 0, ids)
            ctx.slice(f"{part}/kernel", 1, heads)
            if layer.use_bias:
                ctx.slice(f"{part}/bias", 0, heads, "bias")
        ctx.slice("attention_output/kernel", 0, heads)
        out_shape = einsum_output_shape(layer)
        if out_shape is None:
            out = q  # the output width is the query width: the same channels
        elif isinstance(out_shape, int) or len(tuple(out_shape)) == 1:
            width = out_shape if isinstance(out_shape, int) else tuple(out_shape)[0]
            out = ctx.produce(int(width), "output_shape")
        else:
            width = int(mha_projections(layer)["output"].kernel.shape[-1])
            out = ctx.produce(width, "out")
            ctx.block(out, f"{layer.name}: multi-dimensional output_shape is not pruned")
            ctx.note("multi-dimensional output_shape: output width kept")
        ctx.slice("attention_output/kernel", -1, out)
        if layer.use_bias:
            ctx.slice("attention_output/bias", 0, out, "bias")
        return out

    def masked_variant(self, layer, ctx):
        heads = ctx.info.get("heads")
        if not ctx.prunable(heads):
            return None
        masked = isinstance(layer, MaskedMultiHeadAttention)
        cfg = layer.plain_config() if masked else layer.get_config()
        return MaskedMultiHeadAttention(**ctx.mask_args(heads, heads=True), **cfg)

    def resize(self, layer, config, ctx):
        config["num_heads"] = ctx.kept(ctx.info["heads"])
        out_shape = einsum_output_shape(layer)
        if isinstance(out_shape, int):
            config["output_shape"] = ctx.kept(ctx.output)
        elif out_shape is not None and len(tuple(out_shape)) == 1:
            config["output_shape"] = (ctx.kept(ctx.output),)
        return config


_HUB_BLOCKS = frozenset(
    {
        ("keras_hub", "TransformerEncoder"),
        ("keras_hub", "TransformerDecoder"),
        ("keras_lean", "PrunedTransformerEncoder"),
        ("keras_lean", "PrunedTransformerDecoder"),
    }
)


def _rebuildable_with_fewer_heads(layer) -> bool:
    """keras-hub's own blocks (or keras_lean's pruned ones): a subclass of them may change what
    the block does, so it is not turned into a `hub_layers.Pruned*` class."""
    cls = type(layer)
    return (cls.__module__.split(".", 1)[0], cls.__name__) in _HUB_BLOCKS


class _HubTransformerBlock(ChannelRule):
    """keras-hub's TransformerEncoder / TransformerDecoder: the attention heads (self and cross
    attention of one block share `num_heads`, so head i goes from both) and the feed-forward
    neurons (`intermediate_dim`) are units, two groups inside the layer; the hidden width (the
    residual stream) stays. A block that loses heads is rebuilt as `hub_layers.Pruned*`, which
    keeps each head's width (keras-hub would derive `key_dim = hidden_dim // num_heads`)."""

    def trace(self, layer, ctx):
        x = ctx.need_input()
        name = layer.name
        kept = "hidden width kept (the residual stream)"
        ctx.block(x, f"{name}: {kept}")
        ctx.block(ctx.ids_of(ctx.argument(1, "encoder_sequence")), f"{name}: {kept}")
        inner = ctx.produce(int(layer.intermediate_dim), "intermediate", inner=True)
        ctx.slice(f"{FFN_INTERMEDIATE}/kernel", 1, inner)
        ctx.slice(f"{FFN_INTERMEDIATE}/bias", 0, inner, "bias")
        ctx.slice(f"{FFN_OUTPUT}/kernel", 0, inner)
        heads = self._trace_heads(layer, ctx)
        if not ctx.inner_groups:
            reason = "heads and feed-forward neurons inside the block are kept (inner_groups=False)"
            ctx.block(inner, f"{name}: {reason}")
            ctx.block(heads, f"{name}: {reason}")
            ctx.note(f"{kept}; {reason}")
        elif heads is None:
            ctx.note(f"{kept}; feed-forward neurons are pruned, heads kept")
        else:
            ctx.note(f"{kept}; heads and feed-forward neurons are pruned")
        return x  # residual: the output carries the input's channels

    def _trace_heads(self, layer, ctx) -> np.ndarray | None:
        attention = hub_attention_sublayers(layer)
        if not attention:
            return None
        heads = ctx.produce(int(layer.num_heads), "heads", heads=True)
        first = next(iter(attention.values()))
        ctx.remember("head_dim", int(mha_projections(first)["query"].kernel.shape[-1]))
        if not _rebuildable_with_fewer_heads(layer):
            ctx.block(heads, f"{layer.name}: heads of a subclass of a keras-hub block are kept")
        for mha in attention.values():
            if uses_gate(mha):
                ctx.block(heads, f"{layer.name}: attention with use_gate=True keeps its heads")
            for part in ("query", "key", "value"):
                ctx.slice(f"{mha.name}/{part}/kernel", 1, heads)
                if mha.use_bias:
                    ctx.slice(f"{mha.name}/{part}/bias", 0, heads, "bias")
            ctx.slice(f"{mha.name}/attention_output/kernel", 0, heads)
        return heads

    def masked_variant(self, layer, ctx):
        """Gradual pruning: `hub_layers.MaskedTransformerEncoder` / `...Decoder`, masking the
        block's prunable heads and feed-forward neurons; None when neither group is prunable."""
        groups = {}
        for key, ids, heads in (("head_mask", "heads", True), ("inner_mask", "inner", False)):
            if ctx.prunable(ctx.info.get(ids)):
                groups[key] = ctx.mask_args(ctx.info[ids], heads=heads)
        if not groups:
            return None
        if not _rebuildable_with_fewer_heads(layer):
            raise ValueError(
                f"Gradual structured pruning cannot mask inside layer {layer.name!r} "
                f"({type(layer).__name__}): only keras-hub's own TransformerEncoder / "
                "TransformerDecoder (or keras_lean's Pruned* blocks) are masked; a subclass may "
                "compute something else. Exclude it (exclude=("
                f"{layer.name!r},)) or prune one-shot / progressively."
            )
        from keras_lean.structured.hub_layers import masked_block

        schedule = None
        for args in groups.values():
            schedule = args.pop("pruning_schedule")
        return masked_block(layer, groups.get("head_mask"), groups.get("inner_mask"), schedule)

    def resize(self, layer, config, ctx):
        config["intermediate_dim"] = ctx.kept(ctx.info["inner"])
        heads = ctx.info.get("heads")
        if heads is not None and (ctx.kept(heads) != len(heads) or "head_dim" in config):
            config["num_heads"] = ctx.kept(heads)
            config["head_dim"] = ctx.info["head_dim"]
        return config

    def rebuilt_class(self, layer, config):
        if "head_dim" not in config:
            return type(layer)
        from keras_lean.structured.hub_layers import pruned_class_for

        return pruned_class_for(layer)


def _register_builtins() -> None:
    zero_preserving_pass = (
        L.ReLU,
        L.LeakyReLU,
        L.ELU,
        L.Dropout,
        L.SpatialDropout1D,
        L.SpatialDropout2D,
        L.SpatialDropout3D,
        L.GaussianDropout,
        L.AlphaDropout,
        L.ActivityRegularization,
        L.Identity,
        L.MaxPooling1D,
        L.MaxPooling2D,
        L.MaxPooling3D,
        L.AveragePooling1D,
        L.AveragePooling2D,
        L.AveragePooling3D,
        L.GlobalAveragePooling1D,
        L.GlobalAveragePooling2D,
        L.GlobalAveragePooling3D,
        L.GlobalMaxPooling1D,
        L.GlobalMaxPooling2D,
        L.GlobalMaxPooling3D,
        L.ZeroPadding1D,
        L.ZeroPadding2D,
        L.ZeroPadding3D,
        L.Cropping1D,
        L.Cropping2D,
        L.Cropping3D,
        L.UpSampling1D,
        L.UpSampling2D,
        L.UpSampling3D,
    )
    for cls in zero_preserving_pass:
        register_channel_rule(cls, PassThrough())
    for cls in (L.GaussianNoise, L.InputLayer):
        register_channel_rule(cls, PassThrough(zero_preserving=False))
    register_channel_rule(L.Activation, _Activation())
    register_channel_rule(L.Softmax, UnsupportedRule("Softmax mixes channels"))
    for cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum):
        register_channel_rule(cls, _Merge())
    register_channel_rule(L.Concatenate, _Concatenate())
    register_channel_rule(L.Flatten, _Flatten())
    register_channel_rule(L.Reshape, _Reshape())
    register_channel_rule(L.Dense, _Dense())
    for cls in (L.Conv1D, L.Conv2D, L.Conv3D):
        register_channel_rule(cls, _Conv())
    for cls in (L.SeparableConv1D, L.SeparableConv2D):
        register_channel_rule(cls, _Separable())
    for cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
        register_channel_rule(cls, _Depthwise())
    for cls in (L.EinsumDense, L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
        register_channel_rule(cls, UnsupportedRule())
    register_channel_rule(L.BatchNormalization, _BatchNorm())
    register_channel_rule(L.LayerNormalization, _LayerNorm())
    register_channel_rule(L.Embedding, _Embedding())
    register_channel_rule(L.MultiHeadAttention, _MultiHeadAttention())
    _register_predicate(is_transformer_block, _HubTransformerBlock())


_register_builtins()
