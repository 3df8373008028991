"""The dense reference: the same baseline fine-tuned with no method, in its own energy window.

    finetune(run); dense_reference(run)     # stage "dense_reference", RUN/dense_reference.keras

What did pruning save against plain fine-tuning? `dense_reference` fine-tunes `baseline.keras`
again with the recipe's training settings and none of its methods, through the finetune step's
own `PipelineFit` (so the optimizer, Adam at `finetune.learning_rate`, the batch size, the seed
and the epoch-ordered data are the pipeline's): with the strategy, mixed precision and XLA choice
the fine-tune used, for as many epochs as it ran (all guard stages together; the epochs early
stopping left), in one fit, without early stopping, guard stages or distillation. It saves the
model after every epoch as the fine-tune's checkpoint does (to a scratch file, deleted at the end),
so neither window pays for something the other skips.

Around its training the stage does what the finetune stage does (load, evaluate, save, count
sizes and FLOPs), so the two windows are comparable; the one-off XLA measurement of
`jit_compile: auto` is left out of the fine-tune's figure (it is paid once per run folder and
reported apart). The stage writes only its own files (`RUN/dense_reference.keras`,
`energy/dense_reference/` and its `report.json` entry, whose `details.comparison` holds the
saving); the pruned artifacts are never touched, and a failed dense run records nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from keras_lean.pipeline.data import check_data_against_model
from keras_lean.pipeline.lock import run_lock
from keras_lean.pipeline.models import load_model
from keras_lean.pipeline.recipe import load_recipe
from keras_lean.pipeline.rundir import MissingStepError, RunDir, save_model_atomic
from keras_lean.pipeline.steps.common import (
    StageResult,
    as_run,
    classification_loss,
    evaluate,
    fill_sizes,
    forward_flops,
    jsonable,
    load_run_data,
    stage_result,
)
from keras_lean.pipeline.steps.finetune import PipelineFit
from keras_lean.pipeline.steps.precision import with_mixed_precision
from keras_lean.pipeline.steps.stage import StageEntry, _stage
from keras_lean.pipeline.strategy import get_strategy

#: The stage's name in `report.json` and `energy/`.
STAGE = "dense_reference"
#: The dense model's file in the run folder.
DENSE_MODEL = "dense_reference.keras"
#: The per-epoch save that mirrors the fine-tune's checkpoint; deleted when the stage ends.
_SCRATCH_CHECKPOINT = "dense_reference.checkpoint.keras"
#: U+2212, the minus sign of the comparison line.
_MINUS = "\u2212"


class DenseReferenceError(RuntimeError):
    """The dense reference failed after the run's own steps succeeded.

    Attributes:
        result: what `run` completed before it (a `RunResult` without a dense reference); its
            artifacts are on disk, untouched.
    """

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


def dense_reference(
    out: str | os.PathLike | RunDir,
    *,
    epochs: int | None = None,
    verbose: int = 1,
    callbacks: Sequence = (),
) -> StageResult:
    """Fine-tunes the baseline densely, as the recipe's fine-tune trained; records the saving.

    Args:
        out: the run folder (after `finetune`).
        epochs: epochs to train (default: as many as the fine-tune ran).
        verbose: Keras progress output.
        callbacks: extra Keras callbacks for the dense fit (a progress bar, an interrupt).

    Returns:
        A `StageResult` (stage `dense_reference`, artifact `dense_reference`); its entry's
        `details.comparison` is `compare(finetune entry, dense entry)`.

    Raises:
        MissingStepError: no baseline, recipe or fine-tune yet.
        ValueError: `epochs` below 1.
    """
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise ValueError(f"epochs must be an integer >= 1. Received: epochs={epochs!r}")
    run = as_run(out)
    run.require(run.baseline, for_step=STAGE)
    run.require(run.recipe, for_step=STAGE)
    run.require(run.finetuned, for_step=STAGE)
    ft_entry = _finetune_entry(run)
    with run_lock(run.root, STAGE):
        import keras

        rec = load_recipe(run.recipe)
        ft = rec.finetune
        manifest = run.read_manifest()
        details = ft_entry.details
        epochs = epochs or int(details.get("epochs_run") or ft.epochs)
        strategy_name = details.get("strategy") or manifest.get("strategy", "default")
        strategy = get_strategy(strategy_name)
        data = load_run_data(manifest, None, None)
        jit = bool((details.get("jit_compile") or {}).get("jit_compile", ft.jit_compile == "on"))
        keras.utils.set_random_seed(ft.seed)  # as finetune does before its stage
        with _stage(run, STAGE, manifest) as stage:
            with strategy.scope():
                model = load_model(run.baseline)
                check_data_against_model(data, model, model_name=str(run.baseline))
                if ft.mixed_precision:
                    model = with_mixed_precision(model)
            fit = PipelineFit(
                data=data,
                learning_rate=ft.learning_rate,
                loss=classification_loss(bool(manifest.get("from_logits", False))),
                jit_compile=jit,
                batch_size=ft.batch_size,
                epochs=epochs,
                strategy=strategy,
                tracker=stage.tracker,
                verbose=verbose,
                seed=ft.seed,
            )
            scratch = run.root / _SCRATCH_CHECKPOINT
            try:
                history = fit(
                    model, callbacks=[*callbacks, _epoch_save(scratch), fit.energy_callback()]
                )
            finally:
                scratch.unlink(missing_ok=True)
            epochs_run = len(history.history.get("loss", [])) or epochs
            stage.accuracy = evaluate(model, data)
            save_model_atomic(model, run.root / DENSE_MODEL)
            fill_sizes(stage, model)
            fwd = forward_flops(model)
            stage.flops = None if fwd is None else 3 * fwd * len(data.x_train) * epochs_run
            stage.details = jsonable(
                {
                    "epochs": epochs_run,
                    "batch_size": ft.batch_size,
                    "learning_rate": ft.learning_rate,
                    "optimizer": type(
                        getattr(model.optimizer, "inner_optimizer", model.optimizer)
                    ).__name__,
                    "seed": ft.seed,
                    "jit_compile": jit,
                    "mixed_precision": ft.mixed_precision,
                    "strategy": strategy_name,
                    "steps_per_epoch": math.ceil(len(data.x_train) / ft.batch_size),
                    "finetune_started_at": ft_entry.started_at,
                    "finetune_methods": list(rec.methods),
                    "epoch_log": _epoch_log(history.history),
                }
            )
        # The comparison needs the stage's own energy, known once its window has closed.
        entry = dataclasses.replace(stage.entry)
        entry.details = {**entry.details, "comparison": compare(ft_entry, entry)}
        run.record_stage(entry.to_dict())
        stage.entry = entry
    return stage_result(STAGE, stage, {"dense_reference": str(run.root / DENSE_MODEL)})


def _epoch_save(path):
    """A callback saving the model after every epoch, as the fine-tune's checkpoint does."""
    import keras

    class EpochSave(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            save_model_atomic(self.model, path)

    return EpochSave()


def _epoch_log(history: Mapping[str, Sequence]) -> list[dict]:
    """One `{epoch, energy_j, val_accuracy}` per epoch, from the fit's history (the stage's energy
    callback logs `energy_j`)."""
    n = len(history.get("loss", []))
    out = []
    for i in range(n):
        row: dict[str, Any] = {"epoch": i + 1}
        for key in ("energy_j", "val_accuracy", "val_loss"):
            values = history.get(key) or []
            row[key] = float(values[i]) if i < len(values) else None
        out.append(row)
    return out


def _finetune_entry(run: RunDir) -> StageEntry:
    entry = next((e for e in run.read_entries() if e.stage == "finetune"), None)
    if entry is None:
        raise MissingStepError(
            f"{STAGE}: {run.report_file} has no finetune entry; run `keras-lean finetune "
            f"--out {run.root}` first."
        )
    return entry


def compare(finetune: StageEntry, dense: StageEntry) -> dict:
    """The fine-tune against its dense reference: energy, time and accuracy, and the saving.

    The fine-tune's figures leave out its XLA measurement (`details.jit_probe`, paid once per
    run folder); with the guard they cover all guard stages (one finetune window).

    Returns:
        A dict: `finetune_energy_j`, `dense_energy_j`, `energy_ratio` (fine-tune / dense),
        `energy_saving` (1 - ratio: positive when pruning used less), the same for time
        (`finetune_duration_s`, `dense_duration_s`, `time_saving`), `finetune_accuracy`,
        `dense_accuracy`, `accuracy_delta` (fine-tune - dense), `jit_probe_energy_j` (left out),
        `finetune_epochs`, `dense_epochs`, `finetune_resumed_from_epoch` (not None: the
        fine-tune's window covers only the epochs after its checkpoint), `energy_method`.
    """
    probe = finetune.details.get("jit_probe") if isinstance(finetune.details, Mapping) else None
    probe = probe if isinstance(probe, Mapping) else {}
    probe_j = float(probe.get("energy_j") or 0.0)
    probe_s = float(probe.get("duration_s") or 0.0)
    ft_j = max(float(finetune.energy_j) - probe_j, 0.0)
    ft_s = max(float(finetune.duration_s) - probe_s, 0.0)
    dense_j, dense_s = float(dense.energy_j), float(dense.duration_s)
    ratio = ft_j / dense_j if dense_j > 0 else None
    time_ratio = ft_s / dense_s if dense_s > 0 else None
    acc_ft, acc_dense = finetune.accuracy, dense.accuracy
    return {
        "finetune_energy_j": ft_j,
        "dense_energy_j": dense_j,
        "energy_ratio": ratio,
        "energy_saving": None if ratio is None else 1.0 - ratio,
        "finetune_duration_s": ft_s,
        "dense_duration_s": dense_s,
        "time_saving": None if time_ratio is None else 1.0 - time_ratio,
        "finetune_accuracy": acc_ft,
        "dense_accuracy": acc_dense,
        "accuracy_delta": (
            None if acc_ft is None or acc_dense is None else float(acc_ft) - float(acc_dense)
        ),
        "jit_probe_energy_j": probe_j,
        "finetune_epochs": finetune.details.get("epochs_run"),
        # A resumed fine-tune's window holds only the epochs after the checkpoint.
        "finetune_resumed_from_epoch": finetune.details.get("resumed_from_epoch"),
        "dense_epochs": dense.details.get("epochs"),
        "energy_method": dense.energy_method,
    }


def comparison_line(comparison: Mapping[str, Any]) -> str:
    """`fine-tune energy: X J vs dense Y J (−Z %), accuracy A vs dense B`."""

    def acc(value: Any) -> str:
        return "-" if value is None else f"{float(value):.4f}"

    ratio = comparison.get("energy_ratio")
    if ratio is None:
        change = "dense energy not measured"
    else:
        pct = 100.0 * (float(ratio) - 1.0)
        change = f"{_MINUS if pct < 0 else '+'}{abs(pct):.1f} %"
    return (
        f"fine-tune energy: {float(comparison['finetune_energy_j']):.1f} J vs dense "
        f"{float(comparison['dense_energy_j']):.1f} J ({change}), accuracy "
        f"{acc(comparison.get('finetune_accuracy'))} vs dense "
        f"{acc(comparison.get('dense_accuracy'))}"
    )


__all__ = [
    "DENSE_MODEL",
    "STAGE",
    "DenseReferenceError",
    "compare",
    "comparison_line",
    "dense_reference",
]
