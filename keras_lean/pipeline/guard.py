"""Accuracy-guarded gradual pruning: prune in stages, keep the last stage within the budget.

`recipe.guard.stages` (e.g. `[0.3, 0.5, 0.6, 0.7, 0.8]`) turns the fine-tune of one method whose
class says `guard_stageable` (magnitude, movement) into a series: stage k starts from stage k-1's
pruned weights (zeros in place), prepares them again with the stage's target (`Method.stage`:
for magnitude, the schedule rising from the previous stage's sparsity), fine-tunes
`epochs_per_stage` epochs and is validated against the baseline's accuracy. The first stage
whose drop exceeds the recipe's `max_accuracy_drop` stops the run, and the model rolls back to
the previous stage. If even the first stage breaks the budget, the run rolls back to the
baseline weights: nothing is pruned, and the report says so.

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
class GuardOutcome:
    """What `run_stages` kept.

    Attributes:
        model: the kept stage's fine-tuned (still wrapped) model, or the baseline model when
            no stage is within budget.
        method: the pruning method of the kept stage (its `finalize`/`report` describe that
            stage), or a fresh one with the recipe's options when nothing was kept.
        stages: one row per stage run: stage, target_sparsity, sparsity (measured on the
            pruned layers), val_accuracy, accuracy_drop, within_budget, energy_j, duration_s,
            kept.
        kept_stage: 1-based index of the kept stage, or None (baseline kept).
        baseline_accuracy: validation accuracy the drops are measured from.
        max_accuracy_drop: the budget.
        reason: why this stage was kept, in one sentence.
        epochs_run: fine-tune epochs trained over all stages.
    """

    model: Any
    method: Method
    stages: tuple[dict, ...]
    kept_stage: int | None
    baseline_accuracy: float
    max_accuracy_drop: float
    reason: str
    epochs_run: int

    def to_dict(self) -> dict:
        kept = self.stages[self.kept_stage - 1] if self.kept_stage else None
        return {
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
        max_accuracy_drop: the budget (absolute).
        energy_window: `energy_window(name)`: a context manager yielding a window whose
            `record.energy_j` is set on exit; None records no energy.
        callbacks: returns extra fit callbacks for each stage.
        scope: the distribution-strategy scope the stages' models are built under.

    Returns:
        A `GuardOutcome`.
    """
    plan = FinetunePlan(
        epochs=guard.epochs_per_stage, steps_per_epoch=steps_per_epoch, batch_size=batch_size
    )
    current = model
    previous = 0.0
    kept: tuple[int, Any, Method] | None = None
    rows: list[dict] = []
    reason = ""
    for index, target in enumerate(guard.stages, start=1):
        staged = stage_method(method, target, previous)
        with scope() if scope is not None else contextlib.nullcontext():
            wrapped = staged.prepare(current, data, plan)
        window = None
        if energy_window is not None:
            with energy_window(f"guard_stage_{index}") as window:
                fit(wrapped, epochs=plan.epochs, callbacks=callbacks() if callbacks else [])
                accuracy = evaluate(wrapped)
        else:
            fit(wrapped, epochs=plan.epochs, callbacks=callbacks() if callbacks else [])
            accuracy = evaluate(wrapped)
        with scope() if scope is not None else contextlib.nullcontext():
            stripped = staged.finalize(wrapped)
        measured = (staged.report().get("final") or {}).get("sparsity")
        drop = baseline_accuracy - accuracy
        within = drop <= max_accuracy_drop + _EPS
        record = getattr(window, "record", None)
        rows.append(
            {
                "stage": index,
                "target_sparsity": target,
                "sparsity": measured,
                "val_accuracy": accuracy,
                "accuracy_drop": drop,
                "within_budget": within,
                "energy_j": None if record is None else record.energy_j,
                "duration_s": None if record is None else record.duration_s,
                "kept": False,
            }
        )
        if not within:
            over = (
                f"stage {index} (sparsity {target:g}) dropped {drop:.4f} > max_accuracy_drop "
                f"{max_accuracy_drop:g}"
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
            f"all {len(guard.stages)} stages within max_accuracy_drop {max_accuracy_drop:g}; "
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
    )
