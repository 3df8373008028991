"""Recipe method `structured`: remove whole channels, neurons and heads; deploy a smaller model.

Recipe section (all keys optional)::

    structured:
      ratio: 0.5            # fraction of every channel group removed, in [0, 1)
      importance: l1        # l1 | l2 | bn_gamma | taylor
      mode: gradual         # gradual (masks during fine-tuning, shrink at deploy) | oneshot
                            # | progressive (channels removed at each pruning event)
      schedule: {kind: polynomial, begin: 0.0, end: 0.7, unit: fraction, frequency: 10, power: 3}
      round_to: 1           # surviving widths are multiples of this (e.g. 8), or auto
      min_channels: 1       # minimum surviving width per group
      exclude: []           # layer-name patterns (fnmatch) whose widths are kept
      global_ranking: false # rank channels of all layers together
      taylor_batches: 4     # batches of training data for importance: taylor

The schedule has the same format as `magnitude`'s (`initial_sparsity` is the fraction removed at
`begin`). In `oneshot` mode the model is rebuilt smaller in `prepare` and fine-tuned as is; in
`gradual` mode `prepare` adds schedule-driven group masks and `finalize` shrinks. In
`progressive` mode the method runs the fine-tune itself (`finetune`, through
`keras_lean.structured.prune_structured_progressively`): the channels the schedule switches off
are removed for real at its pruning events (optimizer state carried over), so later steps cost
less; the report holds width, params, FLOPs, step time and J per segment. Progressive mode
cannot be combined with a method whose layers cannot shrink during training (its class does not
set `can_shrink_progressively`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method, classification_loss
from keras_lean.pipeline.methods.magnitude import ScheduleOptions
from keras_lean.pipeline.methods.registry import register_method
from keras_lean.pipeline.options import (
    Bool,
    Choice,
    Float,
    Int,
    Nested,
    OneOf,
    Patterns,
    Section,
    option,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras

_MODES = ("gradual", "oneshot", "progressive")
_IMPORTANCE = ("l1", "l2", "bn_gamma", "taylor")


@dataclasses.dataclass(frozen=True)
class StructuredOptions(Section):
    """Options of the `structured` recipe method.

    Attributes:
        version: format version of this section (1).
        ratio: fraction of the channels of every group removed (of all channels with
            `global_ranking`), in [0, 1).
        importance: `l1`, `l2`, `bn_gamma` or `taylor` (Taylor uses `taylor_batches` batches of
            the training data and the loss `sparse_categorical_crossentropy` on logits or
            probabilities, as the pipeline's models output).
        mode: `gradual` (masks during fine-tuning, physical removal at deploy), `oneshot`
            (rebuild smaller before fine-tuning) or `progressive` (channels removed at each
            pruning event of the schedule, so later steps run on the smaller model).
        schedule: how the removed fraction grows during a gradual fine-tune (`ScheduleOptions`).
        round_to: surviving widths are multiples of this (>= 1), or `"auto"`: the float32
            vector lanes of the CPU that prunes (16 with AVX-512; `structured.simd_lanes`),
            resolved when the model is pruned and recorded in the report.
        min_channels: minimum surviving width of a group (>= 1).
        exclude: layer-name patterns (fnmatch) whose widths are kept.
        global_ranking: rank channels of all groups together.
        taylor_batches: batches averaged by `importance: taylor` (>= 1).
    """

    root: ClassVar[str | None] = "structured"

    version: int = option(1, Choice(1), "format version of this section")
    ratio: float = option(
        0.5, Float(min=0, lt=1), "fraction of every channel group removed, in [0, 1)"
    )
    importance: str = option("l1", Choice(*_IMPORTANCE), "l1 | l2 | bn_gamma | taylor")
    mode: str = option(
        "gradual",
        Choice(*_MODES),
        "gradual (masks while fine-tuning, shrink at deploy) | oneshot (shrink first) | "
        "progressive (shrink at each pruning event while fine-tuning)",
    )
    schedule: ScheduleOptions = option(
        kind=Nested(ScheduleOptions),
        comment="gradual, progressive: how the removed fraction grows (initial_sparsity = "
        "removed at begin)",
        default_factory=ScheduleOptions,
    )
    round_to: int | str = option(
        1,
        OneOf(Int(min=1), Choice("auto", normalize=lambda v: v.strip().lower())),
        "surviving widths are multiples of this, or auto (this CPU's float32 SIMD lanes)",
    )
    min_channels: int = option(1, Int(min=1), "minimum surviving width per group")
    exclude: tuple[str, ...] = option(
        (), Patterns(), "layer-name patterns (fnmatch) whose widths are kept"
    )
    global_ranking: bool = option(False, Bool(), "rank the channels of all groups together")
    taylor_batches: int = option(4, Int(min=1), "training batches averaged by importance: taylor")


@register_method
class StructuredMethod(Method):
    """Structured pruning: gradual group masks then `shrink`, or a one-shot rebuild."""

    name: ClassVar[str] = "structured"
    order: ClassVar[int] = 10
    options_class: ClassVar[type] = StructuredOptions
    guard_note: ClassVar[str] = (
        "it removes channels by rebuilding the model, so stage ratios would compound on an "
        "already smaller model"
    )
    target_option: ClassVar[str | None] = "ratio"
    target_help: ClassVar[str] = "fraction of every channel group removed, in [0, 1)"
    sweep_targets: ClassVar[tuple[float, ...]] = (0.25, 0.5)
    can_shrink_progressively: ClassVar[bool] = True
    state_attributes: ClassVar[tuple[str, ...]] = ("_round_to", "_steps", "_report", "_progressive")

    @classmethod
    def own_training_loop(cls, options: Any) -> str | None:
        if options.mode == "progressive":
            return "structured.mode progressive trains in its own loop (shrinking between segments)"
        return None

    def __init__(self, options: StructuredOptions):
        super().__init__(options)
        self._original = None
        self._steps: tuple[int, int, int] | None = None
        self._report: dict | None = None
        self._round_to: int | None = None
        self._progressive: dict | None = None

    @classmethod
    def check_recipe(cls, options: StructuredOptions, names) -> None:
        """Raises RecipeError when `mode: progressive` meets a method that cannot shrink during
        training (its layers are wrapped, masked or factorized, or it owns the loop)."""
        from keras_lean.pipeline.methods.registry import registered_class
        from keras_lean.pipeline.options import RecipeError

        if options.mode != "progressive":
            return
        for other in names:
            other_cls = registered_class(other)
            if other != cls.name and not getattr(other_cls, "can_shrink_progressively", False):
                raise RecipeError(
                    "structured.mode",
                    f"progressive cannot be combined with {other!r}: it cannot shrink during "
                    "training (the model is rebuilt narrower at every pruning event, and "
                    f"{other!r} wraps, masks or factorizes layers, or runs its own loop); use "
                    "mode: gradual or oneshot with it",
                )

    def pruning_end_step(self, plan: FinetunePlan) -> int | None:
        """Gradual: the mask schedule's end step (every group at `ratio`); one-shot: None (the
        channels are gone before fit)."""
        if self.options.mode == "oneshot":
            return None
        return self.options.schedule.steps(plan.total_steps)[1]

    def _schedule(self, plan: FinetunePlan):
        self._steps = self.options.schedule.steps(plan.total_steps)
        return self.options.schedule.build(self.options.ratio, plan, self._steps)

    def prepare(self, model: keras.Model, data: Data, plan: FinetunePlan) -> keras.Model:
        from keras_lean.structured import (
            prune_structured,
            prune_structured_gradually,
            resolve_round_to,
        )

        o = self.options
        self._original = model
        self._round_to = resolve_round_to(o.round_to)
        kwargs: dict[str, Any] = dict(
            round_to=self._round_to,
            min_channels=o.min_channels,
            exclude=o.exclude,
            global_ranking=o.global_ranking,
            taylor_batches=o.taylor_batches,
            batch_size=plan.batch_size,
        )
        if o.importance == "taylor":
            kwargs["data"] = (data.x_train, data.y_train)
            kwargs["loss"] = classification_loss(model)
        if o.mode == "oneshot":
            return prune_structured(model, o.ratio, o.importance, **kwargs)
        if o.mode == "progressive":
            self._schedule(plan)
            return model  # `finetune` prunes while it trains
        return prune_structured_gradually(model, self._schedule(plan), o.importance, **kwargs)

    def finetune(self, model: keras.Model, data: Data, plan: FinetunePlan, fit) -> Any:
        """Progressive mode: trains and shrinks (the returned model is already small)."""
        if self.options.mode != "progressive":
            return None
        from keras_lean.structured import prune_structured_progressively

        o = self.options
        with fit.scope():
            small, report = prune_structured_progressively(
                model,
                o.ratio,
                data.x_train,
                data.y_train,
                epochs=plan.epochs,
                batch_size=plan.batch_size,
                optimizer=fit.optimizer(),
                loss=fit.loss,
                metrics=["accuracy"],
                schedule=self._schedule(plan),
                importance=o.importance,
                round_to=self._round_to,
                min_channels=o.min_channels,
                exclude=o.exclude,
                global_ranking=o.global_ranking,
                taylor_batches=o.taylor_batches,
                jit_compile=fit.jit_compile,
                seed=int(getattr(fit, "seed", 0)),
                validation_data=(data.x_val, data.y_val),
                tracker=_FitWindows(fit),
                window_name="progressive",
                verbose=fit.verbose,
            )
        progressive = report.to_dict()
        self._report = progressive.pop("structure")
        self._progressive = {**progressive, "epochs_run": plan.epochs}
        return small

    def finalize(self, model: keras.Model) -> keras.Model:
        from keras_lean.structured import shrink, structure_report

        small = shrink(model)
        # At deploy the original is gone; the widths recorded at finetune (`load_state`) stay.
        if self._original is not None:
            report = structure_report(self._original, small, exclude=self.options.exclude)
            self._report = report.to_dict()
        return small

    def report(self) -> dict:
        out: dict[str, Any] = {"options": self.options.to_dict()}
        if self._round_to is not None:
            out["round_to"] = self._round_to  # resolved: "auto" becomes this CPU's lanes
        if self._steps is not None:
            begin, end, freq = self._steps
            out["schedule_steps"] = {"begin_step": begin, "end_step": end, "frequency": freq}
        if self._report is not None:
            out["structure"] = self._report
        if self._progressive is not None:
            out["progressive"] = self._progressive
            out["epochs_run"] = self._progressive.get("epochs_run")
        return out

    @classmethod
    def report_lines(cls, report: dict) -> list[str]:
        """The layers whose width changed: `structured widths: conv1 32->16, ...`."""
        structure = report.get("structure") if isinstance(report, Mapping) else None
        if not isinstance(structure, Mapping) or not structure.get("layers"):
            return []
        widths = [
            f"{r['name']} {r['width_before']}->{r['width_after']}"
            for r in structure["layers"]
            if isinstance(r, Mapping)
            and r.get("width_before") is not None
            and r.get("width_after") != r["width_before"]
        ]
        return ["structured widths: " + (", ".join(widths) or "unchanged")] + _segment_lines(
            report.get("progressive")
        )


def _segment_lines(progressive: Any) -> list[str]:
    """Progressive mode: one line per segment (width, params, FLOPs, step time, J)."""
    if not isinstance(progressive, Mapping) or not progressive.get("segments"):
        return []
    lines = [
        f"progressive: {progressive.get('shrinks_run', 0)} shrinks, measured cost "
        f"{float(progressive.get('shrink_cost_s') or 0.0):.2f} s, "
        f"{len(progressive.get('deferred') or [])} events deferred"
    ]
    for seg in progressive["segments"]:
        if not isinstance(seg, Mapping):
            continue
        step = seg.get("step_time_s")
        energy = seg.get("energy_j")
        lines.append(
            f"  steps {seg.get('start_step')}-{seg.get('end_step')}: units "
            f"{100 * float(seg.get('units_ratio') or 0):.0f} %, {seg.get('params'):,} params, "
            f"{seg.get('flops'):,} FLOPs, "
            + ("step -" if step is None else f"step {1e3 * step:.2f} ms")
            + ("" if energy is None else f", {energy:.1f} J")
        )
    return lines


class _FitWindows:
    """The stage's energy windows, as `prune_structured_progressively(tracker=...)` uses them."""

    def __init__(self, fit: Any):
        self._fit = fit

    def window(self, name: str, flops: float | None = None):
        return self._fit.energy_window(name)
