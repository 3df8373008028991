"""The five-step pipeline: baseline -> configure -> finetune -> validate -> deploy.

`keras_lean.pipeline.sweep.sweep(...)` runs many methods and targets over one baseline (the
submodule is not re-exported here, so `keras_lean.pipeline.sweep` stays the module).

Each step is a public function over one run folder (`savedmodels/<run-name>/` by default); the
`keras-lean` CLI is a thin shell over them. The names below are resolved on first use, so
importing this package (or one of its light modules, such as `strategy` or `models`) imports
neither TensorFlow nor Keras; the steps do when they run.

Example:
    >>> from keras_lean.pipeline import train_baseline, configure, finetune, validate, deploy
    >>> train_baseline("savedmodels/demo")           # digits + built-in CNN
    >>> configure("savedmodels/demo", target_sparsity=0.8)
    >>> finetune("savedmodels/demo")
    >>> validate("savedmodels/demo").passed
    True
    >>> deploy("savedmodels/demo", quantization="dynamic")
"""

from __future__ import annotations

import importlib

# Public name -> module that defines it.
_EXPORTS = {
    "check_data_against_model": "keras_lean.pipeline.data",
    "load_data": "keras_lean.pipeline.data",
    "ARCHITECTURES": "keras_lean.pipeline.models",
    "build_model": "keras_lean.pipeline.models",
    "load_model": "keras_lean.pipeline.models",
    "RECIPE_VERSION": "keras_lean.pipeline.recipe",
    "SECTIONS": "keras_lean.pipeline.recipe",
    "EarlyStoppingOptions": "keras_lean.pipeline.recipe",
    "ExportOptions": "keras_lean.pipeline.recipe",
    "FinetuneOptions": "keras_lean.pipeline.recipe",
    "GuardOptions": "keras_lean.pipeline.recipe",
    "Recipe": "keras_lean.pipeline.recipe",
    "load_recipe": "keras_lean.pipeline.recipe",
    "recipe_to_yaml": "keras_lean.pipeline.recipe",
    "RecipeOverrides": "keras_lean.pipeline.overrides",
    "MissingStepError": "keras_lean.pipeline.rundir",
    "RunDir": "keras_lean.pipeline.rundir",
    "STRATEGIES": "keras_lean.pipeline.strategy",
    "get_strategy": "keras_lean.pipeline.strategy",
    **{
        name: "keras_lean.pipeline.steps"
        for name in (
            "DenseReferenceError",
            "JitDecision",
            "RunReport",
            "RunResult",
            "StageEntry",
            "StageResult",
            "ValidationResult",
            "configure",
            "decide_jit_compile",
            "dense_reference",
            "deploy",
            "finetune",
            "report",
            "run",
            "run_dir_for",
            "train_baseline",
            "validate",
        )
    },
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module 'keras_lean.pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
