"""What `prune_structured_progressively` reports: segments, shrinks, deferred events, epochs."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["EpochRecord", "ProgressiveReport", "SegmentRecord", "ShrinkRecord"]


@dataclasses.dataclass(frozen=True)
class SegmentRecord:
    """Steps run on one model (between two shrinks).

    Attributes:
        index: segment number, from 0.
        start_step: first optimizer step of the segment.
        end_step: one past its last step.
        units: prunable units (channels, neurons, heads) still in the model.
        units_ratio: `units` / prunable units at the start.
        params: parameters of the model.
        flops: forward FLOPs per sample.
        step_time_s: median time of one training step (first step of each `fit` call left
            out), or None when no such step ran.
        duration_s: wall time of the segment's `fit` calls.
        energy_j: energy of those calls (sum of their windows), or None without a tracker.
        widths: width (units, filters, heads, ...) of every layer that has one.
    """

    index: int
    start_step: int
    end_step: int
    units: int
    units_ratio: float
    params: int
    flops: int
    step_time_s: float | None
    duration_s: float
    energy_j: float | None
    widths: dict


@dataclasses.dataclass(frozen=True)
class ShrinkRecord:
    """One physical removal.

    Attributes:
        step: optimizer step before which it ran.
        sparsity: the schedule's sparsity at that step.
        units_removed: prunable units removed (including ones deferred from earlier events).
        flops_before: forward FLOPs per sample before.
        flops_after: after.
        surgery_s: graph, rebuild, optimizer state and compile time.
        retrace_s: extra time of the next segment's first step (tracing, XLA compile), or None
            when no step followed.
        cost_s: `surgery_s + retrace_s`.
        energy_j: energy of the surgery window, or None without a tracker.
    """

    step: int
    sparsity: float
    units_removed: int
    flops_before: int
    flops_after: int
    surgery_s: float
    retrace_s: float | None
    cost_s: float
    energy_j: float | None


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """One epoch.

    Attributes:
        epoch: epoch number, from 1.
        duration_s: wall time of its training and shrinks (evaluation not included).
        energy_j: energy of that window, or None without a tracker.
        flops: training FLOPs (3 x forward x samples, per segment's model).
        params: parameters at the end of the epoch.
        metrics: validation metrics at the end of the epoch (`val_loss`, `val_<metric>`;
            empty without validation data).
    """

    epoch: int
    duration_s: float
    energy_j: float | None
    flops: float
    params: int
    metrics: dict


@dataclasses.dataclass(frozen=True)
class ProgressiveReport:
    """What `prune_structured_progressively` did.

    Attributes:
        total_steps: optimizer steps run.
        segments: one `SegmentRecord` per model trained.
        shrinks: one `ShrinkRecord` per physical removal.
        deferred: events whose removals waited, each a dict (step, sparsity, pending units,
            estimated saving and the cost it was weighed against, in seconds).
        epochs: one `EpochRecord` per epoch.
        structure: the `StructureReport` of the final model against the starting one.
        jit_compile: the XLA choice every segment was compiled with.
        shrink_when: the policy used.
    """

    total_steps: int
    segments: tuple[SegmentRecord, ...]
    shrinks: tuple[ShrinkRecord, ...]
    deferred: tuple[dict, ...]
    epochs: tuple[EpochRecord, ...]
    structure: Any
    jit_compile: bool | str
    shrink_when: str

    @property
    def shrink_cost_s(self) -> float:
        """Total measured cost of all shrinks, in seconds."""
        return float(sum(s.cost_s for s in self.shrinks))

    def to_dict(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "shrinks_run": len(self.shrinks),
            "shrink_cost_s": self.shrink_cost_s,
            "shrink_when": self.shrink_when,
            "jit_compile": self.jit_compile,
            "segments": [dataclasses.asdict(s) for s in self.segments],
            "shrinks": [dataclasses.asdict(s) for s in self.shrinks],
            "deferred": [dict(d) for d in self.deferred],
            "epochs": [dataclasses.asdict(e) for e in self.epochs],
            "structure": self.structure.to_dict(),
        }
