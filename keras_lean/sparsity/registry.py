"""Which layers `prune_low_magnitude` can prune, and which of their weights.

Two ways in, as in TFMOT (`prune_registry.py` + `prunable_layer.py`):

- A layer that implements `get_prunable_weights()` (the `PrunableLayer` protocol) is prunable:
  the method returns the variables to prune. Nothing to import: a Keras 3 layer written for
  TFMOT's `tfmot.sparsity.keras.PrunableLayer` works unchanged (the check is duck-typed), and it
  takes precedence over the registry.
- The built-in layer types (Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv1D/2D,
  SeparableConv1D/2D, Embedding, MultiHeadAttention) are registered here with
  `register_prunable(layer_class, weights_fn)`, the same call a user can make for a layer class
  they cannot edit. The registration of the nearest class in the layer's MRO wins; registering
  `None` marks a class (and its subclasses) as not prunable.
- keras-hub's `TransformerEncoder` and `TransformerDecoder` (one layer each, holding attention
  and a feed-forward block) are registered once keras_hub has been imported (never importing it
  here: it takes seconds, and a keras-hub layer exists only once it is): their weights are the
  kernels of their attention projections (query, key, value, output; a decoder's cross
  attention too) and of their feed-forward Dense layers. `register_prunable(block_class, None)`
  made before still wins.

Example:

>>> class Scale(keras.layers.Layer):
...     def build(self, shape):
...         self.w = self.add_weight(shape=(shape[-1], 4))
...     def call(self, x):
...         return x @ self.w
...     def get_prunable_weights(self):
...         return [self.w]
>>> pruned = prune_low_magnitude(keras.Sequential([keras.Input((8,)), Scale()]))
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras

from keras_lean._keras_internals import (
    flatten_layers,
    layer_embeddings,
    layer_kernel,
    mha_projections,
)

__all__ = [
    "PrunableLayer",
    "PrunableWeight",
    "is_prunable",
    "prunable_layer_types",
    "prunable_weights",
    "register_prunable",
]


@dataclass(frozen=True)
class PrunableWeight:
    """One weight of a layer that can be pruned.

    Attributes:
        name: stable key inside the layer ("kernel", "query/kernel", ...).
        variable: the Keras variable.
        input_axis: the weight's input (reduction) axis, along which N:M groups run.
    """

    name: str
    variable: keras.Variable
    input_axis: int


class PrunableLayer(abc.ABC):
    """A layer that says which of its weights may be pruned (TFMOT's protocol).

    Subclass it (with `keras.layers.Layer`), or simply give a layer a `get_prunable_weights`
    method: `isinstance(layer, PrunableLayer)` is true for both, so layers written for TFMOT's
    `PrunableLayer` need no change. Each returned variable is masked by magnitude; N:M groups run
    along its second-to-last axis (a Dense or Conv kernel's input axis), or the only axis of a
    vector.
    """

    @abc.abstractmethod
    def get_prunable_weights(self) -> list:
        """The variables of this layer to prune (the layer is built when this is called)."""

    @classmethod
    def __subclasshook__(cls, subclass: type) -> bool:
        if cls is PrunableLayer and callable(getattr(subclass, "get_prunable_weights", None)):
            return True
        return NotImplemented


WeightsFn = Callable[[Any], list[PrunableWeight]]
_REGISTRY: dict[type, WeightsFn | None] = {}


def register_prunable(layer_class: type, weights_fn: WeightsFn | None) -> None:
    """Makes `layer_class` (and its subclasses) prunable, or not prunable with `None`.

    Args:
        layer_class: a Keras layer class.
        weights_fn: `weights_fn(layer) -> list[PrunableWeight]` for a built layer, or None.

    Raises:
        TypeError: if `layer_class` is not a Keras layer class or `weights_fn` is not callable.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"layer_class must be a keras.layers.Layer subclass. Received: {layer_class!r}"
        )
    if weights_fn is not None and not callable(weights_fn):
        raise TypeError(
            f"weights_fn must be a callable(layer) -> list[PrunableWeight] or None. "
            f"Received: {weights_fn!r}"
        )
    _REGISTRY[layer_class] = weights_fn


def _registered(layer: Any) -> WeightsFn | None:
    _register_hub_blocks()
    for cls in type(layer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def _relative_path(var: Any, layer: Any) -> str:
    """The variable's path below `layer` (`w`, `sub/kernel`); its name if outside the layer."""
    parts = (var.path or var.name).split("/")
    if layer.name in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index(layer.name)
        return "/".join(parts[last + 1 :])
    return var.name


def _protocol_weights(layer: Any) -> list[PrunableWeight]:
    weights = list(layer.get_prunable_weights())
    out, seen = [], set()
    for i, var in enumerate(weights):
        if not isinstance(var, keras.Variable):
            raise TypeError(
                f"{type(layer).__name__}.get_prunable_weights() of layer {layer.name!r} must "
                f"return Keras variables. Received: {type(var).__name__} at position {i}"
            )
        name = _relative_path(var, layer)
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        out.append(PrunableWeight(name, var, -2 if len(var.shape) >= 2 else 0))
    return out


def is_prunable(layer: Any) -> bool:
    """True if keras_lean can prune `layer`: it implements `get_prunable_weights()` or its type
    is registered (see `prunable_layer_types`)."""
    return isinstance(layer, PrunableLayer) or _registered(layer) is not None


def prunable_weights(layer: Any) -> list[PrunableWeight] | None:
    """The weights keras_lean prunes in a built `layer`, or None if it is not prunable.

    Dense, EinsumDense: kernel. Conv1D/2D/3D: kernel. DepthwiseConv1D/2D: depthwise kernel.
    SeparableConv1D/2D: both the depthwise and the pointwise kernel. Embedding: embeddings.
    MultiHeadAttention: the query, key, value and output projection kernels. keras-hub
    TransformerEncoder / TransformerDecoder: the kernels of every Dense / EinsumDense inside (the
    attention projections and the feed-forward layers). A `PrunableLayer`: what its
    `get_prunable_weights()` returns.
    """
    if isinstance(layer, PrunableLayer):
        return _protocol_weights(layer)
    fn = _registered(layer)
    return None if fn is None else fn(layer)


def prunable_layer_types() -> tuple[str, ...]:
    """Names of the registered prunable layer classes (for messages)."""
    _register_hub_blocks()
    return tuple(cls.__name__ for cls, fn in _REGISTRY.items() if fn is not None)


# -- built-in layers ----------------------------------------------------------------------------


def _einsum_input_axis(equation: str, kernel_rank: int) -> int:
    try:
        lhs, out = equation.split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return 0
    contracted = [i for i, c in enumerate(ker) if c in inp and c not in out]
    if not contracted or len(ker) != kernel_rank:
        return 0
    return contracted[-1]


def _einsum_weights(layer: Any) -> list[PrunableWeight]:
    k = layer_kernel(layer)
    return [PrunableWeight("kernel", k, _einsum_input_axis(layer.equation, len(k.shape)))]


def _mha_weights(layer: Any) -> list[PrunableWeight]:
    out = []
    for part, sub in mha_projections(layer).items():
        k = layer_kernel(sub)
        out.append(
            PrunableWeight(f"{part}/kernel", k, _einsum_input_axis(sub.equation, len(k.shape)))
        )
    return out


def _hub_block_weights(block: Any) -> list[PrunableWeight]:
    """A keras-hub transformer block's weights: the Dense / EinsumDense kernels nested in it (its
    attention layers' query/key/value/output projections, the feed-forward intermediate and
    output Dense), named by their path below the block (`self_attention/query/kernel`)."""
    out, seen = [], set()
    dense = (keras.layers.Dense, keras.layers.EinsumDense)
    for sub in flatten_layers(block):
        if not isinstance(sub, dense):
            continue
        for w in prunable_weights(sub) or []:
            name = _relative_path(w.variable, block)
            if name in seen or "/" not in name:  # a path outside the block: the sublayer's name
                name = f"{sub.name}/{w.name}"
            seen.add(name)
            out.append(PrunableWeight(name, w.variable, w.input_axis))
    return out


#: keras-hub's transformer blocks that prune like one layer holding their Dense kernels.
HUB_BLOCKS = ("TransformerEncoder", "TransformerDecoder")
_hub_registered = False


def _register_hub_blocks() -> None:
    """Registers `HUB_BLOCKS` once keras_hub has been imported (by anyone); never imports it."""
    global _hub_registered
    if _hub_registered:
        return
    layers = getattr(sys.modules.get("keras_hub"), "layers", None)
    if layers is None:  # not imported (or still importing): no keras-hub layer exists yet
        return
    _hub_registered = True
    for name in HUB_BLOCKS:
        cls = getattr(layers, name, None)
        if isinstance(cls, type) and issubclass(cls, keras.layers.Layer):
            _REGISTRY.setdefault(cls, _hub_block_weights)  # a user's earlier registration wins


def _register_builtins() -> None:
    L = keras.layers
    register_prunable(L.Dense, lambda layer: [PrunableWeight("kernel", layer_kernel(layer), 0)])
    register_prunable(L.EinsumDense, _einsum_weights)
    register_prunable(
        L.Embedding,
        lambda layer: [PrunableWeight("embeddings", layer_embeddings(layer), 1)],
    )
    register_prunable(L.MultiHeadAttention, _mha_weights)
    for conv in (L.Conv1D, L.Conv2D, L.Conv3D):
        register_prunable(conv, lambda layer: [PrunableWeight("kernel", layer.kernel, -2)])
    for dw in (L.DepthwiseConv1D, L.DepthwiseConv2D):
        register_prunable(dw, lambda layer: [PrunableWeight("depthwise_kernel", layer.kernel, -2)])
    for sep in (L.SeparableConv1D, L.SeparableConv2D):
        register_prunable(
            sep,
            lambda layer: [
                PrunableWeight("depthwise_kernel", layer.depthwise_kernel, -2),
                PrunableWeight("pointwise_kernel", layer.pointwise_kernel, -2),
            ],
        )
    # Transposed convolutions are not pruned (their kernel's axes are swapped): if a Keras
    # release makes them subclasses of ConvND, they must stay out.
    for tc in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
        register_prunable(tc, None)


_register_builtins()
