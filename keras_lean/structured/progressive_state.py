"""The resumable state of a progressive run, as plain JSON (`epoch_end=` / `resume=`).

After every epoch `prune_structured_progressively(..., epoch_end=f)` calls
`f(epoch, model, state)`: `model` is the current (shrunk, compiled) model with its optimizer
state, `state` what the run needs besides it to continue exactly where it is: which original
units are gone and which sit at each channel position, the pruning events still to come (what
each removes), the decisions' measurements (shrink costs, step times) and the records so far.
Saving both (`model.save` and `json.dump(state)`) and passing them back as
`prune_structured_progressively(saved_model, ..., resume=state)` continues after that epoch:
the same data order, the same events, the optimizer state carried over, so the run ends as an
uninterrupted one does (with `shrink_when="cost"` the decisions read the measured times, which
a resumed run measures again).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keras_lean.structured.progressive_report import EpochRecord, SegmentRecord

__all__ = ["STATE_VERSION", "check_state", "restore", "run_state"]

STATE_VERSION = 1


def _ints(values) -> list[int]:
    return sorted(int(v) for v in values)


def run_state(run: Any, epoch: int) -> dict:
    """The JSON state of `run` (a `progressive._Run`) after `epoch` epochs."""
    seg = run.seg
    live = list(run._live[1:]) if len(run._live) > 1 else []
    return {
        "version": STATE_VERSION,
        "epoch": int(epoch),
        "total_steps": int(run.kw["total_steps"]),
        "samples": int(run.kw["samples"]),
        "batch_size": int(run.kw["batch_size"]),
        "total_units": int(run.total_units),
        "removed": _ints(run.removed),
        "next_event": int(run._next),
        "targets": [
            [int(step), float(sparsity), _ints(units), bool(forced)]
            for step, (sparsity, units, forced) in sorted(run.targets.items())
        ],
        "positions": [
            [name, kind, [int(i) for i in ids]] for (name, kind), ids in run.positions.at.items()
        ],
        "segment": {
            "start": int(seg["start"]),
            "times": [float(t) for t in seg["times"]] + live,
            "duration": float(seg["duration"]),
            "energy": seg["energy"],
        },
        "segments": [dataclasses.asdict(s) for s in run.segments],
        "shrinks": [dict(s) for s in run.shrinks],
        "deferred": [dict(d) for d in run.deferred],
        "epochs": [dataclasses.asdict(e) for e in run.epochs],
        "first_trace_s": run.first_trace_s,
        "step_times": [list(p) for p in run.times.points],
    }


def check_state(state: Any, *, total_steps: int, samples: int, batch_size: int) -> int:
    """Validates a `resume=` state against the run's arguments; returns its epoch.

    Raises:
        ValueError: not a state of this library's format, or one made for other data or
            another number of steps.
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            "resume must be the `state` an `epoch_end` callback received (a dict with "
            f"version {STATE_VERSION}). Received: {type(state).__name__}"
        )
    made = {k: state.get(k) for k in ("total_steps", "samples", "batch_size")}
    now = {"total_steps": total_steps, "samples": samples, "batch_size": batch_size}
    if made != now:
        raise ValueError(
            f"The resume state was made for {made}; this call has {now}. Resume with the same "
            "data, epochs and batch_size."
        )
    return int(state["epoch"])


def restore(run: Any, state: dict) -> None:
    """Puts `state` back into a fresh `_Run` built on the resumed model."""
    import numpy as np

    run.removed = frozenset(state["removed"])
    run._next = int(state["next_event"])
    run.targets = {
        int(step): (float(sp), frozenset(units), bool(forced))
        for step, sp, units, forced in state["targets"]
    }
    run._steps = sorted(run.targets)
    at = {(name, kind): np.asarray(ids, dtype=np.int64) for name, kind, ids in state["positions"]}
    missing = set(run.positions.at) - set(at)
    if missing:
        name = sorted(missing)[0][0]
        raise ValueError(f"The resume state has no channel positions of layer {name!r}.")
    run.positions.at = at
    seg = state["segment"]
    run.seg.update(
        start=seg["start"], times=list(seg["times"]), duration=seg["duration"], energy=seg["energy"]
    )
    run.segments = [SegmentRecord(**s) for s in state["segments"]]
    run.shrinks = [dict(s) for s in state["shrinks"]]
    run.deferred = [dict(d) for d in state["deferred"]]
    run.epochs = [EpochRecord(**e) for e in state["epochs"]]
    run.first_trace_s = state["first_trace_s"]
    run.times.points = [tuple(p) for p in state["step_times"]]
