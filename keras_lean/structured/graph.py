"""Channel dependency graph: which channels of a Keras model must be removed together.

The idea is Torch-Pruning's DepGraph, done on the Keras functional graph by tracing *channel
identities* instead of layer pairs. Every tensor's last axis (its channels, features or embedding
width) is described by an integer array: the identity of the channel at each position.

- A producer (Dense, Conv, SeparableConv pointwise, Embedding, the heads of a MultiHeadAttention)
  creates fresh identities for its outputs: a *block*.
- Channel-preserving layers (activations, Dropout, pooling, BatchNormalization, ...) pass the array
  through; DepthwiseConv repeats each input identity `depth_multiplier` times; Flatten tiles it over
  the spatial positions (so channel c of a conv owns rows `p * C + c` of the next Dense);
  Concatenate on the channel axis concatenates the arrays (the channel ranges of each input).
- Element-wise merges (Add, Subtract, Multiply, Average, Maximum, Minimum) *unite* the identities
  position by position (union-find): the same channels go from every branch.
- Consumers record which identity sits on each input row of their kernels.

A *unit* is a union-find class of identities (one channel, removable as a whole); a *group* is a
set of units connected through unions (a residual stream, or one layer's outputs). Pruning removes
units; every weight axis that carries identities (kernel rows and columns, biases, BatchNorm and
LayerNorm vectors, depthwise kernels, attention heads) is sliced accordingly.

Model inputs and outputs, excluded layers, and every tensor that touches a layer the graph does not
know are *blocked*: their units are never removed, and `skipped` says which layer and why.

Some groups live entirely inside one layer: the feed-forward neurons of a keras-hub
`TransformerEncoder` (`inner`). They couple with nothing outside the layer; surgery rebuilds the
layer from its config with a smaller `intermediate_dim`. Its hidden width and heads stay (keras-hub
derives the attention key_dim from them), and gradual masks cannot reach inside a layer, so
`build_graph(..., inner_groups=False)` (what the gradual path uses) blocks these groups too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import keras
import numpy as np

from keras_lean._hub import FFN_INTERMEDIATE, FFN_OUTPUT, is_transformer_encoder

__all__ = ["ChannelGroup", "DependencyGraph", "SkippedLayer", "WeightSlice", "build_graph"]

L = keras.layers

# Layers whose output channels are their input channels, position by position.
_PASS_THROUGH = (
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.SpatialDropout3D,
    L.GaussianNoise,
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
_MERGE = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
_TRANSPOSE = (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose)
# Activations that mix channels: removing one channel changes the others.
_CROSS_CHANNEL_ACTIVATIONS = ("softmax", "log_softmax")


@dataclasses.dataclass(frozen=True)
class SkippedLayer:
    """A layer whose channels the graph leaves alone, and why.

    Attributes:
        name: layer name.
        reason: why the channels it touches are not pruned.
    """

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class WeightSlice:
    """One axis of one weight that carries channel identities.

    Attributes:
        layer: layer name.
        weight: weight path relative to the layer (`kernel`, `query/kernel`, ...).
        axis: the axis of the weight that is indexed by channel.
        ids: identity of each position along `axis` (length `shape[axis]`).
        kind: `kernel`, `bias`, `gamma`, `beta` or `stat` (moving statistics), which importance
            criteria read.
    """

    layer: str
    weight: str
    axis: int
    ids: np.ndarray
    kind: str


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together across several layers.

    Attributes:
        index: position in `DependencyGraph.groups`.
        units: root identity of each unit (each unit is one channel, or one head).
        prunable: per unit, whether it may be removed.
        layers: the layers whose weights this group slices.
        producers: the layers that create the group's channels (`name:role`).
        kind: `channels` or `heads`.
        reason: why (some) units are blocked, or "".
    """

    index: int
    units: tuple[int, ...]
    prunable: tuple[bool, ...]
    layers: tuple[str, ...]
    producers: tuple[str, ...]
    kind: str
    reason: str

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def is_prunable(self) -> bool:
        return any(self.prunable)


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def make(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclasses.dataclass
class _Call:
    layer: Any
    node: Any
    inputs: list  # KerasTensors
    outputs: list


def model_calls(model: keras.Model) -> list:
    """The layer calls of a built Sequential or functional model, in execution order.

    Raises:
        ValueError: for subclassed or unbuilt models.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a Keras 3 Sequential or functional model. Received: {type(model).__name__}"
        )
    fn = model
    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise ValueError(
                f"The Sequential model {model.name!r} is not built: start it with keras.Input(...) "
                "so the graph has known shapes."
            )
    by_depth = getattr(fn, "_nodes_by_depth", None)
    if by_depth is None:
        raise ValueError(
            "Structured pruning needs a Sequential or functional model (a graph of layers). "
            f"Received: a subclassed model of type {type(model).__name__}; rebuild it with the "
            "functional API."
        )
    calls = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            calls.append(_Call(node.operation, node, list(node.input_tensors), list(node.outputs)))
    return calls


def graph_inputs(model: keras.Model) -> list:
    return list(model._functional.inputs if isinstance(model, keras.Sequential) else model.inputs)


def graph_outputs(model: keras.Model) -> list:
    fn = model._functional if isinstance(model, keras.Sequential) else model
    return list(keras.tree.flatten(fn.outputs))


def _mha_args(node: Any) -> tuple:
    args = list(node.arguments.args)
    kwargs = node.arguments.kwargs
    query = args[0] if args else kwargs.get("query")
    value = args[1] if len(args) > 1 else kwargs.get("value")
    key = args[2] if len(args) > 2 else kwargs.get("key")
    return query, value, key if key is not None else value


class DependencyGraph:
    """Coupled channel groups of a built Keras model.

    Build it with `build_graph(model, exclude=...)`. Attributes after construction:

    Attributes:
        model: the analysed model.
        groups: tuple of `ChannelGroup`.
        skipped: tuple of `SkippedLayer`, the layers whose channels are left alone.
        slices: per layer name, the `WeightSlice`s of its weights.
        layer_ids: per layer name, `(input id arrays, output id array or None)` of its first call.
        heads: per MultiHeadAttention layer name, the id array of its heads.
        inner: per keras-hub TransformerEncoder name, the id array of its feed-forward neurons.
        reshape_mode: per supported Reshape layer, `flat` or `last` (how surgery rewrites it).
        roots: `roots[i]` is the unit (union-find root) of channel identity `i`.
        group_of_unit: unit root -> index of its group in `groups`.
    """

    def __init__(self, model: keras.Model, exclude: tuple = (), inner_groups: bool = True):
        self.model = model
        self._exclude = tuple(exclude)
        self._inner_groups = inner_groups
        self.inner: dict[str, np.ndarray] = {}
        self._uf = _UnionFind()
        self._blocked: dict[int, str] = {}
        self._block_owner: list[tuple[int, int, str]] = []  # (start, size, "layer:role")
        self._ids: dict[int, np.ndarray | None] = {}
        self.slices: dict[str, list[WeightSlice]] = {}
        self.layer_ids: dict[str, tuple[list, np.ndarray | None]] = {}
        self.heads: dict[str, np.ndarray] = {}
        self.reshape_mode: dict[str, str] = {}
        self._skipped: dict[str, str] = {}
        self._trace()
        self._finish()

    # -- tracing -----------------------------------------------------------------------------

    def _fresh(self, n: int, owner: str) -> np.ndarray:
        ids = self._uf.make(n)
        self._block_owner.append((int(ids[0]) if n else len(self._uf.parent), n, owner))
        return ids

    def _block(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is None:
            return
        for i in ids:
            self._blocked.setdefault(int(i), reason)

    def _skip(self, name: str, reason: str, ins: list, outputs: list) -> None:
        self._skipped.setdefault(name, reason)
        for ids in ins:
            self._block(ids, f"{name}: {reason}")
        for t in outputs:
            ids = self._fresh_for(t, f"{name}:out")
            self._block(ids, f"{name}: {reason}")
            self._ids[id(t)] = ids

    def _fresh_for(self, tensor: Any, owner: str) -> np.ndarray | None:
        shape = tuple(tensor.shape)
        if len(shape) < 2 or shape[-1] is None or "int" in str(tensor.dtype):
            return None
        return self._fresh(int(shape[-1]), owner)

    def _unite(self, arrays: list) -> np.ndarray | None:
        arrays = [a for a in arrays if a is not None]
        if not arrays:
            return None
        first = arrays[0]
        for a in arrays[1:]:
            for x, y in zip(first, a, strict=False):
                self._uf.union(x, y)
        return first

    def _add_slice(self, layer: Any, weight: str, axis: int, ids: np.ndarray, kind: str) -> None:
        self.slices.setdefault(layer.name, []).append(
            WeightSlice(layer.name, weight, axis, np.asarray(ids, dtype=np.int64), kind)
        )

    def _trace(self) -> None:
        model = self.model
        calls = model_calls(model)  # validates the model first
        for t in graph_inputs(model):
            ids = self._fresh_for(t, "input")
            self._block(ids, "model input")
            self._ids[id(t)] = ids
        for call in calls:
            self._visit(call)
        for t in graph_outputs(model):
            self._block(self._ids.get(id(t)), "model output")

    def _visit(self, call: _Call) -> None:
        layer = call.layer
        name = layer.name
        ins = [self._ids.get(id(t)) for t in call.inputs]
        if name in self.layer_ids:  # a shared layer: its weights tie every call together
            prev_in, prev_out = self.layer_ids[name]
            for a, b in zip(prev_in, ins, strict=False):
                self._unite([a, b])
            for t in call.outputs[:1]:
                self._ids[id(t)] = prev_out
            return
        excluded = any(fnmatch.fnmatchcase(name, p) for p in self._exclude)
        out = None
        if excluded:
            self._skip(name, "excluded by the caller", ins, call.outputs)
            out = self._ids.get(id(call.outputs[0])) if call.outputs else None
        elif isinstance(layer, keras.Model):
            self._skip(
                name,
                "nested model: its inputs and outputs keep their width (the graph does not look "
                "inside models used as layers; prune_structured inlines those called once, a "
                "model called several times shares its weights and stays whole)",
                ins,
                call.outputs,
            )
            out = self._ids.get(id(call.outputs[0]))
        elif not isinstance(layer, L.Layer):
            self._skip(name, f"operation {type(layer).__name__} is not a layer", ins, call.outputs)
            out = self._ids.get(id(call.outputs[0]))
        else:
            try:
                out = self._visit_layer(layer, call, ins)
            except _Unsupported as e:
                self._skip(name, str(e), ins, call.outputs)
                out = self._ids.get(id(call.outputs[0]))
            else:
                for t in call.outputs[:1]:
                    self._ids[id(t)] = out
                for t in call.outputs[1:]:
                    self._ids[id(t)] = None
        self.layer_ids[name] = (ins, out)

    def _visit_layer(self, layer: Any, call: _Call, ins: list) -> np.ndarray | None:
        x = ins[0] if ins else None
        in_shape = tuple(call.inputs[0].shape) if call.inputs else ()
        name = layer.name
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise _Unsupported("data_format='channels_first' is not supported")
        if isinstance(layer, L.MultiHeadAttention):
            return self._visit_mha(layer, call)
        if is_transformer_encoder(layer):
            return self._visit_hub_encoder(layer, x)
        if isinstance(layer, L.EinsumDense) or isinstance(layer, _TRANSPOSE):
            raise _Unsupported(f"{type(layer).__name__} is not supported by the dependency graph")
        if isinstance(layer, L.Dense):
            if getattr(layer, "lora_rank", None):
                raise _Unsupported("LoRA-enabled Dense layers are not supported")
            self._need(x, layer)
            out = self._fresh(layer.units, f"{name}:units")
            self._add_slice(layer, "kernel", 0, x, "kernel")
            self._add_slice(layer, "kernel", 1, out, "kernel")
            if layer.use_bias:
                self._add_slice(layer, "bias", 0, out, "bias")
            return out
        if isinstance(layer, _SEPARABLE):
            self._need(x, layer)
            m = layer.depth_multiplier
            out = self._fresh(layer.filters, f"{name}:filters")
            self._add_slice(layer, "depthwise_kernel", -2, x, "kernel")
            self._add_slice(layer, "pointwise_kernel", -2, np.repeat(x, m), "kernel")
            self._add_slice(layer, "pointwise_kernel", -1, out, "kernel")
            if layer.use_bias:
                self._add_slice(layer, "bias", 0, out, "bias")
            return out
        if isinstance(layer, _DEPTHWISE):
            self._need(x, layer)
            out = np.repeat(x, layer.depth_multiplier)
            self._add_slice(layer, "kernel", -2, x, "kernel")
            if layer.use_bias:
                self._add_slice(layer, "bias", 0, out, "bias")
            return out
        if isinstance(layer, _CONV):
            self._need(x, layer)
            if layer.groups != 1:
                raise _Unsupported(f"grouped convolution (groups={layer.groups}) is not supported")
            out = self._fresh(layer.filters, f"{name}:filters")
            self._add_slice(layer, "kernel", -2, x, "kernel")
            self._add_slice(layer, "kernel", -1, out, "kernel")
            if layer.use_bias:
                self._add_slice(layer, "bias", 0, out, "bias")
            return out
        if isinstance(layer, L.BatchNormalization):
            self._need(x, layer)
            if layer.axis not in (-1, len(in_shape) - 1):
                raise _Unsupported(f"BatchNormalization over axis {layer.axis} (not the channels)")
            for w in layer.weights:
                short = w.path.rsplit("/", 1)[-1]
                kind = short if short in ("gamma", "beta") else "stat"
                self._add_slice(layer, short, 0, x, kind)
            return x
        if isinstance(layer, L.LayerNormalization):
            self._need(x, layer)
            axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
            if [a % len(in_shape) for a in axes] != [len(in_shape) - 1]:
                raise _Unsupported(f"LayerNormalization over axes {layer.axis} (not the last)")
            for w in layer.weights:
                short = w.path.rsplit("/", 1)[-1]
                self._add_slice(layer, short, 0, x, short)
            return x
        if isinstance(layer, L.Embedding):
            out = self._fresh(layer.output_dim, f"{name}:output_dim")
            self._add_slice(layer, "embeddings", 1, out, "kernel")
            return out
        if isinstance(layer, L.Activation):
            act = getattr(layer.activation, "__name__", str(layer.activation))
            if act in _CROSS_CHANNEL_ACTIVATIONS:
                raise _Unsupported(f"activation {act!r} mixes channels")
            return x
        if isinstance(layer, L.Softmax):
            raise _Unsupported("Softmax mixes channels")
        if isinstance(layer, _PASS_THROUGH) or isinstance(layer, L.InputLayer):
            return x
        if isinstance(layer, _MERGE):
            lengths = {len(a) for a in ins if a is not None}
            if len(lengths) > 1 or any(a is None for a in ins):
                raise _Unsupported("merge of tensors with different channel counts (broadcast)")
            return self._unite(ins)
        if isinstance(layer, L.Concatenate):
            rank = len(in_shape)
            if any(a is None for a in ins):
                raise _Unsupported("concatenation of tensors without channels")
            if layer.axis in (-1, rank - 1):
                return np.concatenate(ins)
            return self._unite(ins)
        if isinstance(layer, L.Flatten):
            self._need(x, layer)
            spatial = in_shape[1:-1]
            if any(d is None for d in spatial):
                raise _Unsupported("Flatten of a tensor with unknown spatial size")
            return np.tile(x, math.prod(spatial))
        if isinstance(layer, L.Reshape):
            self._need(x, layer)
            return self._visit_reshape(layer, in_shape, x)
        raise _Unsupported(
            f"layer type {type(layer).__name__} is not known to the dependency graph"
        )

    def _need(self, x: Any, layer: Any) -> None:
        if x is None:
            raise _Unsupported(f"{type(layer).__name__} input has no channel axis the graph tracks")

    def _visit_reshape(self, layer: Any, in_shape: tuple, x: np.ndarray) -> np.ndarray:
        target = tuple(layer.target_shape)
        spatial = in_shape[1:-1]
        if any(d is None for d in spatial):
            raise _Unsupported("Reshape of a tensor with unknown spatial size")
        if len(target) == 1:
            self.reshape_mode[layer.name] = "flat"
            return np.tile(x, math.prod(spatial))
        known = [d for d in target[:-1] if d != -1]
        if target[-1] == len(x) and (-1 in target[:-1] or math.prod(known) == math.prod(spatial)):
            self.reshape_mode[layer.name] = "last"
            return x
        raise _Unsupported(
            f"Reshape to {target} moves channels off the last axis (only flattening or keeping "
            "the channel axis last is supported)"
        )

    def _visit_mha(self, layer: Any, call: _Call) -> np.ndarray | None:
        if getattr(layer, "_use_gate", False):
            raise _Unsupported("MultiHeadAttention with use_gate=True is not supported")
        q, v, k = (self._ids.get(id(t)) if t is not None else None for t in _mha_args(call.node))
        if q is None or v is None or k is None:
            raise _Unsupported("MultiHeadAttention input has no channel axis")
        name = layer.name
        heads = self._fresh(layer.num_heads, f"{name}:heads")
        self.heads[name] = heads
        for part, ids in (("query", q), ("key", k), ("value", v)):
            self._add_slice(layer, f"{part}/kernel", 0, ids, "kernel")
            self._add_slice(layer, f"{part}/kernel", 1, heads, "kernel")
            if layer.use_bias:
                self._add_slice(layer, f"{part}/bias", 0, heads, "bias")
        self._add_slice(layer, "attention_output/kernel", 0, heads, "kernel")
        out_shape = layer._output_shape
        if out_shape is None:
            out = q  # the output width is the query width: the same channels
        elif isinstance(out_shape, int) or len(tuple(out_shape)) == 1:
            width = out_shape if isinstance(out_shape, int) else tuple(out_shape)[0]
            out = self._fresh(int(width), f"{name}:output_shape")
        else:
            out = self._fresh(int(layer._output_dense.kernel.shape[-1]), f"{name}:out")
            self._block(out, f"{name}: multi-dimensional output_shape is not pruned")
            self._skipped.setdefault(name, "multi-dimensional output_shape: output width kept")
        self._add_slice(layer, "attention_output/kernel", -1, out, "kernel")
        if layer.use_bias:
            self._add_slice(layer, "attention_output/bias", 0, out, "bias")
        return out

    def _visit_hub_encoder(self, layer: Any, x: np.ndarray | None) -> np.ndarray | None:
        self._need(x, layer)
        name = layer.name
        kept = "hidden width and heads kept (keras-hub derives key_dim = hidden_dim // num_heads)"
        self._block(x, f"{name}: {kept}")
        inner = self._fresh(int(layer.intermediate_dim), f"{name}:intermediate")
        self.inner[name] = inner
        self._add_slice(layer, f"{FFN_INTERMEDIATE}/kernel", 1, inner, "kernel")
        self._add_slice(layer, f"{FFN_INTERMEDIATE}/bias", 0, inner, "bias")
        self._add_slice(layer, f"{FFN_OUTPUT}/kernel", 0, inner, "kernel")
        if self._inner_groups:
            self._skipped.setdefault(name, f"{kept}; feed-forward neurons are pruned")
        else:
            reason = (
                "feed-forward neurons inside a keras-hub TransformerEncoder are pruned one-shot "
                "only (prune_structured): gradual masks cannot reach inside the layer"
            )
            self._block(inner, f"{name}: {reason}")
            self._skipped.setdefault(name, f"{kept}; {reason}")
        return x  # residual: the output carries the input's channels

    # -- groups ------------------------------------------------------------------------------

    def _finish(self) -> None:
        uf = self._uf
        n = len(uf.parent)
        self.roots = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
        blocked_roots: dict[int, str] = {}
        for i, reason in self._blocked.items():
            blocked_roots.setdefault(int(self.roots[i]), reason)
        # Blocks connected through shared roots form one group.
        owners = [(s, size, owner) for s, size, owner in self._block_owner if size > 0]
        block_uf = _UnionFind()
        block_uf.make(len(owners))
        first_block_of_root: dict[int, int] = {}
        for b, (s, size, _) in enumerate(owners):
            for r in np.unique(self.roots[s : s + size]):
                r = int(r)
                if r in first_block_of_root:
                    block_uf.union(first_block_of_root[r], b)
                else:
                    first_block_of_root[r] = b
        members: dict[int, list[int]] = {}
        for b in range(len(owners)):
            members.setdefault(block_uf.find(b), []).append(b)
        root_layers: dict[int, set[str]] = {}
        for name, sl in self.slices.items():
            for s in sl:
                for r in np.unique(self.roots[s.ids]):
                    root_layers.setdefault(int(r), set()).add(name)
        head_roots = {int(self.roots[h[0]]) for h in self.heads.values() if len(h)}
        groups = []
        for bs in members.values():
            units: list[int] = []
            for b in bs:
                s, size, _ = owners[b]
                units.extend(int(r) for r in self.roots[s : s + size])
            units = list(dict.fromkeys(units))
            layers = sorted(set().union(*(root_layers.get(u, set()) for u in units)))
            if not layers:
                continue  # nothing to slice (e.g. a model input feeding only excluded layers)
            producers = tuple(owners[b][2] for b in bs)
            prunable = tuple(u not in blocked_roots for u in units)
            reasons = sorted({blocked_roots[u] for u in units if u in blocked_roots})
            kind = "heads" if units[0] in head_roots else "channels"
            groups.append(
                ChannelGroup(
                    index=len(groups),
                    units=tuple(units),
                    prunable=prunable,
                    layers=tuple(layers),
                    producers=producers,
                    kind=kind,
                    reason="; ".join(reasons),
                )
            )
        self.groups = tuple(groups)
        self.skipped = tuple(SkippedLayer(k, v) for k, v in self._skipped.items())
        self.group_of_unit = {u: g.index for g in self.groups for u in g.units}

    def keep_mask(self, ids: np.ndarray | None, pruned: set | frozenset) -> np.ndarray | None:
        """Boolean keep mask over the positions of an id array, given the pruned unit roots."""
        if ids is None:
            return None
        if not pruned:
            return np.ones(len(ids), dtype=bool)
        return ~np.isin(self.roots[ids], np.fromiter(pruned, dtype=np.int64))


class _Unsupported(Exception):
    """Raised inside the tracer for a layer whose channels cannot be followed."""


def build_graph(
    model: keras.Model, exclude: tuple | list | str = (), *, inner_groups: bool = True
) -> DependencyGraph:
    """Builds the channel dependency graph of a built Sequential or functional model.

    Args:
        model: a built Keras 3 model.
        exclude: layer name patterns (fnmatch, e.g. `"head*"`) whose widths are kept.
        inner_groups: whether groups inside one layer (a keras-hub TransformerEncoder's
            feed-forward neurons) may be pruned; False blocks them (gradual masking).

    Returns:
        A `DependencyGraph` with `.groups` (coupled channels) and `.skipped` (layers left alone,
        with the reason).

    Raises:
        ValueError: if `model` is not a built Sequential or functional Keras 3 model.

    Example:

    >>> graph = build_graph(model, exclude=("classifier",))
    >>> [g.producers for g in graph.groups if g.is_prunable]
    """
    if isinstance(exclude, str):
        exclude = (exclude,)
    return DependencyGraph(model, tuple(exclude), inner_groups)
