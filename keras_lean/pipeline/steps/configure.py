"""Step 2: write `RUN/recipe.yaml`, a commented recipe listing the model's prunable layers."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from keras_lean.pipeline.models import load_model
from keras_lean.pipeline.overrides import RecipeOverrides
from keras_lean.pipeline.recipe import Recipe, load_recipe, recipe_to_yaml
from keras_lean.pipeline.rundir import RunDir, atomic_write_text
from keras_lean.pipeline.steps.common import StageResult, as_run, stage_result
from keras_lean.pipeline.steps.stage import _stage

if TYPE_CHECKING:  # pragma: no cover
    import keras


def base_recipe(recipe: str | os.PathLike | None, overrides: RecipeOverrides | None) -> Recipe:
    """The recipe file (or the defaults) with `overrides` applied and validated."""
    base = load_recipe(recipe) if recipe is not None else Recipe()
    return overrides.apply(base) if overrides is not None else base


def configure(
    out: str | os.PathLike | RunDir,
    *,
    recipe: str | os.PathLike | None = None,
    overrides: RecipeOverrides | None = None,
    force: bool = False,
    **fields,
) -> StageResult:
    """Step 2: writes `RUN/recipe.yaml`, a commented recipe listing the model's prunable layers.

    Starts from `recipe` (a YAML file) or the defaults, then sets the fields of `overrides`.

    Args:
        out: the run folder (must hold `baseline.keras`).
        recipe: a recipe file to start from.
        overrides: recipe fields to set (`RecipeOverrides`: methods, target_sparsity, epochs,
            batch_size, learning_rate, jit_compile, mixed_precision, quantization,
            max_accuracy_drop).
        force: overwrite an existing `recipe.yaml` (otherwise it is an error, so hand edits are
            not lost).
        **fields: the same overrides as keywords (`configure(run, epochs=2)`), when
            `overrides` is not given.

    Returns:
        A `StageResult` (artifact `recipe`).

    Raises:
        MissingStepError: no baseline yet.
        FileExistsError: `recipe.yaml` exists and `force` is False.
        ValueError: an invalid value (naming the recipe field).
        TypeError: an unknown keyword, or both `overrides` and keywords.
    """
    overrides = _overrides(overrides, fields)
    run = as_run(out)
    run.require(run.baseline, for_step="configure")
    if run.recipe.exists() and not force:
        raise FileExistsError(
            f"{run.recipe} exists (it may hold your edits); pass force=True (--force) to "
            f"overwrite it."
        )
    rec = base_recipe(recipe, overrides)
    manifest = run.read_manifest()
    with _stage(run, "configure", manifest) as stage:
        model = load_model(run.baseline)
        layers = prunable_layers(model)
        header = (
            f"keras_lean recipe for run {run.name!r} (model {model.name!r}).\n"
            "Edit it, then run `keras-lean finetune`. Reference: docs/recipe.md.\n"
            "Unknown keys are errors; every field below is shown with its value."
        )
        text = recipe_to_yaml(rec, header=header, layers=layers)
        atomic_write_text(run.recipe, text)
        stage.details = {"methods": list(rec.methods), "prunable_layers": layers}
    return stage_result("configure", stage, {"recipe": str(run.recipe)})


def _overrides(overrides: RecipeOverrides | None, fields: dict) -> RecipeOverrides:
    if fields and overrides is not None:
        raise TypeError(
            f"Pass the recipe fields either as overrides= or as keywords, not both. "
            f"Received keywords: {', '.join(sorted(fields))}"
        )
    return overrides if overrides is not None else RecipeOverrides.from_kwargs(**fields)


def prunable_layers(model: keras.Model) -> list[str]:
    """`name (Class, N params)` of every prunable layer, nested models walked."""
    from keras_lean.sparsity import is_prunable

    out = []

    def walk(m):
        for layer in m.layers:
            if hasattr(layer, "layers") and not is_prunable(layer):
                walk(layer)
            elif is_prunable(layer):
                n = sum(int(math.prod(w.shape)) for w in layer.weights)
                out.append(f"{layer.name} ({type(layer).__name__}, {n} params)")

    walk(model)
    return out
