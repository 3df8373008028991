"""The five pipeline steps (and `run`, `report`): each reads and writes one run folder.

    train_baseline -> configure -> finetune -> validate -> deploy

Every step runs inside an energy window named after it (`stage.py`), writes its artifacts
atomically into the run folder (see `keras_lean.pipeline.rundir`) and records one `StageEntry`
in `RUN/report.json`: stage, time, energy (J, kWh, measured/estimated label), CO2, training compute
(FLOPs), accuracy, parameters, nonzero parameters and gzip size. A step whose inputs are missing
raises `MissingStepError` naming the step to run first; a failing step leaves earlier artifacts
untouched.

One module per step (`baseline`, `configure`, `finetune`, `validate`, `deploy`, `run`), plus
`dense_reference` (the same baseline fine-tuned with no method, for `run(compare_dense=True)`),
`stage` (the energy window and its typed entry), `jit` (the XLA probe), `precision` (mixed
precision), `checkpoint` (per-epoch checkpoints and resume), `report` (rendering) and `common`.
The step functions shadow their modules' names here (`steps.finetune` is the function); reach a
module with `importlib.import_module("keras_lean.pipeline.steps.finetune")`.

Example:
    >>> from keras_lean.pipeline import run
    >>> result = run("savedmodels/default")      # digits, CNN, magnitude pruning to 80 %
    >>> result.validation.passed, result.deploy.entry["gzip_bytes"]
"""

from __future__ import annotations

from keras_lean.pipeline.recipe import SECTIONS
from keras_lean.pipeline.steps.baseline import train_baseline
from keras_lean.pipeline.steps.common import (
    DEFAULT_ROOT,
    DEFAULT_RUN_NAME,
    StageResult,
    ValidationResult,
    run_dir_for,
)
from keras_lean.pipeline.steps.configure import configure
from keras_lean.pipeline.steps.dense_reference import DenseReferenceError, dense_reference
from keras_lean.pipeline.steps.deploy import deploy
from keras_lean.pipeline.steps.finetune import FinetuneContext, PipelineFit, finetune
from keras_lean.pipeline.steps.jit import JitDecision, decide_jit_compile
from keras_lean.pipeline.steps.report import RunReport, report
from keras_lean.pipeline.steps.run import RunResult, run
from keras_lean.pipeline.steps.stage import StageEntry, StageRecorder
from keras_lean.pipeline.steps.validate import validate

__all__ = [
    "DEFAULT_ROOT",
    "DEFAULT_RUN_NAME",
    "SECTIONS",
    "DenseReferenceError",
    "FinetuneContext",
    "JitDecision",
    "PipelineFit",
    "RunReport",
    "RunResult",
    "StageEntry",
    "StageRecorder",
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
]
