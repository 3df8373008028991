"""Step 4: evaluate baseline and fine-tuned models on the validation data; the gate."""

from __future__ import annotations

import os

from keras_lean.pipeline.data import check_data_against_model
from keras_lean.pipeline.models import load_model
from keras_lean.pipeline.recipe import load_recipe
from keras_lean.pipeline.rundir import RunDir, atomic_write_json
from keras_lean.pipeline.steps.common import (
    ValidationResult,
    as_run,
    evaluate,
    forward_flops,
    load_run_data,
)
from keras_lean.pipeline.steps.stage import _stage


def validate(
    out: str | os.PathLike | RunDir,
    *,
    data: str | os.PathLike | None = None,
    val_split: float | None = None,
) -> ValidationResult:
    """Step 4: evaluates baseline and fine-tuned models on the validation data; the gate.

    Writes `RUN/validation.json`. Passes when the accuracy drop (baseline minus fine-tuned) is at
    most the recipe's `max_accuracy_drop`.

    Args:
        out: the run folder (must hold `baseline.keras`, `finetuned.keras`, `recipe.yaml`).
        data: override the run's data.
        val_split: override the run's validation split.

    Returns:
        A `ValidationResult`; check `.passed`.

    Raises:
        MissingStepError: an input is missing.
    """
    run = as_run(out)
    run.require(run.baseline, for_step="validate")
    run.require(run.recipe, for_step="validate")
    run.require(run.finetuned, for_step="validate")
    rec = load_recipe(run.recipe)
    manifest = run.read_manifest()
    ds = load_run_data(manifest, data, val_split)
    with _stage(run, "validate", manifest) as stage:
        baseline = load_model(run.baseline)
        check_data_against_model(ds, baseline, model_name=str(run.baseline))
        base_acc = evaluate(baseline, ds)
        ft_acc = evaluate(load_model(run.finetuned), ds)
        drop = base_acc - ft_acc
        passed = drop <= rec.max_accuracy_drop + 1e-9
        fwd = forward_flops(baseline)
        stage.flops = None if fwd is None else 2 * fwd * len(ds.x_val)
        result = {
            "baseline_accuracy": base_acc,
            "finetuned_accuracy": ft_acc,
            "accuracy_drop": drop,
            "max_accuracy_drop": rec.max_accuracy_drop,
            "passed": passed,
            "val_samples": int(len(ds.x_val)),
        }
        atomic_write_json(run.validation, result)
        stage.accuracy = ft_acc
        stage.details = result
    return ValidationResult(
        "validate",
        stage.entry.to_dict(),
        {"validation": str(run.validation)},
        baseline_accuracy=base_acc,
        finetuned_accuracy=ft_acc,
        accuracy_drop=drop,
        max_accuracy_drop=rec.max_accuracy_drop,
        passed=passed,
    )
