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
first step: one trace, the variables being built before it, `_backend.build_train_state`),
measured every time. The last event of the schedule always runs (the target is
reached with training left after it), so acting on an earlier event buys the smaller model only
for the steps until that last event, at the price of one more shrink. With `shrink_when="cost"`
an earlier event is acted on only when the step time it saves over those steps outweighs the
measured cost of the last shrink (step time is converted from FLOPs with the step times
measured so far); otherwise its removals wait for a later event. Before the first shrink, the
measured trace time of the first compile stands in for the cost. A small model on a fast
device thus shrinks once; a large one at every event.

Training order: epoch `e` visits the samples in the order of
`np.random.default_rng([seed, e]).permutation(n)`, the pipeline's rule (`keras_lean._seeds`;
no shuffling with `shuffle=False`), in batches of `batch_size` (the last one of an epoch may be
smaller), one `fit` call per segment (a `tf.data` pipeline gathering the batches from one copy
of the data; a callback opens and closes the epoch windows at the epoch boundaries, and
evaluates `validation_data` there, outside them).
A run with a schedule that removes nothing is exactly dense fine-tuning in that order.
The random-seed states of the model (dropout, noise) are set from `(seed, step)` as every epoch
and every segment's `fit` begins (a rebuilt model's layers would otherwise draw new ones).

Checkpoints: `epoch_end(epoch, model, state)` is called after every epoch with the current
(shrunk, compiled) model and a JSON state (`progressive_state`); passing the saved model and
state back (`resume=state`) continues after that epoch as the uninterrupted run does.
`step_end(steps_done)`, called after every step, may stop the run by raising (the pipeline's
Ctrl-C handling, `keras_lean.pipeline.interrupt.StepInterrupt`); resume then continues from the
last `epoch_end` checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lean._backend import build_train_state
from keras_lean._seeds import epoch_permutation
from keras_lean.flops import count_flops
from keras_lean.structured.api import (
    _check_args,
    _check_model,
    _final_sparsity,
    _warn_if_nothing_prunable,
    resolve_importance,
    structure_report,
)
from keras_lean.structured.graph import DependencyGraph, build_graph
from keras_lean.structured.hardware import resolve_round_to
from keras_lean.structured.importance import unit_scores
from keras_lean.structured.optimizer_state import carry_optimizer_state, trace_weight_slices
from keras_lean.structured.progressive_loop import Batches, EpochClock, SegmentCallback
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
from keras_lean.structured.progressive_state import check_state, restore, run_state
from keras_lean.structured.surgery import flatten_model, has_nested_models, rebuild, width_of

__all__ = [
    "EpochRecord",
    "ProgressiveReport",
    "SegmentRecord",
    "ShrinkRecord",
    "prune_structured_progressively",
]

SHRINK_POLICIES = ("cost", "always")


# -- the run -------------------------------------------------------------------------------------


class _Run:
    """State of one progressive run (the current model, bookkeeping, records)."""

    def __init__(self, model, graph, total_units, targets, kw):
        self.model = model
        self.graph: DependencyGraph | None = graph  # of `model`; None until needed again
        self.total_units = total_units
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
        self._live: list[float] = []  # step times of the `fit` under way
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
        total = self.total_units
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

    def fit(self, dataset, start: int, stop: int, clock: EpochClock) -> None:
        """Trains the current model on steps [start, stop) (one `fit` call, `dataset`)."""
        kw = self.kw
        callback = SegmentCallback(clock, start)
        self._live = callback.times
        try:
            self.model.fit(
                dataset, epochs=1, shuffle=False, callbacks=[callback], verbose=kw["verbose"]
            )
        except BaseException:  # stopped (Ctrl-C via `step_end`, an error): no window left open
            clock.abandon()
            raise
        self._live = []
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
        # The last event always runs and removes whatever is still pending then, so acting
        # now buys the smaller model only for the steps until it, at the price of one shrink.
        saving = per_step * (self._steps[-1] - step)
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
            build_train_state(small, *kw["sample"])
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

    def epoch_done(self, epoch: int) -> None:
        """After epoch `epoch` (from 1): hands the model and the run's state to `epoch_end`."""
        hook = self.kw.get("epoch_end")
        if hook is not None:
            hook(epoch, self.model, run_state(self, epoch))

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
    epoch_end: Callable[[int, keras.Model, dict], Any] | None = None,
    step_end: Callable[[int], Any] | None = None,
    resume: dict | None = None,
    original: keras.Model | None = None,
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
            reached (default 0.1: the cubic ramp removes most units early, so most steps run
            on the smallest model).
        prune_events: with `schedule=None`, the number of pruning events (default 3; each
            shrink costs a rebuild and a retrace).
        importance, round_to, min_channels, exclude, global_ranking, taylor_batches: as for
            `prune_structured` (ranking once, on the starting weights, as the gradual masks).
        shrink_when: `"cost"` (act on an event when the measured step time it saves until the
            last event, which always runs, outweighs the last shrink's measured cost) or
            `"always"`.
        jit_compile: `model.compile`'s choice; resolved once and reused for every segment.
        shuffle: visit the samples of each epoch in a seeded random order.
        seed: seed of that order.
        validation_data: `(x, y)` evaluated at the end of every epoch (outside the windows).
        tracker: an `EnergyTracker`: every epoch, segment part and shrink is its own window.
        window_name: prefix of those windows' names.
        verbose: `fit`'s verbosity.
        epoch_end: called after every epoch as `epoch_end(epoch, model, state)` (epoch from
            1): the current model (compiled, with its optimizer state) and the JSON-able
            state that continues the run from there (`progressive_state`); a checkpoint.
        step_end: called after every train step as `step_end(steps_done)` (steps finished
            since the run began, a resumed run's earlier epochs included; at an epoch's last
            step after its `epoch_end`). It may raise to stop the run (the pipeline stops
            there at Ctrl-C): a run resumed from the last `epoch_end` state then continues
            as the uninterrupted one does.
        resume: such a `state`: `model` is then the model saved with it (compiled, its
            optimizer state is carried over; not changed), training continues after its
            epoch with the same data order and pruning events, and `optimizer`, `schedule`
            and the ranking arguments are not used (the state holds what they decided).
        original: the model the structure report compares with (default `model`; when
            resuming, pass the model the run started from).

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
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    kw = dict(
        exclude=exclude,
        loss=loss,
        metrics=metrics,
        batch_size=batch_size,
        samples=n,
        verbose=verbose,
        seed=seed,
        shrink_when=shrink_when,
        total_steps=total_steps,
        name=window_name,
        window=_windows(tracker),
        epoch_end=epoch_end,
        step_end=step_end,
    )
    if resume is None:
        schedule = _resolve_schedule(schedule, ratio, total_steps, prune_end, prune_events)
        optimizer = optimizer if not isinstance(optimizer, str) else keras.optimizers.get(optimizer)
        optimizer = type(optimizer).from_config(optimizer.get_config())
        work = _working_copy(model)
        run = _fresh_run(work, schedule, x, y, kw, importance, round_to, min_channels,
                         global_ranking, taylor_batches)  # fmt: skip
        first_epoch = 0
    else:
        first_epoch = check_state(resume, total_steps=total_steps, samples=n, batch_size=batch_size)
        work, optimizer = _resumed_copy(model)
        run = _Run(work, build_graph(work, exclude), int(resume["total_units"]), {}, kw)
        restore(run, resume)
    work.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    kw["jit_compile"] = work.jit_compile
    kw["sample"] = keras.tree.map_structure(lambda a: a[:1], (x, y))
    build_train_state(work, *kw["sample"])  # one trace per compile, not two
    _train(run, x, y, n, epochs, steps_per_epoch, shuffle, seed, validation_data, first_epoch)
    report = ProgressiveReport(
        total_steps=total_steps,
        segments=tuple(run.segments),
        shrinks=tuple(_shrink_record(s) for s in run.shrinks),
        deferred=tuple(run.deferred),
        epochs=tuple(run.epochs),
        structure=structure_report(original or model, run.model, exclude=exclude),
        jit_compile=kw["jit_compile"],
        shrink_when=shrink_when,
    )
    return run.model, report


def _fresh_run(work, schedule, x, y, kw, importance, round_to, min_channels, global_ranking,
               taylor_batches) -> _Run:  # fmt: skip
    """The run's plan from the starting weights: graph, importance, which units go when."""
    graph = build_graph(work, kw["exclude"])
    _warn_if_nothing_prunable(graph, float(_final_sparsity(schedule)))
    loss = kw["loss"]
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    scores = unit_scores(
        graph,
        resolve_importance(importance, graph, (x, y), loss_fn),
        data=(x, y),
        loss=loss_fn,
        batch_size=kw["batch_size"],
        taylor_batches=taylor_batches,
    )
    plan = UnitPlan(graph, scores, schedule, round_to, min_channels, global_ranking)
    steps = targets(events(schedule, kw["total_steps"]), plan)
    return _Run(work, graph, len(plan.units), steps, kw)


def _resumed_copy(model: keras.Model):
    """A copy of a resumed run's model and its optimizer with the state carried over."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        raise ValueError(
            "resume needs the model saved by `epoch_end` (compiled, with its optimizer state; "
            "load it with keras.models.load_model(..., compile=True)). Received: a model "
            "without a built optimizer."
        )
    copy, maps = trace_weight_slices(model, _working_copy)
    return copy, carry_optimizer_state(optimizer, model, copy, maps)


def _train(run, x, y, n, epochs, steps_per_epoch, shuffle, seed, validation_data, first_epoch):
    orders = [epoch_permutation(n, seed, e) if shuffle else np.arange(n) for e in range(epochs)]
    data = Batches(x, y, orders, run.kw["batch_size"], steps_per_epoch)
    clock = EpochClock(run, steps_per_epoch, validation_data)
    total = epochs * steps_per_epoch
    step = first_epoch * steps_per_epoch
    while step < total:
        stop = run.next_cut(step, total)
        if stop > step:
            run.fit(data.steps(step, stop), step, stop, clock)
        if stop < total:
            run.event(stop)
        step = stop
    run.finish(total)


def _shrink_record(s: dict) -> ShrinkRecord:
    return ShrinkRecord(cost_s=s["surgery_s"] + (s["retrace_s"] or 0.0), **s)
