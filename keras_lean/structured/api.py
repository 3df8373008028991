"""Model-level API: one-shot and gradual structured pruning, shrink, and the structure report."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import keras
import numpy as np

from keras_lean.flops import count_flops
from keras_lean.structured.graph import DependencyGraph, build_graph, model_calls
from keras_lean.structured.hardware import resolve_round_to
from keras_lean.structured.importance import IMPORTANCE_CRITERIA, unit_scores
from keras_lean.structured.masks import (
    ChannelMask,
    MaskedBlock,
    MaskedLayerNormalization,
    MaskedMultiHeadAttention,
    keep_count,
)
from keras_lean.structured.rules import get_channel_rule
from keras_lean.structured.surgery import (
    clone_layer,
    flatten_model,
    has_nested_models,
    rebuild,
    replay,
    width_of,
)

__all__ = [
    "LayerStructure",
    "StructureReport",
    "prune_structured",
    "prune_structured_gradually",
    "resolve_importance",
    "select_units",
    "shrink",
    "structure_report",
]

L = keras.layers


def _check_args(ratio, importance, round_to, min_channels, name="ratio"):
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ValueError(f"{name} must be a float in [0, 1). Received: {name}={ratio!r}")
    if importance not in IMPORTANCE_CRITERIA and importance != "auto":
        raise ValueError(
            f"importance must be one of auto, {', '.join(IMPORTANCE_CRITERIA)}. "
            f"Received: importance={importance!r}"
        )
    resolve_round_to(round_to)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(
            f"min_channels must be an integer >= 1. Received: min_channels={min_channels!r}"
        )


def _check_model(model):
    if not isinstance(model, keras.Model):
        hint = (
            " It looks like a tf_keras (legacy Keras 2) model: rebuild or load it with Keras 3."
            if type(model).__module__.startswith("tf_keras")
            else ""
        )
        raise ValueError(
            f"Expected a Keras 3 Sequential or functional model. Received: {type(model).__name__}"
            + hint
        )


def resolve_importance(importance: str, graph: DependencyGraph, data: Any, loss: Any) -> str:
    """The criterion `importance="auto"` stands for: `"taylor"` when `data` is given, a loss is
    known (`loss=` or the compiled one) and the model has attention heads (a MultiHeadAttention
    or a keras-hub transformer block), else `"l1"`. Any other value is returned as it is.

    Measured on all-MiniLM-L6-v2 (scripts/bench_lora_minilm.py): at 50 % of heads and
    feed-forward neurons, weight norms (l1) lose several accuracy points that Taylor keeps.
    """
    if importance != "auto":
        return importance
    has_loss = loss is not None or getattr(graph.model, "loss", None) is not None
    has_heads = any(g.kind == "heads" for g in graph.groups)
    return "taylor" if data is not None and has_loss and has_heads else "l1"


def _limits(group, round_to: int, min_channels: int) -> tuple[int, int]:
    return (1, 1) if group.kind == "heads" else (round_to, min_channels)


def _ranked(group, scores: dict) -> list[int]:
    """The group's units, most important first; blocked units rank before all others."""
    prunable = dict(zip(group.units, group.prunable, strict=False))
    return sorted(group.units, key=lambda u: (prunable[u], -scores.get(u, 0.0), u))


def select_units(
    graph: DependencyGraph,
    scores: dict,
    ratio: float,
    *,
    round_to: int | str = 1,
    min_channels: int = 1,
    global_ranking: bool = False,
) -> frozenset:
    """Chooses the units to remove.

    Args:
        graph: the dependency graph.
        scores: unit root -> importance (higher is kept).
        ratio: fraction of each group's units to remove (per layer), or of all prunable units
            (global ranking).
        round_to: surviving units per channel group are a multiple of this (or `"auto"`).
        min_channels: at least this many units survive per group (heads: at least 1).
        global_ranking: rank all groups' units together instead of per group.

    Returns:
        The root ids of the units to remove.
    """
    round_to = resolve_round_to(round_to)
    pruned: set[int] = set()
    groups = [g for g in graph.groups if g.is_prunable]
    if not global_ranking:
        for g in groups:
            r, m = _limits(g, round_to, min_channels)
            keep = keep_count(g.size, ratio, r, m)
            ranked = _ranked(g, scores)
            ok = set(u for u, p in zip(g.units, g.prunable, strict=False) if p)
            pruned.update(u for u in ranked[keep:] if u in ok)
        return frozenset(pruned)
    total = sum(g.size for g in groups)
    target = int(math.floor(total * ratio + 1e-4))
    candidates = sorted(
        (
            (scores.get(u, 0.0), u, g)
            for g in groups
            for u, p in zip(g.units, g.prunable, strict=False)
            if p
        ),
        key=lambda t: (t[0], t[1]),
    )
    count: dict[int, int] = {}
    for _, u, g in candidates:
        if len(pruned) >= target:
            break
        _, m = _limits(g, round_to, min_channels)
        if g.size - count.get(g.index, 0) - 1 < min(m, g.size):
            continue
        pruned.add(u)
        count[g.index] = count.get(g.index, 0) + 1
    for g in groups:  # round each group's survivors up to a multiple of round_to
        r, _ = _limits(g, round_to, min_channels)
        gone = [u for u in _ranked(g, scores) if u in pruned]
        keep = g.size - len(gone)
        extra = min(-(-keep // r) * r, g.size) - keep
        for u in gone[:extra]:  # the most important of the removed ones come back
            pruned.discard(u)
    return frozenset(pruned)


def prune_structured(
    model: keras.Model,
    ratio: float,
    importance: str = "auto",
    *,
    data: Any = None,
    loss: Any = None,
    round_to: int | str = 1,
    min_channels: int = 1,
    exclude: tuple | list | str = (),
    global_ranking: bool = False,
    batch_size: int = 32,
    taylor_batches: int = 4,
) -> keras.Model:
    """Removes whole channels, neurons and heads, returning a new, smaller model.

    Args:
        model: a built Keras 3 Sequential or functional model (not changed).
        ratio: fraction of units to remove, in [0, 1): per group (each layer, or each set of
            coupled layers, loses this fraction), or overall with `global_ranking=True`.
        importance: `"auto"` (default: `"taylor"` for a model with attention heads when `data`
            and a loss are given, else `"l1"`; see `resolve_importance`), `"l1"`, `"l2"`,
            `"bn_gamma"` or `"taylor"` (see `importance.py`).
        data: `(x, y)` or an iterable of `(x, y)` batches, for `"taylor"` (and `"auto"`).
        loss: the loss for `"taylor"` (default: the model's compiled loss).
        round_to: surviving widths are multiples of this (e.g. 8), capped at the original width;
            `"auto"`: this CPU's float32 vector lanes (`hardware.simd_lanes`, 16 with AVX-512),
            which is what makes the removed FLOPs show up as speed.
        min_channels: minimum surviving width of every group (attention keeps >= 1 head).
        exclude: layer name patterns (fnmatch) whose widths are kept.
        global_ranking: rank units of all groups together (widths then differ per layer).
        batch_size: batch size for `"taylor"` with array data.
        taylor_batches: batches the Taylor scores average over.

    Returns:
        A new Keras model (Sequential if `model` is) with the surviving weights copied. At
        `ratio=0` its outputs equal `model`'s. Nested models called once (a backbone used as a
        layer, a keras-hub task's backbone) are inlined first (`surgery.flatten_model`), so the
        result is then one flat functional model.

    Raises:
        ValueError: for a bad argument, a model type that is not supported, or `"taylor"`
            without data or loss.

    Example:

    >>> small = prune_structured(model, 0.5, "l1", round_to=8, exclude=("logits",))
    >>> structure_report(model, small).flops_ratio
    """
    _check_model(model)
    round_to = resolve_round_to(round_to)
    _check_args(ratio, importance, round_to, min_channels)
    parent, model = model, _flat(model)
    graph = build_graph(model, exclude)
    _warn_if_nothing_prunable(graph, ratio)
    scores = unit_scores(
        graph,
        resolve_importance(importance, graph, data, loss),
        data=data,
        loss=loss,
        batch_size=batch_size,
        taylor_batches=taylor_batches,
    )
    pruned = select_units(
        graph,
        scores,
        ratio,
        round_to=round_to,
        min_channels=min_channels,
        global_ranking=global_ranking,
    )
    return rebuild(model, graph, pruned, parent=parent)


def _flat(model: keras.Model) -> keras.Model:
    """`model`, with nested models that are called once inlined (a copy) when it has any."""
    return flatten_model(model)[0] if has_nested_models(model) else model


def _warn_if_nothing_prunable(graph: DependencyGraph, ratio: float = 1.0) -> None:
    """Warns when no unit of `graph` may be removed, so a no-op is never silent."""
    if ratio == 0 or any(any(g.prunable) for g in graph.groups):
        return
    skipped = "; ".join(f"{s.name}: {s.reason}" for s in graph.skipped[:6])
    more = f" (+{len(graph.skipped) - 6} more)" if len(graph.skipped) > 6 else ""
    warnings.warn(
        f"Structured pruning of {graph.model.name!r} removes nothing: none of its channel groups "
        f"can be pruned. Skipped layers: {skipped or 'none'}{more}.",
        stacklevel=3,
    )


# -- gradual -----------------------------------------------------------------------------------


def _final_sparsity(schedule: Any) -> float:
    _, sparsity = schedule(2**30)  # int32-safe: JAX without x64 has no int64
    return float(keras.ops.convert_to_numpy(sparsity))


def _copy_weights(old: Any, new: Any) -> None:
    """Copies weights between a layer and its (masked or plain) twin, matched by path."""
    if isinstance(old, keras.Model):
        new.set_weights(old.get_weights())
        return
    if not isinstance(old, keras.layers.Layer):
        return  # a stateless operation, reused as is

    def rel(layer, w):  # the path inside the layer (Sequential prefixes the model's name)
        return w.path.split(f"{layer.name}/", 1)[-1]

    by_path = {rel(new, w): w for w in new.weights}
    for w in old.weights:
        path = rel(old, w)
        if path in by_path:
            by_path[path].assign(keras.ops.convert_to_numpy(w))
        elif path.rsplit("/", 1)[-1] not in ("mask", "pruning_step"):
            raise ValueError(f"Layer {new.name!r} has no weight matching {w.path!r}.")


def _needs_mask(layer: Any) -> bool:
    """Whether a masked (zero) channel could become non-zero through `layer` (its rule says)."""
    rule = get_channel_rule(layer)
    return rule is None or not rule.zero_preserving(layer)


def _group_scales(graph, scores, schedule, round_to, min_channels, global_ranking) -> dict:
    """Per group: its factor on the schedule's sparsity (1.0 each unless `global_ranking`).

    With a global ranking, a group's factor is the share of its units the final global selection
    removes, over the final sparsity, so every group reaches its own final share on schedule.
    """
    group_scale = {g.index: 1.0 for g in graph.groups}
    s_final = _final_sparsity(schedule)
    if global_ranking and s_final > 0:
        chosen = select_units(
            graph,
            scores,
            s_final,
            round_to=round_to,
            min_channels=min_channels,
            global_ranking=True,
        )
        for g in graph.groups:
            share = sum(u in chosen for u in g.units) / g.size
            group_scale[g.index] = share / s_final
    return group_scale


def _unit_ranks(graph, scores, schedule, round_to, min_channels, global_ranking) -> tuple:
    """Per unit: its rank in its group, the group size, and its factor on the schedule."""
    rank: dict[int, int] = {}
    size: dict[int, int] = {}
    scale: dict[int, float] = {}
    group_scale = _group_scales(graph, scores, schedule, round_to, min_channels, global_ranking)
    for g in graph.groups:
        for r, u in enumerate(_ranked(g, scores)):
            rank[u], size[u] = r, g.size
            scale[u] = group_scale[g.index] if g.is_prunable else 0.0
    return rank, size, scale


class GradualContext:
    """What `ChannelRule.masked_variant` sees when the gradual model is built.

    Attributes:
        inputs: the identity arrays of the layer's inputs; `output`: of its output.
        info: what the rule `remember`ed while tracing (and `heads` / `inner`).
        sliced: whether the rule recorded weight slices for the layer.
    """

    def __init__(self, graph, layer, prunable_roots, mask_args, limits):
        self._graph, self._prunable, self._mask_args = graph, prunable_roots, mask_args
        self._limits = limits
        self.inputs, self.output = graph.layer_ids.get(layer.name, ([], None))
        self.info = graph.layer_info.get(layer.name, {})
        self.sliced = layer.name in graph.slices

    def prunable(self, ids) -> bool:
        """Whether any position of `ids` belongs to a unit that may be masked."""
        return ids is not None and any(int(u) in self._prunable for u in self._graph.roots[ids])

    def mask_args(self, ids, heads: bool = False) -> dict:
        """The mask arguments (`ranks`, `sizes`, `scales`, schedule, limits) over `ids`, for a
        `ChannelMask`-style layer; `heads=True`: at least one head survives, no rounding."""
        return self._mask_args(ids, (1, 1) if heads else self._limits)


def prune_structured_gradually(
    model: keras.Model,
    pruning_schedule: Any,
    importance: str = "l1",
    *,
    data: Any = None,
    loss: Any = None,
    round_to: int | str = 1,
    min_channels: int = 1,
    exclude: tuple | list | str = (),
    global_ranking: bool = False,
    batch_size: int = 32,
    taylor_batches: int = 4,
) -> keras.Model:
    """Returns a copy of `model` whose channel groups are masked step by step during `fit`.

    Units are ranked once (by `importance` on the current weights); at every pruning step of
    `pruning_schedule` each group keeps its `keep_count(size, sparsity)` best units and masks the
    rest to exact zeros, coupled channels in lockstep. The schedule's sparsity is the fraction of
    channels removed per group (or overall, with `global_ranking`). The masks live in the model
    (plain `model.fit`, `jit_compile=True` works, saves to `.keras` and loads without
    `custom_objects`). `shrink` turns the result into the small plain model.

    Args:
        model: a built Keras 3 Sequential or functional model (not changed).
        pruning_schedule: a keras_lean schedule, a TFMOT `PruningSchedule`, or a schedule dict
            (anything `keras_lean.sparsity.schedules.as_schedule` accepts).
        importance, data, loss, round_to, min_channels, exclude, global_ranking, batch_size,
            taylor_batches: as for `prune_structured`.

    Returns:
        A new Keras model with `ChannelMask` layers (and `MaskedMultiHeadAttention` for attention,
        `hub_layers.MaskedTransformerEncoder` / `...Decoder` masking whole heads and feed-forward
        neurons of keras-hub transformer blocks), weights copied, not compiled.

    Raises:
        ValueError: for a bad argument or a model type that is not supported.

    Example:

    >>> schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=500, frequency=50)
    >>> masked = prune_structured_gradually(model, schedule, "l1")
    >>> masked.compile("adam", "sparse_categorical_crossentropy"); masked.fit(x, y, epochs=3)
    >>> small = shrink(masked)
    """
    from keras_lean.sparsity.schedules import as_schedule

    _check_model(model)
    round_to = resolve_round_to(round_to)
    _check_args(0.0, importance, round_to, min_channels)
    schedule = as_schedule(pruning_schedule)
    model = _flat(model)
    graph = build_graph(model, exclude)
    _warn_if_nothing_prunable(graph)
    scores = unit_scores(
        graph,
        resolve_importance(importance, graph, data, loss),
        data=data,
        loss=loss,
        batch_size=batch_size,
        taylor_batches=taylor_batches,
    )
    rank, size, scale = _unit_ranks(graph, scores, schedule, round_to, min_channels, global_ranking)

    def mask_args(ids, limits):
        roots = graph.roots[ids]
        return dict(
            ranks=[rank[int(u)] for u in roots],
            sizes=[size[int(u)] for u in roots],
            scales=[scale[int(u)] for u in roots],
            pruning_schedule=schedule,
            round_to=limits[0],
            min_channels=limits[1],
        )

    prunable_roots = {u for g in graph.groups if g.is_prunable for u in g.units}
    old_layers: dict[str, Any] = {}
    calls_seen: dict[str, int] = {}

    def make(layer):
        old_layers[layer.name] = layer
        rule = graph.rules.get(layer.name)
        if rule is not None:  # a layer that masks units inside itself (attention heads, ...)
            ctx = GradualContext(graph, layer, prunable_roots, mask_args, (round_to, min_channels))
            masked = rule.masked_variant(layer, ctx)
            if masked is not None:
                return masked
        return clone_layer(layer)

    def after(layer):
        _, out = graph.layer_ids.get(layer.name, ([], None))
        if out is None or not _needs_mask(layer):
            return None
        if not any(int(u) in prunable_roots for u in graph.roots[out]):
            return None
        n = calls_seen[layer.name] = calls_seen.get(layer.name, 0) + 1
        suffix = "" if n == 1 else f"_{n}"
        return ChannelMask(
            **mask_args(out, (round_to, min_channels)), name=f"{layer.name}_mask{suffix}"
        )

    masked, new_layers = replay(model, make, after)
    for name, new in new_layers.items():
        _copy_weights(old_layers[name], new)
    return masked


def shrink(model: keras.Model) -> keras.Model:
    """Physically removes the channels and heads the gradual masks switched off.

    Args:
        model: a model from `prune_structured_gradually` (after or during fine-tuning), or any
            plain model (then it is copied unchanged).

    Returns:
        A new plain Keras model with no keras_lean mask layers, narrower where masks were zero;
        its outputs equal the masked model's (up to float rounding).

    Raises:
        ValueError: if the masks disagree about a unit (a model edited by hand).
    """
    _check_model(model)
    produced_by: dict[int, str] = {}
    channel_masks: list[tuple[str, np.ndarray]] = []
    head_masks: dict[str, np.ndarray] = {}
    norm_masks: dict[str, np.ndarray] = {}
    block_masks: dict[str, dict] = {}
    for call in model_calls(model):
        layer = call.layer
        if isinstance(layer, ChannelMask):
            source = produced_by.get(id(call.inputs[0]))
            channel_masks.append((source, np.asarray(layer.mask.numpy())))
            for t in call.outputs:
                produced_by[id(t)] = source
            continue
        if isinstance(layer, MaskedMultiHeadAttention):
            head_masks[layer.name] = np.asarray(layer.mask.numpy())
        if isinstance(layer, MaskedLayerNormalization):
            norm_masks[layer.name] = np.asarray(layer.mask.numpy())
        if isinstance(layer, MaskedBlock):
            block_masks[layer.name] = layer.unit_masks()
        for t in call.outputs:
            produced_by[id(t)] = layer.name
    old_layers: dict[str, Any] = {}

    def make(layer):
        if isinstance(layer, ChannelMask):
            return None
        old_layers[layer.name] = layer
        if isinstance(layer, MaskedMultiHeadAttention):
            return L.MultiHeadAttention.from_config(layer.plain_config())
        if isinstance(layer, MaskedLayerNormalization):
            return L.LayerNormalization.from_config(layer.plain_config())
        if isinstance(layer, MaskedBlock):
            return layer.unmasked()
        return clone_layer(layer)

    plain, new_layers = replay(model, make)
    for name, new in new_layers.items():
        if new is not None:
            _copy_weights(old_layers[name], new)
    graph = build_graph(plain)
    state: dict[int, bool] = {}

    def record(ids, mask, where):
        for u, m in zip(graph.roots[ids].tolist(), mask.tolist(), strict=False):
            keep = bool(m > 0.5)
            if state.setdefault(u, keep) != keep:
                raise ValueError(
                    f"Inconsistent masks: a channel is kept in one place and masked at {where!r}."
                )

    for source, mask in channel_masks:
        _, out = graph.layer_ids.get(source, ([], None))
        if out is None or len(out) != len(mask):
            raise ValueError(f"Cannot match the mask after layer {source!r} to its channels.")
        record(out, mask, source)
    for name, mask in head_masks.items():
        record(graph.heads[name], mask, name)
    for name, mask in norm_masks.items():
        record(graph.layer_ids[name][0][0], mask, name)
    for name, masks in block_masks.items():
        for key, ids in (("heads", graph.heads), ("inner", graph.inner)):
            if masks[key] is not None:
                if name not in ids or len(ids[name]) != len(masks[key]):
                    raise ValueError(f"Cannot match the {key} masks of {name!r} to its units.")
                record(ids[name], masks[key], name)
    prunable = {u for g in graph.groups for u, p in zip(g.units, g.prunable, strict=False) if p}
    pruned = {u for u, keep in state.items() if not keep}
    blocked = pruned - prunable
    if blocked:
        raise ValueError(
            "Masked channels feed a model output or a layer the graph cannot narrow; cannot "
            f"shrink them ({len(blocked)} units)."
        )
    return rebuild(plain, graph, pruned, parent=model)


# -- report ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerStructure:
    """Width, parameters and FLOPs of one layer before and after pruning.

    Attributes:
        name: layer name.
        class_name: layer class.
        width_before: units / filters / output_dim / heads before (None for width-less layers).
        width_after: the same after (None if the layer is gone).
        params_before: parameters before.
        params_after: parameters after.
        flops_before: forward FLOPs per sample before.
        flops_after: forward FLOPs per sample after.
    """

    name: str
    class_name: str
    width_before: int | None
    width_after: int | None
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclasses.dataclass(frozen=True)
class StructureReport:
    """What structured pruning changed.

    Attributes:
        layers: one `LayerStructure` per layer of the original model.
        params_before: total parameters before.
        params_after: total parameters after.
        flops_before: forward FLOPs per sample before.
        flops_after: forward FLOPs per sample after.
        skipped: `(layer name, reason)` for every layer whose channels were left alone.
    """

    layers: tuple[LayerStructure, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    skipped: tuple[tuple[str, str], ...]

    @property
    def flops_ratio(self) -> float:
        """FLOPs after / before."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        """Parameters after / before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_ratio": self.flops_ratio,
            "params_ratio": self.params_ratio,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "skipped": [{"layer": n, "reason": r} for n, r in self.skipped],
        }


def structure_report(
    original: keras.Model, pruned: keras.Model, *, exclude: tuple | list | str = ()
) -> StructureReport:
    """Per-layer width, parameters and FLOPs before and after, plus the layers left alone.

    Args:
        original: the model before pruning.
        pruned: the pruned (or shrunk) model.
        exclude: the exclude patterns used for pruning, so `skipped` lists them.

    Returns:
        A `StructureReport` (`to_dict()` for JSON).
    """
    _check_model(original)
    _check_model(pruned)
    original, pruned = _flat(original), _flat(pruned)  # layer names as prune_structured sees them
    before, after = count_flops(original), count_flops(pruned)
    rows_after = after.by_name()
    by_name_after = {layer.name: layer for layer in pruned.layers}
    rows = []
    for row in before.rows:
        ra = rows_after.get(row.name)
        try:
            lb = original.get_layer(row.name)
        except ValueError:
            lb = None
        la = by_name_after.get(row.name)
        rows.append(
            LayerStructure(
                name=row.name,
                class_name=row.class_name,
                width_before=width_of(lb) if lb is not None else None,
                width_after=width_of(la) if la is not None else None,
                params_before=row.params,
                params_after=ra.params if ra else 0,
                flops_before=row.flops,
                flops_after=ra.flops if ra else 0,
            )
        )
    graph = build_graph(original, exclude)
    return StructureReport(
        layers=tuple(rows),
        params_before=before.params,
        params_after=after.params,
        flops_before=before.total,
        flops_after=after.total,
        skipped=tuple((s.name, s.reason) for s in graph.skipped),
    )
