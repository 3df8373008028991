"""All five steps in order, with one set of options."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from keras_lean.pipeline.lock import run_lock
from keras_lean.pipeline.overrides import RecipeOverrides
from keras_lean.pipeline.rundir import RunDir
from keras_lean.pipeline.steps.baseline import train_baseline
from keras_lean.pipeline.steps.common import StageResult, ValidationResult, as_run
from keras_lean.pipeline.steps.configure import base_recipe, configure
from keras_lean.pipeline.steps.deploy import deploy
from keras_lean.pipeline.steps.finetune import finetune
from keras_lean.pipeline.steps.stage import DEFAULT_CARBON_INTENSITY
from keras_lean.pipeline.steps.validate import validate


@dataclasses.dataclass(frozen=True)
class RunResult:
    """`run`'s result: one `StageResult` per step (deploy is None when validation failed)."""

    baseline: StageResult
    configure: StageResult
    finetune: StageResult
    validation: ValidationResult
    deploy: StageResult | None

    @property
    def passed(self) -> bool:
        return self.validation.passed


def run(
    out: str | os.PathLike | RunDir,
    *,
    data: str | os.PathLike = "digits",
    arch: str = "cnn",
    model_path: str | os.PathLike | None = None,
    sequence_length: int | None = None,
    baseline_epochs: int = 8,
    val_split: float = 0.2,
    seed: int = 0,
    strategy: str = "default",
    recipe: str | os.PathLike | None = None,
    overrides: RecipeOverrides | None = None,
    carbon_intensity: float | str = DEFAULT_CARBON_INTENSITY,
    pue: float = 1.0,
    cpu_tdp_w: float | None = None,
    verbose: int = 1,
    callbacks: Sequence = (),
    baseline_callbacks: Sequence = (),
    **fields,
) -> RunResult:
    """Runs the five steps in order with the same options (see each step for them).

    With no options: scikit-learn digits, the built-in CNN, magnitude pruning to 80 %. The
    recipe is written fresh (an existing `recipe.yaml` is replaced). Deploy is skipped when
    validation fails (`result.passed` is False). The baseline trains with the overrides' batch
    size and learning rate where given.

    Args:
        out, data, arch, model_path, sequence_length, val_split, seed, strategy,
            carbon_intensity, pue, cpu_tdp_w, verbose: as for `train_baseline`.
        baseline_epochs: `train_baseline`'s epochs.
        recipe: a recipe file to start from (`configure`).
        overrides: recipe fields to set (`RecipeOverrides`); or give them as keywords.
        callbacks: extra Keras callbacks for the fine-tune fit (`finetune`).
        baseline_callbacks: extra Keras callbacks for the baseline's training fit.

    Returns:
        A `RunResult`.
    """
    if overrides is None:
        overrides = RecipeOverrides.from_kwargs(**fields)
    elif fields:
        raise TypeError(
            f"Pass the recipe fields either as overrides= or as keywords, not both. "
            f"Received keywords: {', '.join(sorted(fields))}"
        )
    run_ = as_run(out)
    # One lock for the five steps (finetune's own lock nests in it).
    with run_lock(run_.root, "run", create=True):
        # Validate the recipe options before training anything, so a typo fails in a second.
        base_recipe(recipe, overrides)
        b = train_baseline(
            run_,
            data=data,
            arch=arch,
            model_path=model_path,
            sequence_length=sequence_length,
            epochs=baseline_epochs,
            batch_size=overrides.batch_size or 32,
            learning_rate=overrides.learning_rate or 1e-3,
            val_split=val_split,
            seed=seed,
            strategy=strategy,
            carbon_intensity=carbon_intensity,
            pue=pue,
            cpu_tdp_w=cpu_tdp_w,
            verbose=verbose,
            callbacks=baseline_callbacks,
        )
        c = configure(run_, recipe=recipe, overrides=overrides, force=True)
        f = finetune(run_, verbose=verbose, callbacks=callbacks)
        v = validate(run_)
        d = deploy(run_) if v.passed else None
    return RunResult(b, c, f, v, d)
