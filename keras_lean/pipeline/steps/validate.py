"""Step 4: evaluate baseline and fine-tuned models on the validation data; the gate."""

from __future__ import annotations

import os

from keras_lean.pipeline.data import check_data_against_model
from keras_lean.pipeline.guard import StageGate
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

    Writes `RUN/validation.json`. The gate's metric follows the task: a classifier passes when
    the accuracy drop (baseline minus fine-tuned, absolute) is at most the recipe's
    `max_metric_drop.accuracy` (alias `max_accuracy_drop`); a causal LM passes when the
    perplexity rise, relative (`(ppl_finetuned - ppl_baseline) / ppl_baseline`, both over every
    next-token position of the validation windows), is at most `max_metric_drop.perplexity`.
    Accuracy (token accuracy for a causal LM) is reported either way.

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
        finetuned = load_model(run.finetuned)
        base_acc = evaluate(baseline, ds)
        ft_acc = evaluate(finetuned, ds)
        accuracy_gate = StageGate("accuracy", None, base_acc, rec.max_accuracy_drop)
        drop = accuracy_gate.change(ft_acc)
        gate = _perplexity_gate(manifest, rec, baseline, finetuned, ds)
        passed = gate["passed"] if gate else accuracy_gate.within(ft_acc)
        fwd = forward_flops(baseline)
        stage.flops = None if fwd is None else 2 * fwd * len(ds.x_val)
        result = {
            "baseline_accuracy": base_acc,
            "finetuned_accuracy": ft_acc,
            "accuracy_drop": drop,
            "max_accuracy_drop": rec.max_accuracy_drop,
            "passed": passed,
            "val_samples": int(len(ds.x_val)),
            "metric": "perplexity" if gate else "accuracy",
            **(gate or {}),
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


def _perplexity_gate(manifest: dict, rec, baseline, finetuned, ds) -> dict | None:
    """The perplexity figures and verdict of a causal-LM run (None for a classifier)."""
    from keras_lean.pipeline import text as _text

    if (manifest.get("text") or {}).get("task") != _text.CAUSAL_LM:
        return None
    logits = bool(manifest.get("from_logits", True))
    base = _text.lm_perplexity(baseline, ds, from_logits=logits)
    tuned = _text.lm_perplexity(finetuned, ds, from_logits=logits)
    gate = StageGate("perplexity", None, base, rec.max_perplexity_rise)
    rise = gate.change(tuned)
    return {
        "baseline_perplexity": base,
        "finetuned_perplexity": tuned,
        "perplexity_rise": rise,
        "max_perplexity_rise": rec.max_perplexity_rise,
        "passed": gate.within(tuned),
    }
