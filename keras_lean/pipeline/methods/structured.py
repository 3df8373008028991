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
      shrink_when: cost     # progressive: cost (only when the saving outweighs a shrink) | always
      hidden_width: 0.0     # oneshot, keras-hub text models: hidden channels removed (0 = off)

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

import contextlib
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
            Progressive mode with this left at its defaults uses the library's progressive
            schedule instead (cubic ramp to `ratio` by 10 % of the steps, 3 events:
            `structured.progressive_plan.default_schedule`); any schedule set here is used.
        round_to: surviving widths are multiples of this (>= 1), or `"auto"`: the float32
            vector lanes of the CPU that prunes (16 with AVX-512; `structured.simd_lanes`),
            resolved when the model is pruned and recorded in the report.
        min_channels: minimum surviving width of a group (>= 1).
        exclude: layer-name patterns (fnmatch) whose widths are kept.
        global_ranking: rank channels of all groups together.
        taylor_batches: batches averaged by `importance: taylor` (>= 1).
        shrink_when: progressive mode: `cost` (act on a pruning event only when the step time
            it saves over the remaining steps outweighs the measured cost of the last shrink;
            the last event always runs) or `always`.
        hidden_width: fraction of the hidden channels (the residual stream) removed from a
            keras-hub transformer before the other groups, in [0, 1); 0 (default) is off.
            `mode: oneshot` only (`keras_lean.structured.prune_hidden_width`, importance: mean
            |activation| over up to 8 training batches).
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
        "removed at begin); progressive with these defaults: ramp to ratio by 10 % of steps",
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
    shrink_when: str = option(
        "cost",
        Choice("cost", "always"),
        "progressive: cost (shrink when the time saved outweighs the last shrink's measured "
        "cost) | always",
    )
    hidden_width: float = option(
        0.0,
        Float(min=0, lt=1),
        "oneshot, keras-hub text models: fraction of the hidden channels (residual stream) "
        "removed, in [0, 1); 0 = off",
    )


@register_method
class StructuredMethod(Method):
    """Structured pruning: gradual group masks then `shrink`, or a one-shot rebuild."""

    name: ClassVar[str] = "structured"
    order: ClassVar[int] = 10
    options_class: ClassVar[type] = StructuredOptions
    guard_stageable: ClassVar[bool] = True  # in mode: progressive only (`check_guard`)
    guard_note: ClassVar[str] = (
        "it removes channels by rebuilding the model, so stage ratios would compound on an "
        "already smaller model"
    )
    target_option: ClassVar[str | None] = "ratio"
    target_help: ClassVar[str] = "fraction of every channel group removed, in [0, 1)"
    sweep_targets: ClassVar[tuple[float, ...]] = (0.25, 0.5)
    can_shrink_progressively: ClassVar[bool] = True
    state_attributes: ClassVar[tuple[str, ...]] = (
        "_round_to",
        "_steps",
        "_report",
        "_progressive",
        "_previous",
    )

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
        self._previous = 0.0  # a guard stage's starting ratio (of the baseline's units)

    @classmethod
    def check_recipe(cls, options: StructuredOptions, names) -> None:
        """Raises RecipeError when `mode: progressive` meets a method that cannot shrink during
        training (its layers are wrapped, masked or factorized, or it owns the loop)."""
        from keras_lean.pipeline.methods.registry import registered_class
        from keras_lean.pipeline.options import RecipeError

        if options.hidden_width > 0 and options.mode != "oneshot":
            raise RecipeError(
                "structured.hidden_width",
                f"is applied in mode: oneshot only (received mode: {options.mode}); set "
                "structured.mode: oneshot, or hidden_width: 0",
            )
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

    @classmethod
    def check_guard(cls, options: StructuredOptions) -> None:
        """The guard stages `mode: progressive` only: each stage trains and shrinks the model
        the previous stage left (gradual and one-shot ratios would compound instead)."""
        from keras_lean.pipeline.options import RecipeError

        if options.mode != "progressive":
            raise RecipeError(
                "guard",
                f"cannot be combined with method 'structured' in mode {options.mode}: "
                f"{cls.guard_note}. Use structured.mode: progressive (each stage shrinks the "
                "model the previous stage left), or remove guard.stages.",
            )

    def stage(self, target: float, previous: float) -> StructuredMethod:
        """A copy removing `target` of the baseline's units, starting from a model that lost
        `previous` of them (the guard's stage before): its progressive run removes the share
        `1 - (1 - target) / (1 - previous)` of the units that are left."""
        staged = super().stage(target, previous)
        staged._previous = float(previous)
        return staged

    def _ratio(self) -> float:
        """The fraction of the current model's units this run removes."""
        target, previous = self.options.ratio, self._previous
        return 1.0 - (1.0 - target) / (1.0 - previous) if previous else target

    def pruning_end_step(self, plan: FinetunePlan) -> int | None:
        """Gradual: the mask schedule's end step (every group at `ratio`); one-shot: None (the
        channels are gone before fit)."""
        if self.options.mode == "oneshot":
            return None
        if self._library_schedule():
            return int(self._schedule(plan).end_step)
        return self.options.schedule.steps(plan.total_steps)[1]

    def _library_schedule(self) -> bool:
        """Progressive mode with the recipe's schedule left at its defaults (the gradual
        masks' ramp to 70 % of the steps) uses the library's progressive default instead: a
        cubic ramp to `ratio` by 10 % of the steps in 3 events, so most steps run small."""
        return self.options.mode == "progressive" and self.options.schedule == ScheduleOptions()

    def _schedule(self, plan: FinetunePlan, ratio: float | None = None):
        ratio = self.options.ratio if ratio is None else ratio
        if self._library_schedule():
            from keras_lean.structured.progressive_plan import default_schedule

            schedule = default_schedule(ratio, plan.total_steps)
            self._steps = (schedule.begin_step, schedule.end_step, schedule.frequency)
            return schedule
        self._steps = self.options.schedule.steps(plan.total_steps)
        return self.options.schedule.build(ratio, plan, self._steps)

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
            if o.hidden_width > 0:
                model = _prune_hidden_width(model, o.hidden_width, data, plan, self._round_to)
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
        ratio = self._ratio()
        resume = getattr(fit, "method_state", None)  # resuming from a checkpoint's state
        if resume is None and getattr(fit, "started_from", None) is not None:
            raise ValueError(
                "The checkpoint has no progressive state (it was not written by "
                "structured.mode: progressive); fine-tune again without --resume."
            )
        hook = getattr(fit, "epoch_end", None)
        # Ctrl-C: stop after a step, keeping the last epoch's checkpoint (`PipelineFit.interrupt`).
        interrupt = getattr(fit, "interrupt", None)
        with fit.scope(), interrupt or contextlib.nullcontext():
            small, report = prune_structured_progressively(
                model,
                ratio,
                data.x_train,
                data.y_train,
                epochs=plan.epochs,
                batch_size=plan.batch_size,
                optimizer=fit.optimizer(),
                loss=fit.loss,
                metrics=["accuracy"],
                schedule=self._schedule(plan, ratio),
                importance=o.importance,
                round_to=self._round_to,
                min_channels=o.min_channels,
                exclude=o.exclude,
                global_ranking=o.global_ranking,
                taylor_batches=o.taylor_batches,
                shrink_when=o.shrink_when,
                jit_compile=fit.jit_compile,
                seed=int(getattr(fit, "seed", 0)),
                validation_data=(data.x_val, data.y_val),
                tracker=_FitWindows(fit),
                window_name="progressive",
                verbose=fit.verbose,
                epoch_end=None if hook is None else (lambda e, m, st: hook(e, m, st)),
                step_end=None if interrupt is None else interrupt.after_step,
                resume=resume,
                original=fit.started_from() if resume is not None else None,
            )
        progressive = report.to_dict()
        self._report = progressive.pop("structure")
        self._progressive = {**progressive, "epochs_run": plan.epochs}
        return small

    def finalize(self, model: keras.Model) -> keras.Model:
        from keras_lean.structured import shrink, structure_report

        # Progressive mode removed the channels while training: the model has no masks, and
        # `shrink` would only rebuild an identical copy (a graph walk and a weight copy).
        small = model if self.options.mode == "progressive" else shrink(model)
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


def _prune_hidden_width(model, ratio: float, data: Data, plan: FinetunePlan, round_to: int):
    """`structured.hidden_width`: the hidden channels of a keras-hub transformer removed first
    (importance: mean |activation| over training batches); refused for other models."""
    from keras_lean._hub import is_transformer_block
    from keras_lean._keras_internals import flatten_layers
    from keras_lean.structured import prune_hidden_width

    if not any(is_transformer_block(layer) for layer in flatten_layers(model)):
        raise ValueError(
            f"structured.hidden_width: {ratio} needs a keras-hub text model (TransformerEncoder "
            f"or TransformerDecoder blocks: --model <keras-hub preset>); {model.name!r} has none. "
            "Set structured.hidden_width: 0 for this model."
        )
    return prune_hidden_width(
        model, ratio, "activation", data=data.x_train, round_to=round_to, batch_size=plan.batch_size
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
