"""Guarded gradual pruning: prune in stages, keep the last stage within the gate's budget.

`recipe.guard.stages` (e.g. `[0.3, 0.5, 0.6, 0.7, 0.8]`) turns the fine-tune of one method whose
class says `guard_stageable` (magnitude, movement, structured in mode progressive) into a
series: stage k starts from stage k-1's pruned weights (zeros in place), prepares them again
with the stage's target (`Method.stage`: for magnitude, the schedule rising from the previous
stage's sparsity), fine-tunes `epochs_per_stage` epochs and is validated against the baseline
by the run's gate metric (a `StageGate`, the same one `validate` gates on): accuracy drop for a
classifier (`max_metric_drop.accuracy`), relative perplexity rise for a causal LM
(`max_metric_drop.perplexity`). The first stage over the budget stops the run, and the model
rolls back to the previous stage. If even the first stage breaks the budget, the run rolls back
to the baseline weights: nothing is pruned, and the report says so. Accuracy (token accuracy
for a causal LM) is recorded for every stage either way.

A method that runs its own loop (`Method.finetune`) trains its stages itself: structured in mode
progressive shrinks the model while it trains, so each stage ends on a smaller model, the next
stage starts from it, and a rollback keeps the last good stage's smaller model.

`steps.finetune` calls `run_stages`; this module knows nothing of files or the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from keras_lean.pipeline.recipe import GuardOptions

# Float noise in an accuracy computed twice must not flip a decision.
_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class StageGate:
    """The metric a guarded run judges each stage by: the run's validate gate.

    Attributes:
        metric: `accuracy` (the change is the drop, `baseline - value`, absolute) or
            `perplexity` (the change is the relative rise, `(value - baseline) / baseline`).
        evaluate: `evaluate(model) -> float`, the metric on the validation data (None where
            the values come already measured: the validate step, the sweep's points).
        baseline: the baseline model's value of the metric.
        budget: the largest change a kept stage may show (the recipe's `max_metric_drop`).
    """

    metric: str
    evaluate: Callable[[Any], float] | None
    baseline: float
    budget: float

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", "perplexity"):
            raise ValueError(
                f"metric must be 'accuracy' or 'perplexity'. Received: metric={self.metric!r}"
            )
        if self.metric == "perplexity" and not self.baseline > 0:
            raise ValueError(
                f"a perplexity gate needs a positive baseline perplexity. "
                f"Received: baseline={self.baseline!r}"
            )

    @property
    def change_name(self) -> str:
        """The row key and wording of the change: `accuracy_drop` or `perplexity_rise`."""
        return "accuracy_drop" if self.metric == "accuracy" else "perplexity_rise"

    @property
    def budget_name(self) -> str:
        """`max_accuracy_drop` or `max_perplexity_rise` (the recipe's names)."""
        return f"max_{self.change_name}"

    def change(self, value: float) -> float:
        """How far `value` is from the baseline, in the direction that is worse."""
        if self.metric == "accuracy":
            return self.baseline - value
        return (value - self.baseline) / self.baseline

    def within(self, value: float) -> bool:
        """Whether `value` passes: its `change` is at most `budget` (with a 1e-9 tolerance, so
        a change equal to the budget in exact arithmetic passes). The one verdict the guard's
        stages, the validate step and the sweep's points share."""
        return self.change(value) <= self.budget + _EPS


@dataclasses.dataclass(frozen=True)
class GuardOutcome:
    """What `run_stages` kept.

    Attributes:
        model: the kept stage's fine-tuned (still wrapped) model, or the baseline model when
            no stage is within budget.
        method: the pruning method of the kept stage (its `finalize`/`report` describe that
            stage), or a fresh one with the recipe's options when nothing was kept.
        stages: one row per stage run: stage, target_sparsity, sparsity (measured on the
            pruned layers), val_accuracy, accuracy_drop, within_budget, energy_j, duration_s,
            kept; with a perplexity gate also val_perplexity and perplexity_rise (relative),
            which decide within_budget.
        kept_stage: 1-based index of the kept stage, or None (baseline kept).
        baseline_accuracy: validation accuracy the drops are measured from.
        max_accuracy_drop: the budget.
        reason: why this stage was kept, in one sentence.
        epochs_run: fine-tune epochs trained over all stages.
        gate: the metric the stages were judged by (accuracy unless `run_stages` got a gate).
    """

    model: Any
    method: Method
    stages: tuple[dict, ...]
    kept_stage: int | None
    baseline_accuracy: float
    max_accuracy_drop: float
    reason: str
    epochs_run: int
    gate: StageGate | None = None

    def to_dict(self) -> dict:
        kept = self.stages[self.kept_stage - 1] if self.kept_stage else None
        gate = {}
        if self.gate is not None and self.gate.metric != "accuracy":
            gate = {
                f"baseline_{self.gate.metric}": self.gate.baseline,
                self.gate.budget_name: self.gate.budget,
            }
        return {
            "metric": "accuracy" if self.gate is None else self.gate.metric,
            **gate,
            "baseline_accuracy": self.baseline_accuracy,
            "max_accuracy_drop": self.max_accuracy_drop,
            "stages": list(self.stages),
            "kept_stage": self.kept_stage,
            "kept_target_sparsity": None if kept is None else kept["target_sparsity"],
            "reason": self.reason,
        }


def stage_method(method: Method, target: float, previous: float) -> Method:
    """A copy of `method` that prunes from `previous` to `target` (its `Method.stage`)."""
    if not type(method).guard_stageable:
        raise ValueError(
            f"recipe.guard cannot stage method {method.name!r}: {type(method).guard_note}."
        )
    return method.stage(target, previous)


def _train_stage(staged: Method, model, data: Data, plan: FinetunePlan, fit, callbacks):
    """Trains one stage; returns the trained model. A method that runs its own loop
    (`Method.finetune`, e.g. structured progressive) returns a new, smaller model; otherwise
    the pipeline's `fit` trains `model` in place."""
    owned = staged.finetune(model, data, plan, fit)
    if owned is not None:
        return owned
    fit(model, epochs=plan.epochs, callbacks=callbacks() if callbacks else [])
    return model


def run_stages(
    model: keras.Model,
    method: Method,
    data: Data,
    *,
    guard: GuardOptions,
    steps_per_epoch: int,
    batch_size: int,
    fit: Callable[..., Any],
    evaluate: Callable[[Any], float],
    baseline_accuracy: float,
    max_accuracy_drop: float,
    energy_window: Callable[[str], Any] | None = None,
    callbacks: Callable[[], list] | None = None,
    scope: Callable[[], Any] | None = None,
    gate: StageGate | None = None,
) -> GuardOutcome:
    """Fine-tunes `model` through the guard's stages; keeps the last stage within budget.

    Args:
        model: the dense model to prune (not modified).
        method: the recipe's stageable method (`Method.guard_stageable`); each stage uses a
            copy whose target is the stage's (`Method.stage`).
        data: train and validation data.
        guard: the stages and epochs per stage.
        steps_per_epoch: optimizer steps per epoch.
        batch_size: the fine-tune batch size.
        fit: the pipeline's `fit(model, epochs=..., callbacks=...)`.
        evaluate: validation accuracy of a model (the same measure `validate` uses).
        baseline_accuracy: the accuracy drops are measured from.
        max_accuracy_drop: the accuracy budget (absolute), used when `gate` is None.
        energy_window: `energy_window(name)`: a context manager yielding a window whose
            `record.energy_j` is set on exit; None records no energy.
        callbacks: returns extra fit callbacks for each stage.
        scope: the distribution-strategy scope the stages' models are built under.
        gate: the metric that decides (the run's validate gate, e.g. perplexity for a causal
            LM); None judges by accuracy against `baseline_accuracy` and `max_accuracy_drop`.

    Returns:
        A `GuardOutcome`.
    """
    plan = FinetunePlan(
        epochs=guard.epochs_per_stage, steps_per_epoch=steps_per_epoch, batch_size=batch_size
    )
    judge = gate or StageGate("accuracy", evaluate, baseline_accuracy, max_accuracy_drop)
    current = model
    previous = 0.0
    kept: tuple[int, Any, Method] | None = None
    rows: list[dict] = []
    reason = ""
    for index, target in enumerate(guard.stages, start=1):
        staged = stage_method(method, target, previous)
        with scope() if scope is not None else contextlib.nullcontext():
            wrapped = staged.prepare(current, data, plan)
        with (
            energy_window(f"guard_stage_{index}")
            if energy_window is not None
            else contextlib.nullcontext()
        ) as window:
            wrapped = _train_stage(staged, wrapped, data, plan, fit, callbacks)
            accuracy = evaluate(wrapped)
            value = accuracy if judge.metric == "accuracy" else judge.evaluate(wrapped)
        with scope() if scope is not None else contextlib.nullcontext():
            stripped = staged.finalize(wrapped)
        measured = (staged.report().get("final") or {}).get("sparsity")
        change = judge.change(value)
        within = judge.within(value)
        record = getattr(window, "record", None)
        by_gate = (
            {}
            if judge.metric == "accuracy"
            else {
                f"val_{judge.metric}": value,
                judge.change_name: change,
            }
        )
        rows.append(
            {
                "stage": index,
                "target_sparsity": target,
                "sparsity": measured,
                "val_accuracy": accuracy,
                "accuracy_drop": baseline_accuracy - accuracy,
                **by_gate,
                "within_budget": within,
                "energy_j": None if record is None else record.energy_j,
                "duration_s": None if record is None else record.duration_s,
                "kept": False,
            }
        )
        if not within:
            verb = "dropped" if judge.metric == "accuracy" else f"raised {judge.metric} by"
            over = (
                f"stage {index} (sparsity {target:g}) {verb} {change:.4f} > "
                f"{judge.budget_name} {judge.budget:g}"
            )
            if kept is None:
                reason = (
                    f"no stage within budget: {over}; rolled back to the baseline weights "
                    f"(nothing pruned)"
                )
            else:
                reason = (
                    f"{over}; rolled back to stage {kept[0]} (sparsity "
                    f"{guard.stages[kept[0] - 1]:g}) and stopped"
                )
            break
        kept = (index, wrapped, staged)
        current, previous = stripped, target
    else:
        last = guard.stages[-1]
        reason = (
            f"all {len(guard.stages)} stages within {judge.budget_name} {judge.budget:g}; "
            f"kept the last (sparsity {last:g})"
        )
    if kept is None:
        kept_stage, kept_model, kept_method = None, model, type(method)(method.options)
    else:
        kept_stage, kept_model, kept_method = kept
        rows[kept_stage - 1]["kept"] = True
    return GuardOutcome(
        model=kept_model,
        method=kept_method,
        stages=tuple(rows),
        kept_stage=kept_stage,
        baseline_accuracy=baseline_accuracy,
        max_accuracy_drop=max_accuracy_drop,
        reason=reason,
        epochs_run=len(rows) * plan.epochs,
        gate=judge,
    )
