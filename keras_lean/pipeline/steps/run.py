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
from keras_lean.pipeline.steps.dense_reference import DenseReferenceError, dense_reference
from keras_lean.pipeline.steps.deploy import deploy
from keras_lean.pipeline.steps.finetune import finetune
from keras_lean.pipeline.steps.stage import DEFAULT_CARBON_INTENSITY
from keras_lean.pipeline.steps.validate import validate


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What `run` does when the caller names no method and no recipe.

    The caller's own recipe fields (epochs, target, `settings`, ...) still apply over it.

    Attributes:
        overrides: the recipe fields it sets.
        compare_dense: whether the run ends with the dense reference (unless the caller says).
    """

    overrides: RecipeOverrides
    compare_dense: bool = False


#: The recipe defaults: magnitude pruning to 80 %, no dense comparison.
RECIPE_DEFAULTS = Experiment(RecipeOverrides())
#: Structured 30 %, progressive (channels removed while fine-tuning), against dense.
STRUCTURED_30_PROGRESSIVE = Experiment(
    RecipeOverrides(
        methods=("structured",), target_sparsity=0.3, settings=("structured.mode=progressive",)
    ),
    compare_dense=True,
)
#: `run` (and `keras-lean run`) with no method and no recipe runs this experiment.
DEFAULT_EXPERIMENT = RECIPE_DEFAULTS


def _with_default_experiment(
    recipe, overrides: RecipeOverrides, compare_dense: bool | None
) -> tuple[RecipeOverrides, bool]:
    """The overrides and dense-comparison choice `run` uses: the caller's, over
    `DEFAULT_EXPERIMENT`'s when the caller names no method and no recipe."""
    if recipe is not None or overrides.methods is not None:
        return overrides, bool(compare_dense)
    exp = DEFAULT_EXPERIMENT
    given = {
        f.name: getattr(overrides, f.name)
        for f in dataclasses.fields(overrides)
        if getattr(overrides, f.name) is not None
    }
    settings = (*(exp.overrides.settings or ()), *(overrides.settings or ()))
    given["settings"] = settings or None  # the caller's settings come last: they win
    merged = dataclasses.replace(exp.overrides, **given)
    return merged, exp.compare_dense if compare_dense is None else bool(compare_dense)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """`run`'s result: one `StageResult` per step (deploy is None when validation failed;
    dense_reference is None unless `compare_dense`)."""

    baseline: StageResult
    configure: StageResult
    finetune: StageResult
    validation: ValidationResult
    deploy: StageResult | None
    dense_reference: StageResult | None = None

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
    compare_dense: bool | None = None,
    dense_callbacks: Sequence = (),
    **fields,
) -> RunResult:
    """Runs the five steps in order with the same options (see each step for them).

    With no options: scikit-learn digits, the built-in CNN and `DEFAULT_EXPERIMENT` (the
    recipe defaults, magnitude pruning to 80 %; `STRUCTURED_30_PROGRESSIVE` is the other
    experiment defined here). The recipe is written fresh (an existing `recipe.yaml` is
    replaced). Deploy is skipped when validation fails (`result.passed` is False). The baseline
    trains with the overrides' batch size and learning rate where given.

    With `compare_dense`, the run ends with `dense_reference`: the same baseline fine-tuned with
    no method (same epochs, data order, seed, batch size, learning rate and optimizer) in its
    own energy window, recorded as stage `dense_reference` with the saving in its
    `details.comparison` (`RunReport.dense_comparison()`). It runs after validate and deploy,
    so when it fails every other step's artifacts are complete and kept.

    Args:
        out, data, arch, model_path, sequence_length, val_split, seed, strategy,
            carbon_intensity, pue, cpu_tdp_w, verbose: as for `train_baseline`.
        baseline_epochs: `train_baseline`'s epochs.
        recipe: a recipe file to start from (`configure`).
        overrides: recipe fields to set (`RecipeOverrides`); or give them as keywords.
        callbacks: extra Keras callbacks for the fine-tune fit (`finetune`).
        baseline_callbacks: extra Keras callbacks for the baseline's training fit.
        compare_dense: also fine-tune the baseline densely and record the comparison (None:
            as `DEFAULT_EXPERIMENT` says when no method and no recipe is given, else no).
        dense_callbacks: extra Keras callbacks for the dense reference's fit.

    Returns:
        A `RunResult`.

    Raises:
        DenseReferenceError: the dense reference failed (`e.result` holds the other steps'
            `RunResult`; their artifacts are on disk).
    """
    if overrides is None:
        overrides = RecipeOverrides.from_kwargs(**fields)
    elif fields:
        raise TypeError(
            f"Pass the recipe fields either as overrides= or as keywords, not both. "
            f"Received keywords: {', '.join(sorted(fields))}"
        )
    overrides, compare_dense = _with_default_experiment(recipe, overrides, compare_dense)
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
        result = RunResult(b, c, f, v, d)
        if compare_dense:
            try:
                dense = dense_reference(run_, verbose=verbose, callbacks=dense_callbacks)
            except Exception as e:  # the pruned run is complete: say so, keep its result
                raise DenseReferenceError(
                    f"dense reference failed ({type(e).__name__}: {e}); the other steps' "
                    f"artifacts in {run_.root} are complete and kept. Rerun only the "
                    f"comparison with keras_lean.pipeline.dense_reference({str(run_.root)!r}).",
                    result,
                ) from e
            result = dataclasses.replace(result, dense_reference=dense)
    return result
