"""The run folder: one folder per pipeline run, with a fixed layout and atomic writes.

Layout of `RUN/` (default `savedmodels/<run-name>/`)::

    manifest.json        how the run was set up (data spec, architecture, strategy, seed)
    baseline.keras       step 1 (`train_baseline`)
    recipe.yaml          step 2 (`configure`)
    checkpoint.keras     step 3 while it runs: the wrapped model after the last finished epoch
    checkpoint.json      the epoch that checkpoint belongs to (for `--resume`)
    jit_decision.json    the measured `jit_compile: auto` decision, reused by later runs
    finetuned.keras      step 3 (`finetune`)
    methods/<name>.json  step 3: the state each method needs at deploy (`Method.save_state`)
    validation.json      step 4 (`validate`)
    export/              step 5 (`deploy`): saved_model/, model.tflite, baseline.tflite, deploy.json
    energy/<stage>/      energy.json and energy.csv of each stage's last successful run
    energy/<stage>.failed/  the same for the last failed attempt (the energy it spent)
    report.json          one entry per stage (what `keras-lean report` prints)

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted stage never leaves a half-written artifact behind, and earlier stages' files are never
touched by a later stage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keras_lean._files import atomic_write_bytes, temp_dir_beside, temp_file_beside

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from keras_lean.pipeline.steps.stage import StageEntry

#: Which step writes each artifact, used to say which step to run first.
PRODUCED_BY = {
    "baseline.keras": "baseline",
    "recipe.yaml": "configure",
    "finetuned.keras": "finetune",
    "validation.json": "validate",
    "export": "deploy",
    "report.json": "baseline",
}

#: The order of the stages in the report.
STAGES = ("baseline", "configure", "finetune", "validate", "deploy")


class MissingStepError(FileNotFoundError):
    """A step's input is missing: an earlier step has not been run in this run folder."""


def _tmp_name(path: Path, suffix: str = "") -> Path:
    # With the umask's mode (not mkstemp's 0600): the rename keeps it, and run folders are shared.
    return temp_file_beside(path, suffix)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes `obj` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable))


def _jsonable(obj: Any) -> Any:
    # numpy scalars and arrays, Paths and dataclasses with to_dict end up in reports.
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def save_model_atomic(model: keras.Model, path: str | os.PathLike) -> Path:
    """Saves a Keras model to a `.keras` file through a temporary name and a rename.

    Args:
        model: the model to save.
        path: destination; must end in `.keras`.

    Returns:
        The destination as a `Path`.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Model files must end in '.keras'. Received: path={str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, suffix=".keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it replaces `path` in one rename.

    On an exception the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(path)  # the umask's folder mode, not mkdtemp's 0700
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class RunDir:
    """One run folder: paths of its artifacts, its manifest and its report.

    Args:
        root: the folder (created on first write).

    Example:
        >>> run = RunDir("savedmodels/default")
        >>> run.baseline.name
        'baseline.keras'
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.resolve().name

    # Artifacts -----------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline.keras"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.keras"

    @property
    def checkpoint_state(self) -> Path:
        return self.root / "checkpoint.json"

    @property
    def jit_decision(self) -> Path:
        return self.root / "jit_decision.json"

    @property
    def finetuned(self) -> Path:
        return self.root / "finetuned.keras"

    @property
    def validation(self) -> Path:
        return self.root / "validation.json"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def method_state_dir(self) -> Path:
        """`RUN/methods/`: what each method saved at finetune for deploy (`<name>.json`)."""
        return self.root / "methods"

    @property
    def report_file(self) -> Path:
        return self.root / "report.json"

    def energy_dir(self, stage: str) -> Path:
        return self.root / "energy" / stage

    def require(self, path: Path, *, for_step: str) -> Path:
        """Returns `path` if it exists, else raises `MissingStepError` naming the step to run.

        Args:
            path: an artifact of this run folder.
            for_step: the step that needs it (for the message).

        Raises:
            MissingStepError: if `path` does not exist.
        """
        if path.exists():
            return path
        producer = PRODUCED_BY.get(path.name, "an earlier step")
        raise MissingStepError(
            f"{for_step}: {path} not found; run `keras-lean {producer} --out {self.root}` first."
        )

    # Manifest ------------------------------------------------------------------------------
    def read_manifest(self) -> dict:
        """Returns the manifest, or `{}` when the folder has none yet."""
        if not self.manifest.exists():
            return {}
        return _read_json(self.manifest)

    def update_manifest(self, **fields: Any) -> dict:
        """Merges `fields` into the manifest and writes it back atomically."""
        manifest = self.read_manifest()
        manifest.update(fields)
        atomic_write_json(self.manifest, manifest)
        return manifest

    # Report --------------------------------------------------------------------------------
    def read_report(self) -> list[dict]:
        """Returns the stage entries of `report.json` (empty when there is none)."""
        if not self.report_file.exists():
            return []
        data = _read_json(self.report_file)
        stages = data.get("stages") if isinstance(data, dict) else None
        if not isinstance(stages, list):
            raise ValueError(
                f"{self.report_file} is not a keras_lean report: expected an object with a "
                f"'stages' list."
            )
        return stages

    def read_entries(self) -> list[StageEntry]:
        """Returns the stage entries of `report.json` as `StageEntry`s (empty when none).

        Raises:
            ValueError: the file is not a keras_lean report, or an entry lacks a field.
        """
        from keras_lean.pipeline.steps.stage import StageEntry

        return [StageEntry.from_dict(s) for s in self.read_report()]

    def record_stage(self, entry: dict) -> list[dict]:
        """Adds one stage entry to `report.json`, replacing an earlier entry of the same stage.

        A re-run stage replaces its old entry (the report describes the artifacts on disk);
        entries stay in pipeline order.
        """
        stages = [s for s in self.read_report() if s.get("stage") != entry["stage"]]
        stages.append(entry)
        order = {name: i for i, name in enumerate(STAGES)}
        stages.sort(key=lambda s: order.get(s.get("stage"), len(order)))
        atomic_write_json(self.report_file, {"version": 1, "run": self.name, "stages": stages})
        return stages


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
