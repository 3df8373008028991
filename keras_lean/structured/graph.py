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

The graph itself knows no layer type: each layer's `ChannelRule` (`rules.py`, looked up by class,
built-ins and user layers alike) says how its call moves identities and which weight axes carry
them, through a `CallContext`.

A *unit* is a union-find class of identities (one channel, removable as a whole); a *group* is a
set of units connected through unions (a residual stream, or one layer's outputs). Pruning removes
units; every weight axis that carries identities (kernel rows and columns, biases, BatchNorm and
LayerNorm vectors, depthwise kernels, attention heads) is sliced accordingly.

Model inputs and outputs, excluded layers, and every tensor that touches a layer the graph does not
know are *blocked*: their units are never removed, and `skipped` says which layer and why.

Some groups live entirely inside one layer: the feed-forward neurons (`inner`) and the attention
heads (`heads`) of a keras-hub `TransformerEncoder` / `TransformerDecoder`. They couple with
nothing outside the layer; surgery rebuilds the layer from its config with a smaller
`intermediate_dim` and, when heads go, as `hub_layers.Pruned*` with fewer `num_heads` of the same
`head_dim` (keras-hub alone would derive key_dim = hidden_dim // num_heads). Its hidden width
stays. Gradual pruning masks these groups inside the block (`hub_layers.MaskedTransformer*`);
`build_graph(..., inner_groups=False)` blocks them instead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import keras
import numpy as np

from keras_lean._keras_internals import LayerCall, graph_inputs, graph_outputs, model_calls
from keras_lean.structured.rules import UnsupportedLayer, get_channel_rule

__all__ = [
    "CallContext",
    "ChannelGroup",
    "DependencyGraph",
    "SkippedLayer",
    "WeightSlice",
    "build_graph",
    "graph_inputs",
    "graph_outputs",
    "model_calls",
]


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


class DependencyGraph:
    """Coupled channel groups of a built Keras model.

    Build it with `build_graph(model, exclude=...)`. Attributes after construction:

    Attributes:
        model: the analysed model.
        groups: tuple of `ChannelGroup`.
        skipped: tuple of `SkippedLayer`, the layers whose channels are left alone.
        slices: per layer name, the `WeightSlice`s of its weights.
        layer_ids: per layer name, `(input id arrays, output id array or None)` of its first call.
        heads: per MultiHeadAttention layer (or keras-hub transformer block) name, the id array
            of its heads.
        inner: per keras-hub transformer block name, the id array of its feed-forward neurons.
        reshape_mode: per supported Reshape layer, `flat` or `last` (how surgery rewrites it).
        rules: per traced layer name, the `ChannelRule` that traced it (surgery resizes with it).
        layer_info: per traced layer name, what its rule `remember`ed (and `heads` / `inner`).
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
        self.rules: dict[str, Any] = {}
        self.layer_info: dict[str, dict] = {}
        self._skipped: dict[str, str] = {}
        self._trace()
        self._finish()

    @property
    def reshape_mode(self) -> dict[str, str]:
        return {
            name: info["reshape_mode"]
            for name, info in self.layer_info.items()
            if "reshape_mode" in info
        }

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
        calls = model_calls(model, "Structured pruning")  # validates the model first
        for t in graph_inputs(model):
            ids = self._fresh_for(t, "input")
            self._block(ids, "model input")
            self._ids[id(t)] = ids
        for call in calls:
            self._visit(call)
        for t in graph_outputs(model):
            self._block(self._ids.get(id(t)), "model output")

    def _visit(self, call: LayerCall) -> None:
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
        elif not isinstance(layer, keras.layers.Layer):
            self._skip(name, f"operation {type(layer).__name__} is not a layer", ins, call.outputs)
            out = self._ids.get(id(call.outputs[0]))
        else:
            try:
                out = self._visit_layer(layer, call, ins)
            except UnsupportedLayer as e:
                self._skip(name, str(e), ins, call.outputs)
                out = self._ids.get(id(call.outputs[0]))
            else:
                for t in call.outputs[:1]:
                    self._ids[id(t)] = out
                for t in call.outputs[1:]:
                    self._ids[id(t)] = None
        self.layer_ids[name] = (ins, out)

    def _visit_layer(self, layer: Any, call: LayerCall, ins: list) -> np.ndarray | None:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise UnsupportedLayer("data_format='channels_first' is not supported")
        rule = get_channel_rule(layer)
        if rule is None:
            raise UnsupportedLayer(
                f"layer type {type(layer).__name__} is not known to the dependency graph"
            )
        ctx = CallContext(self, layer, call, ins)
        out = rule.trace(layer, ctx)
        ctx._commit()
        self.rules[layer.name] = rule
        return out

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


class CallContext:
    """What a `ChannelRule` sees while tracing one layer call (see `rules.py` for the API).

    Everything the rule records is kept only when `trace` returns: a rule that raises
    `UnsupportedLayer` halfway leaves the graph as it was (apart from unused fresh identities).
    """

    def __init__(self, graph: DependencyGraph, layer: Any, call: LayerCall, ins: list):
        self._graph = graph
        self._layer = layer
        self._call = call
        self.inputs: list = list(ins)
        self.inner_groups: bool = graph._inner_groups
        self._slices: list[tuple] = []
        self._unions: list[list] = []
        self._blocks: list[tuple] = []
        self._notes: list[str] = []
        self._info: dict[str, Any] = {}

    @property
    def x(self) -> np.ndarray | None:
        """The identities of the first input's channels (None without a channel axis)."""
        return self.inputs[0] if self.inputs else None

    def input_shape(self, index: int = 0) -> tuple:
        """The static shape of input tensor `index` (batch axis included)."""
        inputs = self._call.inputs
        return tuple(inputs[index].shape) if index < len(inputs) else ()

    def need_input(self) -> np.ndarray:
        """`x`, or `UnsupportedLayer` when the first input has no tracked channel axis."""
        if self.x is None:
            raise UnsupportedLayer(
                f"{type(self._layer).__name__} input has no channel axis the graph tracks"
            )
        return self.x

    def argument(self, index: int, name: str) -> Any:
        """The tensor passed as positional argument `index` or keyword `name`, or None."""
        args, kwargs = self._call.arguments()
        return args[index] if len(args) > index else kwargs.get(name)

    def ids_of(self, tensor: Any) -> np.ndarray | None:
        """The identities of a tensor's channels (None for None or an untracked tensor)."""
        return None if tensor is None else self._graph._ids.get(id(tensor))

    def produce(self, n: int, role: str, *, heads: bool = False, inner: bool = False):
        """`n` new channel identities owned by this layer (`"<layer>:<role>"` in reports).

        `heads=True`: they are attention heads (the group's kind is `heads`); `inner=True`: a
        group inside the layer (blocked when the graph is built with `inner_groups=False`).
        """
        ids = self._graph._fresh(int(n), f"{self._layer.name}:{role}")
        if heads:
            self._info["heads"] = ids
        if inner:
            self._info["inner"] = ids
        return ids

    def slice(self, weight: str, axis: int, ids: np.ndarray, kind: str = "kernel") -> None:
        """Axis `axis` of the layer's weight `weight` carries the identities `ids`."""
        self._slices.append((weight, axis, ids, kind))

    def unite(self, arrays: list) -> np.ndarray | None:
        """The arrays carry the same channels, position by position; returns the first."""
        self._unions.append(list(arrays))
        present = [a for a in arrays if a is not None]
        return present[0] if present else None

    def block(self, ids: np.ndarray | None, reason: str) -> None:
        """These channels are never removed (`reason` says why in the group)."""
        self._blocks.append((ids, reason))

    def note(self, reason: str) -> None:
        """Lists the layer in `skipped` with `reason` without blocking its channels."""
        self._notes.append(reason)

    def remember(self, key: str, value: Any) -> None:
        """Keeps `value` for the rule's `resize` (as `ctx.info[key]`)."""
        self._info[key] = value

    def _commit(self) -> None:
        graph, layer = self._graph, self._layer
        for weight, axis, ids, kind in self._slices:
            graph._add_slice(layer, weight, axis, ids, kind)
        for arrays in self._unions:
            graph._unite(arrays)
        for ids, reason in self._blocks:
            graph._block(ids, reason)
        for reason in self._notes:
            graph._skipped.setdefault(layer.name, reason)
        if "heads" in self._info:
            graph.heads[layer.name] = self._info["heads"]
        if "inner" in self._info:
            graph.inner[layer.name] = self._info["inner"]
        graph.layer_info[layer.name] = dict(self._info)


def build_graph(
    model: keras.Model, exclude: tuple | list | str = (), *, inner_groups: bool = True
) -> DependencyGraph:
    """Builds the channel dependency graph of a built Sequential or functional model.

    Args:
        model: a built Keras 3 model.
        exclude: layer name patterns (fnmatch, e.g. `"head*"`) whose widths are kept.
        inner_groups: whether groups inside one layer (a keras-hub transformer block's heads and
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
