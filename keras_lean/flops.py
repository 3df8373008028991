"""Analytic parameter and FLOP counts for Keras 3 models.

`count_flops(model)` walks a built Sequential or functional model (nested models included) call by
call and counts, for one sample, the forward floating-point operations of every layer from its
configuration and the shapes it was called with. No profiler, no tracing: the same answer on every
backend and machine.

Conventions (the ones most papers and Torch-Pruning / fvcore-style counters use, made explicit):

- A multiply-add is 2 FLOPs. A bias add is 1 FLOP per output element.
- Dense, Conv1D/2D/3D (and Transpose), DepthwiseConv1D/2D, SeparableConv1D/2D, EinsumDense,
  MultiHeadAttention (the four projections plus the two attention matmuls) are counted exactly,
  and so are keras-hub's TransformerEncoder and TransformerDecoder (as the attention,
  LayerNormalization, Dense and Add layers they are made of: a decoder's self-attention, its
  cross-attention when it has one, and its feed-forward block; pruned heads counted at their
  `head_dim`). A keras-hub `ReversibleEmbedding` called with `reverse=True` (the tied output
  projection of a causal LM) is a matmul by the embedding table, `2 x hidden x vocabulary` per
  token; called forward it is a lookup (0).
- BatchNormalization: 2 FLOPs per element (scale and shift; inference form, statistics folded).
  LayerNormalization: 7 FLOPs per element (mean 1, centring 1, squared sum 2, normalize 1,
  scale and shift 2).
- Pooling: one FLOP per window element per output; global pooling: one per input element.
  Merge layers (Add, Subtract, Multiply, Average, Maximum, Minimum): one FLOP per output element
  per extra input.
- Zero FLOPs: Embedding (a table lookup), activations and softmax (cheap element-wise work,
  ignored), Dropout and noise layers (identity at inference), reshaping, padding, cropping,
  concatenation, input layers.
- Any other layer is counted as 0 FLOPs and its row carries a `note` saying so (its parameters are
  still counted).
- Dimensions unknown at build time (other than the batch) count as 1 and are noted. A nested
  model built for any length (a keras-hub backbone's `(None, None)` token inputs) is counted at
  the shapes its caller feeds it (the shapes are carried through its graph).
- Wrapper layers (anything with a `.layer` attribute, like Keras' `Wrapper` and keras_lean's
  pruning and mask wrappers) are counted as the layer they wrap; the wrapper's own bookkeeping
  weights (masks, step counters) are not parameters of the deployed model and are not counted.
  The same holds for keras_lean's structured mask layers (`ChannelMask`: 0 FLOPs, 0 params;
  `MaskedMultiHeadAttention` / `MaskedLayerNormalization`: counted as the plain layer at full
  width, since masking does not remove work until `shrink`).

`training_flops(model, samples)` is `3 x forward x samples`: the backward pass costs about twice
the forward (one matmul for the input gradient, one for the weight gradient, per forward matmul),
the convention of Kaplan et al. (2020) and most training-compute estimates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras

from keras_lean._hub import (
    is_transformer_decoder,
    is_transformer_encoder,
    transformer_encoder_flops,
)
from keras_lean._keras_internals import (
    hub_attention_sublayers,
    inputs_struct,
    mha_projections,
    model_calls,
    uses_gate,
)

__all__ = ["FlopsReport", "LayerFlops", "count_flops", "training_flops"]


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """One row of a `FlopsReport`.

    Attributes:
        name: layer name (`outer/inner` inside nested models).
        class_name: the layer's class name (of the wrapped layer for wrappers).
        params: parameter count (counted once even when the layer is called several times).
        flops: forward FLOPs per sample, summed over every call of the layer.
        note: why the count is approximate or zero, or "" when it is exact.
    """

    name: str
    class_name: str
    params: int
    flops: int
    note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-layer parameters and forward FLOPs per sample of a model.

    Attributes:
        rows: one `LayerFlops` per layer, in graph order.
    """

    rows: tuple[LayerFlops, ...]

    @property
    def total(self) -> int:
        """Forward FLOPs per sample of the whole model."""
        return sum(r.flops for r in self.rows)

    @property
    def params(self) -> int:
        """Parameters of the whole model (wrapper bookkeeping excluded)."""
        return sum(r.params for r in self.rows)

    def by_name(self) -> dict[str, LayerFlops]:
        return {r.name: r for r in self.rows}

    def to_dict(self) -> dict:
        return {
            "total_flops": self.total,
            "params": self.params,
            "layers": [r.to_dict() for r in self.rows],
        }


def _unwrap(layer: Any) -> Any:
    seen = 0
    while hasattr(layer, "layer") and isinstance(layer.layer, keras.layers.Layer) and seen < 8:
        layer = layer.layer
        seen += 1
    return layer


def _shape(t: Any) -> tuple:
    return tuple(t.shape)


def _per_sample(shape: tuple) -> tuple[int, bool]:
    """Number of elements of one sample; True if an unknown dimension was counted as 1."""
    unknown = any(d is None for d in shape[1:])
    return math.prod(1 if d is None else int(d) for d in shape[1:]), unknown


def _dim(d: Any) -> int:
    return 1 if d is None else int(d)


_ZERO_FLOP = (
    "InputLayer",
    "Embedding",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Flatten",
    "Reshape",
    "Permute",
    "RepeatVector",
    "Identity",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "Concatenate",
    "Masking",
    "PositionEmbedding",  # keras-hub: returns its table's first rows (the add is a layer)
    "ChannelMask",  # keras_lean.structured: an element-wise multiply, like an activation
)


def _einsum_macs(equation: str, in_shape: tuple, kernel_shape: tuple) -> int:
    lhs, _ = equation.split("->")
    a, b = lhs.split(",")
    sizes: dict[str, int] = {}
    # The input's leading letter is the batch; other unknown dims count as 1.
    for letter, d in zip(a, in_shape, strict=False):
        sizes[letter] = _dim(d)
    sizes[a[0]] = 1
    for letter, d in zip(b, kernel_shape, strict=False):
        sizes[letter] = int(d)
    return math.prod(sizes.values())


def _mha_flops(layer: Any, args: list) -> int:
    q_shape, v_shape = args[0], args[1]
    k_shape = args[2] if len(args) > 2 and args[2] is not None else v_shape
    tq = math.prod(_dim(d) for d in q_shape[1:-1])
    tk = math.prod(_dim(d) for d in k_shape[1:-1])
    tv = math.prod(_dim(d) for d in v_shape[1:-1])
    h, kd = layer.num_heads, layer.key_dim
    vd = layer.value_dim or kd
    bias = 1 if layer.use_bias else 0
    f = tq * h * kd * (2 * int(q_shape[-1]) + bias)
    f += tk * h * kd * (2 * int(k_shape[-1]) + bias)
    f += tv * h * vd * (2 * int(v_shape[-1]) + bias)
    if uses_gate(layer):
        f += tq * h * vd * (2 * int(q_shape[-1]) + bias + 1)
    f += 2 * h * tq * tk * kd + 2 * h * tq * tk * vd
    out_shape = mha_projections(layer)["output"].kernel.shape
    d_out = math.prod(int(d) for d in out_shape[2:])
    f += tq * d_out * (2 * h * vd + bias)
    return f


def _transformer_decoder_flops(layer: Any, dec_shape: tuple, enc_shape: tuple | None) -> int:
    """Forward FLOPs per sample of one keras-hub TransformerDecoder call, from its built
    sublayers: self-attention (and cross-attention on the encoder sequence when the block has
    one), a LayerNormalization and a residual add per sub-block, the two feed-forward Dense."""
    d = int(dec_shape[-1])
    t = math.prod(_dim(s) for s in dec_shape[1:-1])
    attention = hub_attention_sublayers(layer)
    f = _mha_flops(attention["_self_attention_layer"], [dec_shape, dec_shape])
    blocks = 2
    cross = attention.get("_cross_attention_layer")
    if cross is not None and enc_shape is not None:
        f += _mha_flops(cross, [dec_shape, enc_shape])
        blocks = 3
    ff = int(layer.intermediate_dim)
    f += t * ff * (2 * d + 1) + t * d * (2 * ff + 1)
    return f + blocks * (7 * t * d + t * d)


def _hub_call_flops(layer: Any, args: list, kwargs: dict) -> tuple[int, str] | None:
    """FLOPs of a keras-hub layer call whose cost depends on its arguments (None: not one)."""
    if is_transformer_decoder(layer):
        dec = args[0] if args else kwargs.get("decoder_sequence")
        enc = args[1] if len(args) > 1 else kwargs.get("encoder_sequence")
        enc_shape = _shape(enc) if hasattr(enc, "shape") else None
        unknown = any(s is None for s in _shape(dec)[1:-1])
        note = "unknown dimensions counted as 1" if unknown else ""
        return _transformer_decoder_flops(layer, _shape(dec), enc_shape), note
    if isinstance(layer, keras.layers.Embedding):  # keras' or keras-hub's ReversibleEmbedding too
        reversible = any(c.__name__ == "ReversibleEmbedding" for c in type(layer).__mro__)
        if not reversible or not (args[1] if len(args) > 1 else kwargs.get("reverse", False)):
            return 0, ""  # a table lookup
        shape = _shape(args[0] if args else kwargs["inputs"])
        t = math.prod(_dim(s) for s in shape[1:-1])
        note = "unknown dimensions counted as 1" if any(s is None for s in shape[1:-1]) else ""
        return 2 * t * int(shape[-1]) * int(layer.input_dim), note
    return None


def _layer_flops(layer: Any, in_shapes: list, out_shapes: list, call_args: list) -> tuple[int, str]:
    """Forward FLOPs per sample of one call of `layer`, and a note when not exact."""
    cls = type(layer).__name__
    out = out_shapes[0] if out_shapes else ()
    e_out, unk_out = _per_sample(out) if out else (0, False)
    e_in, unk_in = _per_sample(in_shapes[0]) if in_shapes else (0, False)
    note = "unknown dimensions counted as 1" if (unk_out or unk_in) else ""
    bias = 1 if getattr(layer, "use_bias", False) else 0
    L = keras.layers
    if isinstance(layer, L.MultiHeadAttention):
        return _mha_flops(layer, call_args), note
    if is_transformer_encoder(layer):
        return transformer_encoder_flops(layer, in_shapes[0]), note
    if isinstance(layer, L.SeparableConv1D | L.SeparableConv2D):
        k = math.prod(layer.kernel_size)
        c_in = int(in_shapes[0][-1])
        spatial = e_out // int(out[-1])
        dw = 2 * spatial * c_in * layer.depth_multiplier * k
        pw = 2 * spatial * c_in * layer.depth_multiplier * layer.filters
        return dw + pw + bias * e_out, note
    if isinstance(layer, L.DepthwiseConv1D | L.DepthwiseConv2D):
        return e_out * (2 * math.prod(layer.kernel_size) + bias), note
    if isinstance(layer, L.Conv1DTranspose | L.Conv2DTranspose | L.Conv3DTranspose):
        k = math.prod(layer.kernel_size)
        return 2 * e_in * k * layer.filters + bias * e_out, note
    if isinstance(layer, L.Conv1D | L.Conv2D | L.Conv3D):
        k = math.prod(layer.kernel_size)
        c_in = int(in_shapes[0][-1])
        return e_out * (2 * k * c_in // layer.groups + bias), note
    if isinstance(layer, L.EinsumDense):
        macs = _einsum_macs(layer.equation, in_shapes[0], tuple(layer.kernel.shape))
        return 2 * macs + (e_out if layer.bias is not None else 0), note
    if isinstance(layer, L.Dense):
        return e_out * (2 * int(in_shapes[0][-1]) + bias), note
    if isinstance(layer, L.BatchNormalization):
        return 2 * e_out, note
    if isinstance(layer, L.LayerNormalization):
        return 7 * e_out, note
    if cls.startswith("Global") and "Pooling" in cls:
        return e_in, note
    if "Pooling" in cls:
        return e_out * math.prod(layer.pool_size), note
    if isinstance(layer, L.Add | L.Subtract | L.Multiply | L.Average | L.Maximum | L.Minimum):
        return e_out * max(len(in_shapes) - 1, 0), note
    if cls in _ZERO_FLOP:
        return 0, note
    return 0, f"FLOPs not counted: {cls} is not a layer type count_flops knows"


_BOOKKEEPING = ("mask", "pruning_step")


def _params(layer: Any) -> int:
    """Parameters of a layer; keras_lean mask layers' masks and step counters are not counted."""
    if not isinstance(layer, keras.layers.Layer) or not layer.built:
        return 0  # a keras.ops operation in a functional graph (x[:, 0], x * 2.0) holds none
    if not type(layer).__module__.startswith("keras_lean"):
        return int(layer.count_params())
    return sum(
        math.prod(w.shape) for w in layer.weights if w.path.rsplit("/", 1)[-1] not in _BOOKKEEPING
    )


def _arg_shapes(args: list, kwargs: dict) -> list:
    """Shapes of the positional-or-keyword tensor arguments (MHA: query, value, key)."""
    args = list(args)
    for key in ("query", "value", "key"):
        if key in kwargs:
            args.append(kwargs[key])
    return [_shape(a) if hasattr(a, "shape") else None for a in args]


def _resolve(call: Any, specs: dict | None) -> tuple[list, list, list, dict]:
    """(inputs, outputs, args, kwargs) of a call, with the tensors' shapes as the caller fed
    them when `specs` maps this graph's tensors to better-known ones (a nested backbone built
    for any sequence length, called on a fixed one); the graph's own tensors otherwise."""
    if specs is None:
        args, kwargs = call.arguments()
        return call.inputs, call.outputs, args, kwargs
    args, kwargs = call.fill_in(specs)
    inputs = [specs.get(id(t), t) for t in call.inputs]
    try:
        outputs = keras.tree.flatten(call.layer.compute_output_spec(*args, **kwargs))
    except Exception:  # a layer that cannot say: keep the graph's own (less known) shapes
        outputs = call.outputs
    if len(outputs) != len(call.outputs):
        outputs = call.outputs
    for old, new in zip(call.outputs, outputs, strict=True):
        specs[id(old)] = new
    return inputs, outputs, args, kwargs


def _nested_specs(model: Any, args: list, kwargs: dict) -> dict | None:
    """{id(graph input): caller's tensor} for a nested model called on tensors whose shapes
    differ from its own inputs' (None when they agree, or cannot be matched)."""
    fed = keras.tree.flatten(args[0] if args else next(iter(kwargs.values()), None))
    own = keras.tree.flatten(inputs_struct(model))
    if len(fed) != len(own) or not all(hasattr(t, "shape") for t in fed):
        return None
    if all(tuple(a.shape) == tuple(b.shape) for a, b in zip(fed, own, strict=True)):
        return None
    return {id(o): f for o, f in zip(own, fed, strict=True)}


def _collect(model: Any, prefix: str, rows: dict, order: list, specs: dict | None = None) -> None:
    for call in model_calls(model, "count_flops"):
        op = call.layer
        inputs, outputs, args, kwargs = _resolve(call, specs)
        if isinstance(op, keras.Model):
            _collect(op, f"{prefix}{op.name}/", rows, order, _nested_specs(op, args, kwargs))
            continue
        layer = _unwrap(op)
        in_shapes = [_shape(t) for t in inputs]
        out_shapes = [_shape(t) for t in outputs]
        counted = _hub_call_flops(layer, args, kwargs)
        if counted is None:
            counted = _layer_flops(layer, in_shapes, out_shapes, _arg_shapes(args, kwargs))
        flops, note = counted
        name = prefix + op.name
        if name in rows:
            prev = rows[name]
            rows[name] = dataclasses.replace(prev, flops=prev.flops + flops)
        else:
            params = _params(layer)
            rows[name] = LayerFlops(name, type(layer).__name__, int(params), int(flops), note)
            order.append(name)


def count_flops(model: keras.Model) -> FlopsReport:
    """Counts parameters and forward FLOPs per sample, layer by layer.

    Args:
        model: a built Keras 3 Sequential or functional model (nested models and wrapper layers
            are followed). See the module docstring for what is counted and how.

    Returns:
        A `FlopsReport`: `.rows`, `.total` (forward FLOPs per sample), `.params`, `.to_dict()`.

    Raises:
        ValueError: if `model` is not a built Sequential or functional Keras model.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> count_flops(model).total  # 8*4 multiply-adds (64) + 4 bias adds
    68
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"count_flops expects a Keras 3 model. Received: model of type {type(model).__name__}"
        )
    rows: dict[str, LayerFlops] = {}
    order: list[str] = []
    _collect(model, "", rows, order)
    return FlopsReport(tuple(rows[n] for n in order))


def training_flops(model: keras.Model, samples: int) -> int:
    """Estimated training FLOPs for `samples` sample passes (forward + backward).

    Uses the `3 x forward` convention: the backward pass costs about twice the forward.

    Args:
        model: a built Keras 3 Sequential or functional model.
        samples: number of training samples processed (epochs x dataset size), >= 0.

    Returns:
        `3 * count_flops(model).total * samples`.

    Raises:
        ValueError: if `samples` is negative or not an integer, or `model` is not supported.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0. Received: samples={samples!r}")
    return 3 * count_flops(model).total * samples
