"""`export_model`: SavedModel + TFLite, checked in the interpreter, with sizes and latency."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_lean.export.equivalence import SPARSE_TOLERANCE, compare_outputs, tolerance_for
from keras_lean.export.saved_model import export_saved_model
from keras_lean.export.sizes import file_sizes, weight_sizes
from keras_lean.export.sparse import latency_note, sparse_storage
from keras_lean.export.tflite import (
    QUANTIZATIONS,
    TFLiteRunner,
    convert_to_tflite,
    strip_tflite_names,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras

FORMATS = ("saved_model", "tflite")


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export_model` wrote and measured.

    Attributes:
        quantization: the TFLite quantization used.
        params: weights of the exported Keras model.
        nonzero_params: weights that are not exactly zero.
        weights_raw_bytes: the weights' size as stored (float32: 4 bytes each).
        weights_gzip_bytes: the weights' gzip size.
        saved_model_path: the SavedModel folder, or None if not exported.
        saved_model_raw_bytes: SavedModel folder size (all files).
        saved_model_gzip_bytes: SavedModel folder gzip size (files gzipped one by one).
        tflite_path: the `.tflite` file, or None if not exported.
        tflite_raw_bytes: `.tflite` file size.
        tflite_gzip_bytes: `.tflite` gzip size.
        max_abs_diff: largest |TFLite output - Keras output| over the check samples.
        keras_accuracy: Keras accuracy on the check samples (when labels were given).
        tflite_accuracy: TFLite accuracy on the same samples.
        latency_batch_size: batch size of the latency measurement.
        keras_latency_ms: median time of one batch through the compiled Keras predict step.
        tflite_latency_ms: median time of one batch through the TFLite interpreter.
        sparse_tflite: the `.tflite` file stores mostly-zero tensors in sparse format.
        dense_tflite_raw_bytes: with `sparse_tflite`, the same export in dense format
            (`<name>_dense.tflite`), for the comparison.
        dense_tflite_gzip_bytes: its gzip size.
        dense_tflite_latency_ms: its batch latency.
        sparse_vs_dense_max_abs_diff: largest |sparse - dense-format| TFLite output difference.
        sparse_storage: `SparseStorage.to_dict()` of the sparse file (values, index arrays,
            entropy bound, DENSIFY ops).
        sparse_latency_note: what the sparse format buys at run time here, in one sentence.
        equivalence: one `Equivalence.to_dict()` per check (TFLite vs Keras; sparse vs dense).
        tflite_names_stripped: the `.tflite` files' tensor names were removed
            (`strip_tflite_names`) before the checks.
    """

    quantization: str
    params: int
    nonzero_params: int
    weights_raw_bytes: int
    weights_gzip_bytes: int
    saved_model_path: str | None = None
    saved_model_raw_bytes: int | None = None
    saved_model_gzip_bytes: int | None = None
    tflite_path: str | None = None
    tflite_raw_bytes: int | None = None
    tflite_gzip_bytes: int | None = None
    max_abs_diff: float | None = None
    keras_accuracy: float | None = None
    tflite_accuracy: float | None = None
    latency_batch_size: int | None = None
    keras_latency_ms: float | None = None
    tflite_latency_ms: float | None = None
    sparse_tflite: bool = False
    dense_tflite_raw_bytes: int | None = None
    dense_tflite_gzip_bytes: int | None = None
    dense_tflite_latency_ms: float | None = None
    sparse_vs_dense_max_abs_diff: float | None = None
    sparse_storage: dict | None = None
    sparse_latency_note: str | None = None
    equivalence: tuple[dict, ...] = ()
    tflite_names_stripped: bool = False

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    @property
    def equivalence_passed(self) -> bool:
        """Every equivalence check met its tolerance (True when none ran)."""
        return all(e["passed"] for e in self.equivalence)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "equivalence": list(self.equivalence),
            "equivalence_passed": self.equivalence_passed,
            "sparsity": self.sparsity,
        }


def measure_latency_ms(fn: Callable[[np.ndarray], Any], x: np.ndarray, runs: int = 20) -> float:
    """Returns the median wall time in ms of `fn(x)` over `runs` calls, after one warm-up call."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1. Received: runs={runs}")
    fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def export_model(
    model: keras.Model,
    out_dir: str | os.PathLike,
    *,
    name: str = "model",
    formats: Sequence[str] = FORMATS,
    quantization: str = "none",
    calibration_x: np.ndarray | None = None,
    check_x: np.ndarray | None = None,
    check_y: np.ndarray | None = None,
    latency_batch_size: int = 32,
    latency_runs: int = 20,
    sparse: bool = False,
    strip_names: bool = False,
) -> ExportReport:
    """Exports a Keras model for deployment and checks the TFLite file against Keras.

    Writes `out_dir/<name>_saved_model/` (SavedModel, endpoint `serve`) and
    `out_dir/<name>.tflite`, loads the `.tflite` in the interpreter, runs `check_x` through both
    and records the max abs difference, accuracies (if `check_y`), sizes, parameter counts and
    the batch latency of Keras and TFLite. Each comparison is also an `Equivalence` in
    `report.equivalence`: the float export must match Keras to `FLOAT_TOLERANCE`.

    With `sparse=True` the `.tflite` file stores mostly-zero tensors in TFLite's sparse format;
    the same export in dense format is written beside it (`<name>_dense.tflite`), both run on
    `check_x`, and the report gives both sizes (raw and gzip), both latencies, their output
    difference (they must agree to `SPARSE_TOLERANCE`) and the sparse storage's breakdown.

    Args:
        model: a plain Keras model (wrappers stripped).
        out_dir: destination folder.
        name: file name stem.
        formats: any of `"saved_model"`, `"tflite"`.
        quantization: TFLite quantization, one of `none`, `dynamic`, `float16`, `int8`.
        calibration_x: training samples for `int8` calibration.
        check_x: samples to compare Keras and TFLite outputs on (and time the latency with).
        check_y: their integer labels, for accuracies.
        latency_batch_size: batch size of the latency measurement.
        latency_runs: timed batches per runtime.
        sparse: convert with sparse storage (for unstructured and N:M pruned models).
        strip_names: remove the tensor names from the `.tflite` files (`strip_tflite_names`:
            not needed at run time; a few hundred bytes raw and gzip), before they are checked.

    Returns:
        An `ExportReport`.

    Raises:
        ValueError: unknown format or quantization, or `int8` without calibration samples.

    Example:
        >>> report = export_model(model, "out", quantization="dynamic", check_x=x_val)
        >>> report.max_abs_diff < 0.05
        True
    """
    formats = tuple(formats)
    for f in formats:
        if f not in FORMATS:
            raise ValueError(
                f"formats entries must be one of {', '.join(FORMATS)}. Received: {f!r}"
            )
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}. "
            f"Received: quantization={quantization!r}"
        )
    if latency_batch_size < 1:
        raise ValueError(f"latency_batch_size must be >= 1. Received: {latency_batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = weight_sizes(model)
    fields: dict[str, Any] = {
        "quantization": quantization,
        "params": sizes.params,
        "nonzero_params": sizes.nonzero_params,
        "weights_raw_bytes": sizes.raw_bytes,
        "weights_gzip_bytes": sizes.gzip_bytes,
    }
    if "saved_model" in formats:
        sm = export_saved_model(model, out_dir / f"{name}_saved_model")
        raw, gz = file_sizes(sm)
        fields.update(
            saved_model_path=str(sm), saved_model_raw_bytes=raw, saved_model_gzip_bytes=gz
        )
    if "tflite" in formats:
        fields.update(
            _export_tflite(
                model,
                out_dir,
                name,
                quantization=quantization,
                calibration_x=calibration_x,
                check_x=check_x,
                check_y=check_y,
                latency_batch_size=latency_batch_size,
                latency_runs=latency_runs,
                sparse=sparse,
                strip_names=strip_names,
            )
        )
    return ExportReport(**fields)


def _export_tflite(
    model: keras.Model,
    out_dir: Path,
    name: str,
    *,
    quantization: str,
    calibration_x: np.ndarray | None,
    check_x: np.ndarray | None,
    check_y: np.ndarray | None,
    latency_batch_size: int,
    latency_runs: int,
    sparse: bool,
    strip_names: bool = False,
) -> dict[str, Any]:
    """`export_model`'s TFLite part: convert (sparse and dense format), check, measure."""

    def convert(path: Path, sparse: bool = False) -> Path:
        path = convert_to_tflite(
            model, path, quantization=quantization, calibration_x=calibration_x, sparse=sparse
        )
        return strip_tflite_names(path) if strip_names else path

    path = convert(out_dir / f"{name}.tflite", sparse)
    raw, gz = file_sizes(path)
    fields: dict[str, Any] = dict(
        tflite_path=str(path),
        tflite_raw_bytes=raw,
        tflite_gzip_bytes=gz,
        sparse_tflite=sparse,
        tflite_names_stripped=strip_names,
    )
    dense = None
    if sparse:
        dense = convert(out_dir / f"{name}_dense.tflite")
        fields["dense_tflite_raw_bytes"], fields["dense_tflite_gzip_bytes"] = file_sizes(dense)
        fields["sparse_storage"] = sparse_storage(path).to_dict()
    if check_x is None or not len(check_x):
        return fields
    runner = TFLiteRunner(path)
    eq = compare_outputs(
        model,
        runner,
        check_x,
        check_y,
        tolerance=tolerance_for(quantization),
        candidate_name=f"tflite:{quantization}" + (":sparse" if sparse else ""),
    )
    checks = [eq.to_dict()]
    fields["max_abs_diff"] = eq.max_abs_diff
    fields["keras_accuracy"] = eq.reference_accuracy
    fields["tflite_accuracy"] = eq.candidate_accuracy
    batch = np.resize(check_x, (latency_batch_size, *check_x.shape[1:]))
    fields.update(
        latency_batch_size=latency_batch_size,
        keras_latency_ms=measure_latency_ms(model.predict_on_batch, batch, latency_runs),
        tflite_latency_ms=measure_latency_ms(runner, batch, latency_runs),
    )
    if dense is not None:
        dense_runner = TFLiteRunner(dense)
        vs_dense = compare_outputs(
            dense_runner,
            runner,
            check_x,
            check_y,
            tolerance=SPARSE_TOLERANCE,
            reference_name=f"tflite:{quantization}:dense",
            candidate_name=f"tflite:{quantization}:sparse",
        )
        checks.append(vs_dense.to_dict())
        dense_ms = measure_latency_ms(dense_runner, batch, latency_runs)
        fields.update(
            sparse_vs_dense_max_abs_diff=vs_dense.max_abs_diff,
            dense_tflite_latency_ms=dense_ms,
            sparse_latency_note=latency_note(
                sparse_storage(path), fields["tflite_latency_ms"], dense_ms
            ),
        )
    fields["equivalence"] = tuple(checks)
    return fields
