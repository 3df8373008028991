"""Progressive structured pruning: train in segments, physically shrink between them.

Gradual structured pruning (`prune_structured_gradually`) masks channels during fine-tuning, so
every step still runs at full width and costs what dense fine-tuning costs. Here the same schedule
removes the channels for real: at each pruning event the units the schedule switches off (the same
units, by the same rule, as the gradual masks: each unit keeps its rank from the importance of the
starting weights and goes when its group's `keep_count` falls below it) are cut out of the model
(`surgery.rebuild`), the optimizer state is sliced the same way (`optimizer_state`), the model is
recompiled, and every later step runs on the smaller model. The trajectory is the masked one (a
masked channel contributes exact zeros, a removed one nothing), without paying for the zeros.

A shrink has a fixed cost (dependency graph, rebuild, optimizer rebuild, compile, retrace on the
first step), measured every time. With `shrink_when="cost"` an event is acted on only when the
step time it saves over the remaining steps outweighs the measured cost of the last shrink (step
time is converted from FLOPs with the step times measured so far); otherwise its removals wait for
a later event. Before the first shrink, the measured trace time of the first compile stands in
for the cost. The last event of the schedule always runs (the target is reached with training
left after it).

Training order: epoch `e` visits the samples in the order of the `e`-th
`np.random.default_rng(seed).permutation(n)` (no shuffling with `shuffle=False`), in batches of
`batch_size` (the last one of an epoch may be smaller), one `fit` call per segment (a
`tf.data` pipeline gathering the batches from one copy of the data; a callback opens and closes
the epoch windows at the epoch boundaries, and evaluates `validation_data` there, outside them).
A run with a schedule that removes nothing is exactly dense fine-tuning in that order.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import keras
import numpy as np

from keras_lean.flops import count_flops
from keras_lean.structured.api import (
    _check_args,
    _check_model,
    _final_sparsity,
    _warn_if_nothing_prunable,
    structure_report,
)
from keras_lean.structured.graph import DependencyGraph, build_graph
from keras_lean.structured.hardware import resolve_round_to
from keras_lean.structured.importance import unit_scores
from keras_lean.structured.optimizer_state import carry_optimizer_state, trace_weight_slices
from keras_lean.structured.progressive_plan import (
    DEFAULT_PRUNE_END,
    DEFAULT_PRUNE_EVENTS,
    Positions,
    StepTimes,
    UnitPlan,
    default_schedule,
    estimated_flops,
    events,
    targets,
)
from keras_lean.structured.progressive_report import (
    EpochRecord,
    ProgressiveReport,
    SegmentRecord,
    ShrinkRecord,
)
from keras_lean.structured.surgery import flatten_model, has_nested_models, rebuild, width_of

__all__ = [
    "EpochRecord",
    "ProgressiveReport",
    "SegmentRecord",
    "ShrinkRecord",
    "prune_structured_progressively",
]

SHRINK_POLICIES = ("cost", "always")


class _SegmentCallback(keras.callbacks.Callback):
    """Per batch of one segment's `fit`: step times, and the epoch boundaries (via `clock`)."""

    def __init__(self, clock, start: int):
        super().__init__()
        self.clock = clock
        self.step = start
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.clock.begin_step(self.step)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t0)
        self.step += 1
        self.clock.end_step(self.step)

    def on_train_end(self, logs=None):
        self.clock.end_part()


class _EpochClock:
    """Opens and closes the epoch windows (and the segment parts inside them) at step boundaries.

    An epoch window stays open across a shrink (the shrink window nests in it); a part window
    covers the batches of one segment in one epoch.
    """

    def __init__(self, run, steps_per_epoch: int, validation_data):
        self.run = run
        self.spe = steps_per_epoch
        self.validation_data = validation_data
        self._epoch = None  # [context, window, epoch index, t0, flops]
        self._part = None  # [context, window, t0, first step]
        self._last = 0  # one past the last step run

    def begin_step(self, step: int) -> None:
        kw = self.run.kw
        if self._epoch is None:
            e = step // self.spe
            cm = kw["window"](f"{kw['name']}/epoch_{e + 1}", None)
            self._epoch = [cm, cm.__enter__(), e, time.perf_counter(), 0.0]
        if self._part is None:
            e = self._epoch[2]
            name = f"{kw['name']}/segment_{len(self.run.shrinks)}/epoch_{e + 1}"
            cm = kw["window"](name, None)
            self._part = [cm, cm.__enter__(), time.perf_counter(), step]

    def end_step(self, step: int) -> None:
        self._last = step
        if step % self.spe == 0:
            self.end_part()
            self._end_epoch()

    def end_part(self) -> None:
        if self._part is None:
            return
        cm, w, t0, first = self._part
        self._part = None
        start = self._epoch[2] * self.spe
        samples = self.run.samples_in(first - start, self._last - start)
        flops = 3.0 * self.run.seg["flops"] * samples
        if w is not None:
            w.flops = flops
        cm.__exit__(None, None, None)
        self._epoch[4] += flops
        self.run.add_part(time.perf_counter() - t0, w)

    def _end_epoch(self) -> None:
        cm, w, e, t0, flops = self._epoch
        self._epoch = None
        if w is not None:
            w.flops = flops
        cm.__exit__(None, None, None)
        duration = time.perf_counter() - t0
        metrics = {}
        if self.validation_data is not None:
            metrics = self.run.model.evaluate(
                *self.validation_data,
                batch_size=self.run.kw["batch_size"],
                verbose=0,
                return_dict=True,
            )
        self.run.epochs.append(
            EpochRecord(
                epoch=e + 1,
                duration_s=duration,
                energy_j=None if w is None or w.record is None else w.record.energy_j,
                flops=flops,
                params=int(self.run.model.count_params()),
                metrics={f"val_{k}": float(v) for k, v in metrics.items()},
            )
        )


# -- the run -------------------------------------------------------------------------------------


class _Run:
    """State of one progressive run (the current model, bookkeeping, records)."""

    def __init__(self, model, graph, plan, targets, kw):
        self.model = model
        self.graph: DependencyGraph | None = graph  # of `model`; None until needed again
        self.plan = plan
        self.positions = Positions(graph)
        self.targets = targets
        self._steps = sorted(targets)
        self._next = 0  # index in `_steps` of the next event not acted on
        self.kw = kw
        self.removed: frozenset = frozenset()
        self.times = StepTimes()
        self.segments: list[SegmentRecord] = []
        self.shrinks: list[dict] = []
        self.deferred: list[dict] = []
        self.epochs: list[EpochRecord] = []
        self._seg = self._new_segment(0)
        self._recompiled = True
        self.first_trace_s: float | None = None  # the cost estimate before any shrink ran

    # segments ------------------------------------------------------------------------------

    def _new_segment(self, step: int) -> dict:
        rows = count_flops(self.model).rows
        return dict(
            start=step,
            rows=rows,
            flops=int(sum(r.flops for r in rows)),
            params=int(self.model.count_params()),
            times=[],
            duration=0.0,
            energy=None,
        )

    def _close_segment(self, end: int) -> None:
        s = self._seg
        if end <= s["start"]:
            return
        step_time = float(np.median(s["times"])) if s["times"] else None
        self.times.add(s["flops"], step_time)
        total = len(self.plan.units)
        units = total - len(self.removed)
        widths = {}
        for layer in self.model.layers:
            w = width_of(layer)
            if w is not None:
                widths[layer.name] = int(w)
        self.segments.append(
            SegmentRecord(
                index=len(self.segments),
                start_step=s["start"],
                end_step=end,
                units=units,
                units_ratio=units / total if total else 1.0,
                params=s["params"],
                flops=s["flops"],
                step_time_s=step_time,
                duration_s=s["duration"],
                energy_j=s["energy"],
                widths=widths,
            )
        )

    @property
    def seg(self) -> dict:
        return self._seg

    def samples_in(self, first: int, end: int) -> int:
        """Samples in steps [first, end) of one epoch, counted from its start (the epoch's last
        batch may be short)."""
        bs, n = self.kw["batch_size"], self.kw["samples"]
        return min(end * bs, n) - min(first * bs, n)

    def add_part(self, duration: float, w) -> None:
        s = self._seg
        s["duration"] += duration
        if w is not None and w.record is not None:
            s["energy"] = (s["energy"] or 0.0) + w.record.energy_j

    def fit(self, dataset, start: int, stop: int, clock: _EpochClock) -> None:
        """Trains the current model on steps [start, stop) (one `fit` call, `dataset`)."""
        kw = self.kw
        callback = _SegmentCallback(clock, start)
        self.model.fit(
            dataset, epochs=1, shuffle=False, callbacks=[callback], verbose=kw["verbose"]
        )
        times = callback.times
        if len(times) > 1:
            self._seg["times"].extend(times[1:])
            if self._recompiled:
                retrace = max(0.0, times[0] - float(np.median(times[1:])))
                if not self.shrinks:
                    self.first_trace_s = retrace
                elif self.shrinks[-1]["retrace_s"] is None:
                    self.shrinks[-1]["retrace_s"] = retrace
        self._recompiled = False

    # events --------------------------------------------------------------------------------

    def next_cut(self, start: int, end: int) -> int:
        """The first event step in [start, end) training must stop at (a shrink, or a decision
        that needs a measurement first); the events it passes are deferred (and recorded)."""
        while self._next < len(self._steps) and self._steps[self._next] < end:
            step = self._steps[self._next]
            if self._decide(step, live=False) in ("shrink", "live"):
                return step
            self._next += 1
        return end

    def event(self, step: int) -> None:
        """Acts on the event at `step`, where training stopped (see `next_cut`)."""
        self._next += 1
        if self._decide(step, live=True) == "shrink":
            self._shrink(step)

    def _current(self, target: frozenset) -> tuple[DependencyGraph, frozenset]:
        if self.graph is None:
            self.graph = build_graph(self.model, self.kw["exclude"])
        return self.graph, self.positions.current(self.graph, target)

    def _decide(self, step: int, live: bool) -> str:
        """`shrink`, `defer`, `skip` (nothing new to remove) or `live` (decide at the step)."""
        sparsity, target, forced = self.targets[step]
        pending = target - self.removed
        if not pending:
            return "skip"
        if forced or self.kw["shrink_when"] == "always":
            return "shrink"
        cost = self._last_cost()
        graph, pruned = self._current(target)
        after = estimated_flops(graph, self._seg["rows"], pruned)
        times = self._seg["times"]
        current = (self._seg["flops"], float(np.median(times))) if times else None
        per_step = self.times.saving(self._seg["flops"], after, current)
        if cost is None or per_step is None:
            return "shrink" if live else "live"
        saving = per_step * (self.kw["total_steps"] - step)
        if saving > cost:
            return "shrink"
        self.deferred.append(
            dict(
                step=step,
                sparsity=sparsity,
                pending_units=len(pending),
                estimated_saving_s=saving,
                cost_s=cost,
            )
        )
        return "defer"

    def _last_cost(self) -> float | None:
        """The measured cost of the last shrink; before any, the first compile's trace time."""
        if self.shrinks:
            last = self.shrinks[-1]
            return last["surgery_s"] + (last["retrace_s"] or 0.0)
        return self.first_trace_s

    def _shrink(self, step: int) -> None:
        kw = self.kw
        sparsity, target, _ = self.targets[step]
        n_pending = len(target - self.removed)
        self._close_segment(step)
        old = self.model
        flops_before = self._seg["flops"]
        t0 = time.perf_counter()
        with kw["window"](f"{kw['name']}/shrink_{len(self.shrinks) + 1}", None) as w:
            graph, pruned = self._current(target)
            small, maps = trace_weight_slices(old, lambda m: rebuild(m, graph, pruned))
            optimizer = carry_optimizer_state(old.optimizer, old, small, maps)
            small.compile(
                optimizer=optimizer,
                loss=kw["loss"],
                metrics=kw["metrics"],
                jit_compile=kw["jit_compile"],
            )
        surgery = time.perf_counter() - t0
        self.model = small
        self.graph = None
        self.positions.remove(target)
        self.removed = target
        self._seg = self._new_segment(step)
        self._recompiled = True
        self.shrinks.append(
            dict(
                step=step,
                sparsity=sparsity,
                units_removed=n_pending,
                flops_before=flops_before,
                flops_after=self._seg["flops"],
                surgery_s=surgery,
                retrace_s=None,
                energy_j=None if w is None or w.record is None else w.record.energy_j,
            )
        )

    def finish(self, total_steps: int) -> None:
        self._close_segment(total_steps)


def _windows(tracker):
    """A `window(name, flops)` context factory: the tracker's, or one that measures nothing."""
    if tracker is not None:
        return tracker.window

    @contextlib.contextmanager
    def none(name, flops):
        yield None

    return none


def _num_samples(x, y) -> int:
    leaves = keras.tree.flatten(x)
    if not leaves:
        raise ValueError("x must be an array or a structure of arrays. Received: nothing")
    n = len(leaves[0])
    for leaf in leaves[1:] + keras.tree.flatten(y):
        if len(leaf) != n:
            raise ValueError(
                f"x and y must have the same number of samples. Received: {n} and {len(leaf)}"
            )
    return n


def _check_run_args(epochs, batch_size, shrink_when, seed):
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1. Received: {name}={v!r}")
    if shrink_when not in SHRINK_POLICIES:
        raise ValueError(
            f"shrink_when must be one of {', '.join(SHRINK_POLICIES)}. "
            f"Received: shrink_when={shrink_when!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer. Received: seed={seed!r}")


def _working_copy(model: keras.Model) -> keras.Model:
    if has_nested_models(model):
        return flatten_model(model)[0]
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _resolve_schedule(schedule, ratio, total_steps, prune_end, prune_events):
    from keras_lean.sparsity.schedules import as_schedule

    if schedule is None:
        return default_schedule(ratio, total_steps, prune_end, prune_events)
    schedule = as_schedule(schedule)
    final = _final_sparsity(schedule)
    if abs(final - ratio) > 1e-6:
        raise ValueError(
            f"The schedule's final sparsity ({final:g}) must equal ratio ({ratio:g}): pass the "
            "same target to both, or schedule=None for the default ramp to ratio."
        )
    return schedule


def prune_structured_progressively(
    model: keras.Model,
    ratio: float,
    x: Any,
    y: Any,
    *,
    epochs: int,
    batch_size: int = 32,
    optimizer: Any = "adam",
    loss: Any = None,
    metrics: Any = None,
    schedule: Any = None,
    prune_end: float = DEFAULT_PRUNE_END,
    prune_events: int = DEFAULT_PRUNE_EVENTS,
    importance: str = "l1",
    round_to: int | str = 1,
    min_channels: int = 1,
    exclude: tuple | list | str = (),
    global_ranking: bool = False,
    taylor_batches: int = 4,
    shrink_when: str = "cost",
    jit_compile: bool | str = "auto",
    shuffle: bool = True,
    seed: int = 0,
    validation_data: tuple | None = None,
    tracker: Any = None,
    window_name: str = "progressive",
    verbose: int = 0,
) -> tuple[keras.Model, ProgressiveReport]:
    """Fine-tunes `model` while removing channels for real, so each later step costs less.

    Args:
        model: a built Keras 3 Sequential or functional model (not changed).
        ratio: the final fraction of units removed per group (overall with `global_ranking`),
            in [0, 1). 0 trains densely (the reference run, same order and machinery).
        x: training inputs (an array or a structure of arrays).
        y: training targets.
        epochs: training epochs.
        batch_size: batch size.
        optimizer: a Keras optimizer or its name; a fresh copy from its config is used.
        loss: the loss (default: `model`'s compiled loss).
        metrics: metrics to compile every segment with (names are safest: each segment
            compiles anew).
        schedule: a pruning schedule (anything `sparsity.schedules.as_schedule` takes) whose
            final sparsity is `ratio`; default: PolynomialDecay from 0 to `ratio` (power 3)
            over the first `prune_end` of the steps in `prune_events` pruning events.
        prune_end: with `schedule=None`, the fraction of the steps by which the target is
            reached (default 0.3: the cubic ramp removes most units early, so most steps run
            on the smallest model).
        prune_events: with `schedule=None`, the number of pruning events (default 3; each
            shrink costs a rebuild and a retrace).
        importance, round_to, min_channels, exclude, global_ranking, taylor_batches: as for
            `prune_structured` (ranking once, on the starting weights, as the gradual masks).
        shrink_when: `"cost"` (act on an event when the measured step time it saves over the
            remaining steps outweighs the last shrink's measured cost) or `"always"`.
        jit_compile: `model.compile`'s choice; resolved once and reused for every segment.
        shuffle: visit the samples of each epoch in a seeded random order.
        seed: seed of that order.
        validation_data: `(x, y)` evaluated at the end of every epoch (outside the windows).
        tracker: an `EnergyTracker`: every epoch, segment part and shrink is its own window.
        window_name: prefix of those windows' names.
        verbose: `fit`'s verbosity.

    Returns:
        `(model, report)`: the final, smaller model (compiled, with its optimizer state) and a
        `ProgressiveReport`.

    Raises:
        ValueError: for a bad argument or a model type that is not supported.

    Example:

    >>> small, report = prune_structured_progressively(
    ...     model, 0.5, x, y, epochs=10, optimizer=keras.optimizers.Adam(3e-4),
    ...     loss="sparse_categorical_crossentropy", tracker=EnergyTracker())
    >>> [s.flops for s in report.segments], len(report.shrinks)
    """
    _check_model(model)
    round_to = resolve_round_to(round_to)
    _check_args(ratio, importance, round_to, min_channels)
    _check_run_args(epochs, batch_size, shrink_when, seed)
    n = _num_samples(x, y)
    loss = loss if loss is not None else getattr(model, "loss", None)
    if loss is None:
        raise ValueError("loss is required (the model is not compiled with one).")
    steps_per_epoch = -(-n // batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = _resolve_schedule(schedule, ratio, total_steps, prune_end, prune_events)
    work = _working_copy(model)
    if isinstance(exclude, str):
        exclude = (exclude,)
    graph = build_graph(work, tuple(exclude))
    _warn_if_nothing_prunable(graph, ratio)
    scores = unit_scores(
        graph,
        importance,
        data=(x, y),
        loss=keras.losses.get(loss) if isinstance(loss, str) else loss,
        batch_size=batch_size,
        taylor_batches=taylor_batches,
    )
    plan = UnitPlan(graph, scores, schedule, round_to, min_channels, global_ranking)
    opt = optimizer if not isinstance(optimizer, str) else keras.optimizers.get(optimizer)
    opt = type(opt).from_config(opt.get_config())
    work.compile(optimizer=opt, loss=loss, metrics=metrics, jit_compile=jit_compile)
    kw = dict(
        exclude=tuple(exclude),
        loss=loss,
        metrics=metrics,
        jit_compile=work.jit_compile,
        batch_size=batch_size,
        samples=n,
        verbose=verbose,
        shrink_when=shrink_when,
        total_steps=total_steps,
        name=window_name,
        window=_windows(tracker),
    )
    run = _Run(work, graph, plan, targets(events(schedule, total_steps), plan), kw)
    _train(run, x, y, n, epochs, steps_per_epoch, shuffle, seed, validation_data)
    report = ProgressiveReport(
        total_steps=total_steps,
        segments=tuple(run.segments),
        shrinks=tuple(_shrink_record(s) for s in run.shrinks),
        deferred=tuple(run.deferred),
        epochs=tuple(run.epochs),
        structure=structure_report(model, run.model, exclude=tuple(exclude)),
        jit_compile=kw["jit_compile"],
        shrink_when=shrink_when,
    )
    return run.model, report


def _train(run, x, y, n, epochs, steps_per_epoch, shuffle, seed, validation_data):
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(n) if shuffle else np.arange(n) for _ in range(epochs)]
    data = _Batches(x, y, orders, run.kw["batch_size"], steps_per_epoch)
    clock = _EpochClock(run, steps_per_epoch, validation_data)
    total = epochs * steps_per_epoch
    step = 0
    while step < total:
        stop = run.next_cut(step, total)
        if stop > step:
            run.fit(data.steps(step, stop), step, stop, clock)
        if stop < total:
            run.event(stop)
        step = stop
    run.finish(total)


class _Batches:
    """The batches of a run: epoch `e`'s are `orders[e]` cut in `batch_size` pieces (the last of
    an epoch may be smaller); `steps(a, b)` is a `tf.data.Dataset` of the batches of steps
    [a, b), gathered from one copy of the data."""

    def __init__(self, x, y, orders, batch_size, steps_per_epoch):
        import tensorflow as tf

        self._tf = tf
        self.data = keras.tree.map_structure(tf.convert_to_tensor, (x, y))
        self.orders = orders
        self.bs = batch_size
        self.spe = steps_per_epoch

    def steps(self, start: int, stop: int):
        tf, bs, spe = self._tf, self.bs, self.spe
        parts = None
        for e in range(start // spe, (stop - 1) // spe + 1):
            a, b = max(start - e * spe, 0), min(stop - e * spe, spe)
            idx = self.orders[e][a * bs : b * bs]
            ds = tf.data.Dataset.from_tensor_slices(idx.astype(np.int64)).batch(bs)
            parts = ds if parts is None else parts.concatenate(ds)
        data = self.data
        gather = lambda i: keras.tree.map_structure(lambda t: tf.gather(t, i), data)  # noqa: E731
        return parts.map(gather).prefetch(tf.data.AUTOTUNE)


def _shrink_record(s: dict) -> ShrinkRecord:
    return ShrinkRecord(cost_s=s["surgery_s"] + (s["retrace_s"] or 0.0), **s)
