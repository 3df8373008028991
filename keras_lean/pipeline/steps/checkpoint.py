"""Per-epoch checkpoints of the finetune step, and reading them back for `--resume`."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from keras_lean.pipeline.recipe import Recipe
from keras_lean.pipeline.rundir import RunDir, atomic_write_json, save_model_atomic


def recipe_digest(rec: Recipe) -> str:
    """A short hash of the recipe: a checkpoint resumes only the recipe that made it."""
    return hashlib.sha256(json.dumps(rec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def epoch_checkpoint(run: RunDir, state: dict):
    """A Keras callback saving the model after every epoch (atomically), the epoch beside it.

    Args:
        run: the run folder (`checkpoint.keras`, `checkpoint.json`).
        state: what `checkpoint.json` records besides the epoch (recipe digest, method reports).
    """
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            model = self.model
            if isinstance(model, keras.distillation.Distiller):
                model = model.student  # distilled fit: the student (compiled, with its optimizer)
            save_checkpoint(run, model, {**state, "epoch": epoch + 1})

    return Checkpoint()


def save_checkpoint(run: RunDir, model, state: dict) -> None:
    """Saves `model` (compiled, with its optimizer state) and `state` (with its `epoch`: epochs
    finished) atomically; the model first, so a state never names a model that is not there.

    A method that runs its own loop checkpoints through this too (`PipelineFit.epoch_end`):
    structured progressive saves the current shrunk model and, as `state["method_state"]`,
    what its run needs to continue (see `keras_lean.structured.progressive_state`).
    """
    save_model_atomic(model, run.checkpoint)
    atomic_write_json(run.checkpoint_state, state)


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a fine-tune starts.

    Attributes:
        epoch: the epoch to resume after (None: start from the baseline).
        state: `checkpoint.json` of that checkpoint (empty when starting over).
        note: why a requested resume started from the beginning (None otherwise).
    """

    epoch: int | None = None
    state: dict = dataclasses.field(default_factory=dict)
    note: str | None = None


def resume_point(run: RunDir, *, resume: bool, digest: str, guarded: bool) -> ResumePoint:
    """Reads the checkpoint a `resume=True` fine-tune continues from.

    Raises:
        ValueError: the checkpoint was made with a different recipe.
    """
    if not resume:
        return ResumePoint()
    if guarded:
        return ResumePoint(
            note="recipe.guard runs restart from the first stage: started from the beginning"
        )
    if not (run.checkpoint.exists() and run.checkpoint_state.exists()):
        return ResumePoint(note="no checkpoint for this recipe: started from the beginning")
    state = json.loads(run.checkpoint_state.read_text())
    if state.get("recipe") != digest:
        raise ValueError(
            f"{run.checkpoint} was made with a different recipe.yaml; fine-tune again "
            f"without --resume to start over."
        )
    return ResumePoint(epoch=int(state["epoch"]), state=state)


def remove_checkpoint(run: RunDir) -> None:
    """Deletes the checkpoint once the fine-tuned model is saved."""
    for p in (run.checkpoint, run.checkpoint_state):
        if p.exists():
            p.unlink()
