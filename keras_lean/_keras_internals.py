"""The one boundary to private Keras and keras-hub attributes.

keras_lean needs a few things Keras does not expose publicly: the node graph of a functional
model, a tensor's producing layer, the plain kernel variable under a LoRA-enabled Dense, the
projections inside a MultiHeadAttention, ... Every such read lives here, as one small accessor per
need, each with a test in `tests/test_keras_internals.py`. When a Keras release renames one of
these attributes, this file and its test break, not the modules that use them (a test scans
every other module under `keras_lean/` and fails when one reads a private Keras attribute or
imports `keras.src`).

The suite runs on the Keras versions `pyproject.toml` allows (`keras>=3.8,<3.16`); raise that cap
only after the suite passed on the new release.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

__all__ = [
    "LayerCall",
    "call_has_training_arg",
    "einsum_output_shape",
    "flatten_layers",
    "functional_class",
    "functional_graph",
    "graph_inputs",
    "graph_outputs",
    "has_base_matrix",
    "hub_attention_sublayers",
    "inputs_struct",
    "is_graph_network",
    "keras_history",
    "layer_embeddings",
    "layer_kernel",
    "mha_projections",
    "model_calls",
    "nodes_by_depth",
    "outputs_struct",
    "own_trainable_variables",
    "own_variables",
    "replace_sublayer",
    "teacher_feature_extractor",
    "uses_gate",
]


# -- models as graphs ---------------------------------------------------------------------------


def functional_class() -> type:
    """Keras' `Functional` class: what `keras.Model(inputs, outputs)` builds."""
    from keras.src.models.functional import Functional

    return Functional


def is_graph_network(model: Any) -> bool:
    """Whether `model` is a graph of layers (a Sequential, or a functional model or subclass)."""
    return isinstance(model, keras.Sequential | functional_class())


def functional_graph(model: keras.Model) -> Any:
    """The functional model holding `model`'s graph: a Sequential's inner functional model (None
    when the Sequential is not built), `model` itself otherwise."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model


def nodes_by_depth(model: keras.Model) -> dict | None:
    """`{depth: [node, ...]}` of a built graph model (depth 0 = outputs); None for subclassed
    or unbuilt models."""
    fn = functional_graph(model)
    return None if fn is None else getattr(fn, "_nodes_by_depth", None)


@dataclasses.dataclass
class LayerCall:
    """One call of a layer (or a `keras.ops` operation) in a model's graph.

    Attributes:
        layer: the layer or operation called.
        node: Keras' node of the call (private type; use the methods below instead).
        inputs: the KerasTensors it was called on (flattened).
        outputs: the KerasTensors it returned (flattened).
    """

    layer: Any
    node: Any
    inputs: list
    outputs: list

    def arguments(self) -> tuple[list, dict]:
        """The call's positional and keyword arguments, as they were passed (tensors inside)."""
        return list(self.node.arguments.args), dict(self.node.arguments.kwargs)

    def fill_in(self, tensors: dict[int, Any]) -> tuple[list, dict]:
        """The call's arguments with each tensor replaced by `tensors[id(tensor)]`."""
        args, kwargs = self.node.arguments.fill_in(tensors)
        return list(args), dict(kwargs)


def model_calls(model: keras.Model, what: str = "This operation") -> list[LayerCall]:
    """The layer calls of a built Sequential or functional model, in execution order.

    The one walk of a model's graph that structured pruning, surgery, BatchNorm folding and the
    FLOP counter share. A nested model shows up as one call (of the nested model).

    Args:
        model: a built Keras 3 Sequential or functional model.
        what: the subject of the error message (`"count_flops"`, `"Structured pruning"`).

    Raises:
        ValueError: for a non-model, an unbuilt Sequential or a subclassed model.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a Keras 3 Sequential or functional model. Received: {type(model).__name__}"
        )
    if isinstance(model, keras.Sequential) and functional_graph(model) is None:
        raise ValueError(
            f"{what} needs a built model: the Sequential model {model.name!r} is not built. Start "
            "it with keras.Input(...) (or call build()) so the graph has known shapes."
        )
    by_depth = nodes_by_depth(model)
    if by_depth is None:
        raise ValueError(
            f"{what} needs a Sequential or functional model (a graph of layers). Received: a "
            f"subclassed model of type {type(model).__name__}; rebuild it with the functional API."
        )
    calls = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            calls.append(
                LayerCall(node.operation, node, list(node.input_tensors), list(node.outputs))
            )
    return calls


def graph_inputs(model: keras.Model) -> list:
    """The input KerasTensors of a built Sequential or functional model (flattened)."""
    return list(keras.tree.flatten(functional_graph(model).inputs))


def graph_outputs(model: keras.Model) -> list:
    """The output KerasTensors of a built Sequential or functional model (flattened)."""
    return list(keras.tree.flatten(functional_graph(model).outputs))


def inputs_struct(model: keras.Model) -> Any:
    """The inputs of a functional model in the structure it was built with (dict, list, ...)."""
    fn = functional_graph(model)
    return getattr(fn, "_inputs_struct", fn.inputs)


def outputs_struct(model: keras.Model) -> Any:
    """The outputs of a functional model in the structure it was built with (dict, list, ...)."""
    fn = functional_graph(model)
    return getattr(fn, "_outputs_struct", fn.outputs)


def keras_history(tensor: Any) -> tuple[Any, int, int] | None:
    """`(operation, node_index, tensor_index)` of the call that produced a KerasTensor, or None
    for a tensor that no layer produced."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    operation, node_index, tensor_index = history
    return operation, int(node_index), int(tensor_index)


# -- layers -------------------------------------------------------------------------------------


def flatten_layers(layer: Any, include_self: bool = False) -> list:
    """Every layer nested in `layer` at any depth (depth first, each once).

    Keras' own recursive walk (what `enable_lora` and saving use); there is no public one.
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=True))


def own_trainable_variables(layer: Any) -> list:
    """The trainable variables `layer` created itself (not those of its sublayers)."""
    return list(layer._trainable_variables)


def own_variables(layer: Any) -> list:
    """The variables `layer` created itself and saves (not those of its sublayers)."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def layer_kernel(layer: Any) -> Any:
    """The kernel *variable* of a Dense / EinsumDense (or any layer with a kernel).

    With LoRA enabled, `layer.kernel` is a tensor (`kernel + a @ b`); the variable under it is
    what pruning masks, SVD factorizes and LoRA freezes.
    """
    var = getattr(layer, "_kernel", None)
    return var if var is not None else layer.kernel


def layer_embeddings(layer: Any) -> Any:
    """The embeddings *variable* of an Embedding (LoRA-aware, like `layer_kernel`)."""
    var = getattr(layer, "_embeddings", None)
    return var if var is not None else layer.embeddings


def has_base_matrix(layer: Any) -> bool:
    """Whether `layer` keeps a kernel or embeddings variable LoRA can adapt."""
    return hasattr(layer, "_kernel") or hasattr(layer, "_embeddings")


def mha_projections(layer: Any) -> dict[str, Any]:
    """The EinsumDense sub-layers of a MultiHeadAttention: `query`, `key`, `value`, `output`
    (the output projection); each None until the layer is built."""
    return {
        "query": getattr(layer, "_query_dense", None),
        "key": getattr(layer, "_key_dense", None),
        "value": getattr(layer, "_value_dense", None),
        "output": getattr(layer, "_output_dense", None),
    }


def einsum_output_shape(layer: Any) -> Any:
    """The `output_shape` a MultiHeadAttention was configured with (its output projection's
    shape): None (the query's width), an int, or a tuple."""
    return layer._output_shape


def uses_gate(layer: Any) -> bool:
    """Whether a MultiHeadAttention has the gated output (`use_gate=True`, Keras >= 3.9)."""
    return bool(getattr(layer, "_use_gate", False))


def call_has_training_arg(layer: Any) -> bool:
    """Whether `layer.call` takes a `training` argument (Keras passes it only then)."""
    return bool(getattr(layer, "_call_has_training_arg", False))


# -- keras-hub transformer blocks ----------------------------------------------------------------

#: The attention sublayers of keras-hub's TransformerEncoder / TransformerDecoder, by the
#: attribute that holds them (keras-hub >= 0.20 names them so; the decoder's cross attention is
#: None without an encoder sequence).
_HUB_ATTENTION_ATTRS = ("_self_attention_layer", "_cross_attention_layer")


def hub_attention_sublayers(block: Any) -> dict[str, Any]:
    """The built MultiHeadAttention sublayers of a keras-hub transformer block, by attribute
    (`_self_attention_layer`, and `_cross_attention_layer` of a decoder that has one); empty
    until the block is built."""
    found = {}
    for attr in _HUB_ATTENTION_ATTRS:
        layer = getattr(block, attr, None)
        if layer is not None:
            found[attr] = layer
    return found


#: The attributes of the sublayers gradual structured pruning swaps for masked twins: a
#: MultiHeadAttention's output projection (its input carries the heads) and a keras-hub block's
#: feed-forward intermediate Dense (its output carries the feed-forward neurons).
MHA_OUTPUT_ATTR = "_output_dense"
HUB_FFN_INTERMEDIATE_ATTR = "_feedforward_intermediate_dense"


def replace_sublayer(owner: Any, attr: str, new: Any) -> None:
    """Sets `owner.<attr>` to the layer `new` in place of the layer it holds, so `owner.weights`,
    saving and training see only `new`, at the old layer's position among `owner`'s sublayers.

    Keras tracks a sublayer when it is assigned but never forgets the one it replaces.
    """
    old = getattr(owner, attr)
    tracker = owner._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        layers = owner._layers
        position = next((i for i, layer in enumerate(layers) if layer is old), len(layers))
        tracker.untrack(old)
        setattr(owner, attr, new)
        current = next(i for i, layer in enumerate(layers) if layer is new)
        layers.insert(position, layers.pop(current))
    finally:
        if locked:
            tracker.lock()


# -- keras.distillation ---------------------------------------------------------------------------


def teacher_feature_extractor(distiller: Any) -> Any:
    """The model a `keras.distillation.Distiller` runs for the teacher's intermediate features,
    or None (logits only). Keras 3.15 builds it before it freezes the teacher, and a model whose
    layers were rebuilt from configs holding `trainable: False` (a clone of a frozen teacher) can
    leave sublayers trainable in it, so the caller must freeze it too."""
    return getattr(distiller, "_teacher_feature_extractor", None)
