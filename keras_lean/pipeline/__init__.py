"""The five-step pipeline: baseline -> configure -> finetune -> validate -> deploy.

`keras_lean.pipeline.sweep.sweep(...)` runs many methods and targets over one baseline (the
submodule is not re-exported here, so `keras_lean.pipeline.sweep` stays the module).

Each step is a public function over one run folder (`savedmodels/<run-name>/` by default); the
`keras-lean` CLI is a thin shell over them. Importing this package imports neither TensorFlow
nor Keras; the steps do when they run.

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

from keras_lean.pipeline.data import check_data_against_model, load_data
from keras_lean.pipeline.models import ARCHITECTURES, build_model, load_model
from keras_lean.pipeline.recipe import (
    RECIPE_VERSION,
    SECTIONS,
    EarlyStoppingOptions,
    ExportOptions,
    FinetuneOptions,
    GuardOptions,
    Recipe,
    load_recipe,
    recipe_to_yaml,
)
from keras_lean.pipeline.rundir import MissingStepError, RunDir
from keras_lean.pipeline.steps import (
    JitDecision,
    RunReport,
    RunResult,
    StageResult,
    ValidationResult,
    configure,
    decide_jit_compile,
    deploy,
    finetune,
    report,
    run,
    run_dir_for,
    train_baseline,
    validate,
)
from keras_lean.pipeline.strategy import STRATEGIES, get_strategy

__all__ = [
    "ARCHITECTURES",
    "RECIPE_VERSION",
    "SECTIONS",
    "STRATEGIES",
    "EarlyStoppingOptions",
    "ExportOptions",
    "FinetuneOptions",
    "GuardOptions",
    "JitDecision",
    "MissingStepError",
    "Recipe",
    "RunDir",
    "RunReport",
    "RunResult",
    "StageResult",
    "ValidationResult",
    "build_model",
    "check_data_against_model",
    "configure",
    "decide_jit_compile",
    "deploy",
    "finetune",
    "get_strategy",
    "load_data",
    "load_model",
    "load_recipe",
    "recipe_to_yaml",
    "report",
    "run",
    "run_dir_for",
    "train_baseline",
    "validate",
]
