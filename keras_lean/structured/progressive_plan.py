"""The plan of a progressive run: which units go when, and what removing them is worth.

- `UnitPlan`: per original unit, its rank in its group, the group size, its sparsity scale and
  limits: the rule of the gradual masks (`masks.py`), evaluated in numpy.
- `Positions`: which original unit sits at each channel position of the current (shrunk) model.
- `estimated_flops`: forward FLOPs after a removal, from the kept fraction of each layer's
  channels (the decision must not pay for a rebuild to learn what a rebuild saves).
- `StepTimes`: step time against FLOPs, fitted to the segments measured so far.
- `default_schedule`, `events`, `targets`: the pruning events of a schedule and what each removes.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_lean.structured.api import _group_scales, _limits, _ranked
from keras_lean.structured.graph import DependencyGraph
from keras_lean.structured.masks import keep_count

__all__ = [
    "Positions",
    "StepTimes",
    "UnitPlan",
    "DEFAULT_PRUNE_END",
    "DEFAULT_PRUNE_EVENTS",
    "default_schedule",
    "estimated_flops",
    "events",
    "targets",
]


class UnitPlan:
    """Per original unit: rank in its group, group size, sparsity scale, limits (the mask rule)."""

    def __init__(self, graph, scores, schedule, round_to, min_channels, global_ranking):
        group_scale = _group_scales(graph, scores, schedule, round_to, min_channels, global_ranking)
        rows = []
        for g in graph.groups:
            if not g.is_prunable:
                continue
            r, m = _limits(g, round_to, min_channels)
            ok = dict(zip(g.units, g.prunable, strict=False))
            for rank, u in enumerate(_ranked(g, scores)):
                if ok[u]:
                    rows.append((u, rank, g.size, group_scale[g.index], r, m))
        self.units = np.array([r[0] for r in rows], dtype=np.int64)
        self._rows = rows
        self._keep: dict[tuple, int] = {}

    def removed(self, sparsity: float) -> frozenset:
        """Original unit roots whose group keeps fewer units than their rank at `sparsity`."""
        out = []
        for u, rank, size, scale, r, m in self._rows:
            key = (size, float(np.float32(sparsity) * np.float32(scale)), r, m)
            if key not in self._keep:
                self._keep[key] = keep_count(size, key[1], r, m)
            if rank >= self._keep[key]:
                out.append(u)
        return frozenset(out)


class Positions:
    """Which original unit sits at each channel position of the current model, per layer."""

    def __init__(self, graph: DependencyGraph):
        self.at = {key: graph.roots[ids] for key, ids in self._arrays(graph).items()}

    @staticmethod
    def _arrays(graph: DependencyGraph) -> dict:
        out = {(n, "out"): ids for n, (_, ids) in graph.layer_ids.items() if ids is not None}
        out.update({(n, "heads"): ids for n, ids in graph.heads.items()})
        out.update({(n, "inner"): ids for n, ids in graph.inner.items()})
        return out

    def current(self, graph: DependencyGraph, removed: frozenset) -> frozenset:
        """Unit roots of `graph` (the current model's) that carry the original `removed` units."""
        gone = np.fromiter(removed, dtype=np.int64)
        pruned: set[int] = set()
        for key, ids in self._arrays(graph).items():
            orig = self.at.get(key)
            if orig is None or len(orig) != len(ids):
                raise ValueError(f"Channel positions of {key[0]!r} no longer match the model.")
            pruned.update(int(r) for r in graph.roots[ids[np.isin(orig, gone)]])
        return frozenset(pruned)

    def remove(self, removed: frozenset) -> None:
        gone = np.fromiter(removed, dtype=np.int64)
        self.at = {k: v[~np.isin(v, gone)] for k, v in self.at.items()}


def estimated_flops(graph: DependencyGraph, rows, pruned: frozenset) -> float:
    """Forward FLOPs per sample after removing `pruned` (each layer scaled by kept fractions)."""
    gone = np.fromiter(pruned, dtype=np.int64)

    def kept(ids):
        if ids is None or len(ids) == 0:
            return 1.0
        return float(np.mean(~np.isin(graph.roots[ids], gone)))

    total = 0.0
    for row in rows:
        ins, out = graph.layer_ids.get(row.name, ([], None))
        x = ins[0] if ins else None
        if row.name in graph.heads and row.name in graph.inner:
            heads, inner = kept(graph.heads[row.name]), kept(graph.inner[row.name])
            f = _block_fraction(graph, row, heads, inner)
        elif row.name in graph.heads:
            f = kept(graph.heads[row.name]) * kept(x)
        elif row.name in graph.inner:
            f = kept(graph.inner[row.name])
        elif out is None:
            f = kept(x)
        elif x is not None and not np.intersect1d(graph.roots[out], graph.roots[x]).size:
            f = kept(x) * kept(out)  # a producer: input rows x output columns
        else:
            f = kept(out)  # channel-wise (BatchNorm, depthwise, pooling, concat)
        total += row.flops * f
    return total


def _block_fraction(graph: DependencyGraph, row, heads: float, inner: float) -> float:
    """Kept fraction of a keras-hub transformer block's FLOPs with `heads` of its attention
    heads and `inner` of its feed-forward units kept.

    An encoder's FLOPs are affine in its head count and in its feed-forward width, apart
    (`_hub.transformer_encoder_flops`: attention, feed-forward, and the LayerNorms and adds that
    neither changes), so the parts are read off that count at zero heads / zero units. A block
    whose FLOPs `count_flops` does not split this way scales by the two fractions' mean.
    """
    from keras_lean._hub import is_transformer_encoder, transformer_encoder_flops

    layer = _layer_named(graph.model, row.name)
    shape = _input_shape(layer)
    if layer is None or shape is None or not is_transformer_encoder(layer):
        return 0.5 * (heads + inner)
    h, ff = int(layer.num_heads), int(layer.intermediate_dim)
    head_dim = getattr(layer, "head_dim", None) or int(shape[-1]) // h

    def count(num_heads, intermediate_dim):
        part = _Block(num_heads, head_dim, intermediate_dim)
        return float(transformer_encoder_flops(part, shape))

    base = count(0, 0)
    full = count(h, ff)
    if full <= 0:
        return 1.0
    attention, feed_forward = count(h, 0) - base, count(0, ff) - base
    return (base + heads * attention + inner * feed_forward) / full


class _Block:
    """The three numbers `transformer_encoder_flops` reads from an encoder."""

    def __init__(self, num_heads, head_dim, intermediate_dim):
        self.num_heads, self.head_dim, self.intermediate_dim = num_heads, head_dim, intermediate_dim


def _layer_named(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def _input_shape(layer) -> tuple | None:
    try:
        return tuple(layer.input.shape)
    except (AttributeError, ValueError):
        return None


class StepTimes:
    """Step time as a function of forward FLOPs, fitted to the segments measured so far."""

    def __init__(self):
        self.points: list[tuple[float, float]] = []

    def add(self, flops: float, step_time: float | None) -> None:
        if step_time is not None and flops > 0:
            self.points.append((float(flops), float(step_time)))

    def saving(self, flops_now: float, flops_after: float, current=None) -> float | None:
        """Seconds per step saved by going from `flops_now` to `flops_after`, or None.

        `current`: a `(flops, step time)` point of the segment under way, used with the others.
        """
        points = self.points + ([current] if current is not None else [])
        if not points:
            return None
        f = np.array([p[0] for p in points])
        t = np.array([p[1] for p in points])
        if np.ptp(f) > 0:
            slope = max(float(np.polyfit(f, t, 1)[0]), 0.0)
        else:
            slope = float(np.median(t / f))
        return slope * (flops_now - flops_after)


# Fraction of the steps by which the default schedule reaches its target. Measured
# (scripts/bench_energy_savings.py, digits CNN, 8 epochs, 3 seeds): 0.1 instead of 0.3 took
# structured 50 % from 1.01x to 0.88x the energy of dense fine-tuning through the same loop, at
# the same accuracy (98.1 %, gradual masks to 2/3 of the steps: 97.8 %).
DEFAULT_PRUNE_END = 0.1
DEFAULT_PRUNE_EVENTS = 3  # pruning events of the default schedule


def default_schedule(
    ratio: float,
    total_steps: int,
    end: float = DEFAULT_PRUNE_END,
    events: int = DEFAULT_PRUNE_EVENTS,
):
    """PolynomialDecay 0 -> `ratio` (power 3) over the first `end` of the steps, `events` events.

    The cubic ramp removes most units at the first events (1 - (1 - t)^3: 70 % of the target at
    a third of the ramp), and ending early (default: at 10 % of the steps) lets every later step
    run on the smallest model; few events keep the number of shrinks (each pays a rebuild and a
    retrace) small.
    """
    from keras_lean.sparsity.schedules import PolynomialDecay

    if not 0 < end <= 1:
        raise ValueError(f"prune_end must be in (0, 1]. Received: prune_end={end!r}")
    if isinstance(events, bool) or not isinstance(events, int) or events < 1:
        raise ValueError(f"prune_events must be an integer >= 1. Received: prune_events={events!r}")
    last = max(total_steps - 1, 0)
    stop = max(1, int(round(end * last)))
    frequency = max(1, stop // events)
    stop = min(frequency * max(1, round(stop / frequency)), max(last, 1))
    return PolynomialDecay(0.0, ratio, begin_step=0, end_step=stop, power=3, frequency=frequency)


def events(schedule, total_steps: int) -> list[tuple[int, float]]:
    """(step, sparsity) for every step in [0, total_steps) where the schedule prunes."""
    steps = np.arange(total_steps, dtype=np.int64)

    def numpy(values):
        return np.broadcast_to(np.asarray(keras.ops.convert_to_numpy(values)), steps.shape)

    try:  # the built-in schedules are element-wise in the step: one call for all steps
        should, sparsity = (numpy(v) for v in schedule(steps))
    except Exception:  # a user schedule that only takes a scalar step
        pairs = [schedule(int(t)) for t in steps]
        should = np.array([bool(keras.ops.convert_to_numpy(p[0])) for p in pairs])
        sparsity = np.array([float(keras.ops.convert_to_numpy(p[1])) for p in pairs])
    return [(int(t), float(sparsity[t])) for t in steps[should.astype(bool)]]


def targets(events, plan: UnitPlan) -> dict[int, tuple[float, frozenset, bool]]:
    """step -> (sparsity, removed units, whether it is the last event that removes more)."""
    out: dict[int, tuple[float, frozenset, bool]] = {}
    previous: frozenset = frozenset()
    for step, sparsity in events:
        target = plan.removed(sparsity) | previous
        if target != previous:
            out[step] = (sparsity, target, False)
            previous = target
    if out:
        last = max(out)
        out[last] = (*out[last][:2], True)
    return out
