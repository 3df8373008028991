"""Helpers the steps share: run folders, data, loss, evaluation, sizes, the deploy chain."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keras_lean.pipeline.data import load_data
from keras_lean.pipeline.methods.base import Data
from keras_lean.pipeline.rundir import RunDir
from keras_lean.pipeline.rundir import _jsonable as json_default

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from keras_lean.pipeline.steps.stage import StageEntry, StageRecorder

DEFAULT_ROOT = Path("savedmodels")
DEFAULT_RUN_NAME = "default"
_EVAL_BATCH = 256


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What one step did.

    Attributes:
        stage: the step's name.
        entry: its `report.json` entry (`StageEntry.to_dict()`).
        artifacts: name -> path of the files it wrote.
    """

    stage: str
    entry: dict
    artifacts: dict

    @property
    def record(self) -> StageEntry:
        """The entry as a typed `StageEntry`."""
        from keras_lean.pipeline.steps.stage import StageEntry

        return StageEntry.from_dict(self.entry)


@dataclasses.dataclass(frozen=True)
class ValidationResult(StageResult):
    """`validate`'s result.

    Attributes:
        baseline_accuracy: validation accuracy of `baseline.keras`.
        finetuned_accuracy: validation accuracy of `finetuned.keras`.
        accuracy_drop: baseline minus fine-tuned (negative when fine-tuning improved it).
        max_accuracy_drop: the recipe's gate.
        passed: `accuracy_drop <= max_accuracy_drop`.
    """

    baseline_accuracy: float = 0.0
    finetuned_accuracy: float = 0.0
    accuracy_drop: float = 0.0
    max_accuracy_drop: float = 0.0
    passed: bool = False


def stage_result(stage: str, recorder: StageRecorder, artifacts: dict) -> StageResult:
    """The `StageResult` of a stage whose recorder holds its entry."""
    return StageResult(stage, recorder.entry.to_dict(), artifacts)


def run_dir_for(out: str | os.PathLike | None = None, run_name: str | None = None) -> RunDir:
    """Returns the run folder: `out` if given, else `savedmodels/<run_name or 'default'>`."""
    if out is not None:
        return RunDir(out)
    return RunDir(DEFAULT_ROOT / (run_name or DEFAULT_RUN_NAME))


def as_run(out: str | os.PathLike | RunDir) -> RunDir:
    return out if isinstance(out, RunDir) else RunDir(out)


def load_run_data(manifest: dict, data: str | os.PathLike | None, val_split: float | None) -> Data:
    """The run's data (or `data` / `val_split` where given), split with the run's seed."""
    spec = str(data) if data is not None else manifest.get("data", "digits")
    if (manifest.get("text") or {}).get("task") == "causal_lm":  # next-token windows, (n, L)
        from keras_lean.pipeline.text import load_causal_lm_data

        return load_causal_lm_data(spec)
    split = val_split if val_split is not None else manifest.get("val_split", 0.2)
    return load_data(spec, val_split=split, seed=manifest.get("seed", 0))


def data_spec(data: str | os.PathLike) -> str:
    """Stores file and folder data as absolute paths, so later steps find them from anywhere."""
    s = str(data)
    return s if s == "digits" else str(Path(s).resolve())


def classification_loss(from_logits: bool):
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def outputs_are_probabilities(model: keras.Model, x) -> bool:
    import numpy as np

    out = np.asarray(model.predict(x[:64], verbose=0), dtype="float64")
    return bool(
        out.ndim == 2
        and np.all(out >= -1e-6)
        and np.all(out <= 1 + 1e-6)
        and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    )


def evaluate(model: keras.Model, data: Data) -> float:
    """Validation accuracy: argmax of the outputs against the labels.

    The argmax is the same for logits and probabilities, so the output kind does not matter.
    Uses `predict` so the model's compile state (optimizer, strategy) is left untouched.
    """
    import numpy as np

    out = np.asarray(model.predict(data.x_val, batch_size=_EVAL_BATCH, verbose=0))
    return float(np.mean(out.argmax(axis=-1) == data.y_val))


def forward_flops(model: keras.Model) -> int | None:
    """Forward FLOPs per sample from `keras_lean.flops`, or None where it cannot count."""
    try:
        from keras_lean.flops import count_flops

        return int(count_flops(model).total)
    except Exception:  # an exotic layer the counter rejects must not fail a stage
        return None


def fill_sizes(recorder: StageRecorder, deployable: keras.Model) -> None:
    """Records the parameters, nonzero parameters and gzip size of `deployable`."""
    from keras_lean.export import weight_sizes

    sizes = weight_sizes(deployable)
    recorder.set_sizes(sizes.params, sizes.nonzero_params, sizes.gzip_bytes)


def finalize_chain(model: keras.Model, methods: Sequence) -> keras.Model:
    """The deploy chain: each method's `finalize`, last-applied first (unwrap in reverse)."""
    for method in sorted(methods, key=lambda m: m.order, reverse=True):
        model = method.finalize(model)
    return model


def save_method_states(run: RunDir, methods: Sequence) -> None:
    """Each method writes what it learned to `RUN/methods/<name>.json` (`Method.save_state`)."""
    for m in methods:
        m.save_state(run.method_state_dir)


def load_method_states(run: RunDir, methods: Sequence) -> None:
    """Each method reads back what it saved (`Method.load_state`; a missing file is no error:
    the method then knows only its options)."""
    for m in methods:
        m.load_state(run.method_state_dir)


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types: what `report.json` can hold (numpy values, paths and
    `to_dict()` objects as the run folder writes them, anything else as its str)."""

    def default(o: Any) -> Any:
        try:
            return json_default(o)
        except TypeError:
            return str(o)

    return json.loads(json.dumps(obj, default=default))
