"""Equivalence checks: does an exported artifact compute what the Keras model computes?

Every export is compared with its reference on the same samples, as the largest absolute output
difference and as accuracy (when labels are given). A float export must match to
`FLOAT_TOLERANCE`; quantized exports have no fixed bound (their error is the price of the
quantization), so their accuracy beside the reference's is the figure to judge.

Example:
    >>> from keras_lean.export import TFLiteRunner, compare_outputs
    >>> eq = compare_outputs(model, TFLiteRunner("out/model.tflite"), x_val, y_val,
    ...                      tolerance=tolerance_for("none"), candidate="tflite:none")
    >>> eq.passed, eq.max_abs_diff, eq.candidate_accuracy
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_lean._choices import QUANTIZATIONS

# Float (unquantized) exports must match the Keras outputs to this, relative to the outputs'
# scale (max(1, max |reference|)): 1e-5 absolute for probabilities, proportionally for logits.
FLOAT_TOLERANCE = 1e-5
# The same file written in sparse and in dense format must give the same outputs.
SPARSE_TOLERANCE = 1e-6
# float16 weights: half precision keeps about 3 decimal digits.
FLOAT16_TOLERANCE = 1e-2

_TOLERANCES: dict[str, float | None] = {
    "none": FLOAT_TOLERANCE,
    "float16": FLOAT16_TOLERANCE,
    "dynamic": None,
    "int8": None,
}


def tolerance_for(quantization: str) -> float | None:
    """The output tolerance an export with `quantization` must meet (None: accuracy only).

    Raises:
        ValueError: unknown quantization.
    """
    if quantization not in _TOLERANCES:
        raise ValueError(
            f"quantization must be one of {', '.join(_TOLERANCES)}. "
            f"Received: quantization={quantization!r}"
        )
    return _TOLERANCES[quantization]


class EquivalenceError(ValueError):
    """An export's outputs differ from its reference's by more than the tolerance."""


@dataclasses.dataclass(frozen=True)
class Equivalence:
    """How an exported artifact's outputs compare with its reference's.

    Attributes:
        reference: what the outputs were compared against (e.g. `"keras"`).
        candidate: the export (e.g. `"tflite:int8"`).
        samples: number of samples compared.
        max_abs_diff: largest |candidate - reference| over all outputs.
        mean_abs_diff: mean |candidate - reference|.
        scale: max(1, max |reference|): the tolerance is relative to it.
        tolerance: the bound `max_abs_diff / scale` must meet, or None (no fixed bound).
        agreement: share of samples whose argmax agrees.
        reference_accuracy: the reference's accuracy on the labels, when given.
        candidate_accuracy: the candidate's accuracy on the same labels.
    """

    reference: str
    candidate: str
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    scale: float
    tolerance: float | None
    agreement: float
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.max_abs_diff <= self.tolerance * self.scale

    @property
    def accuracy_delta(self) -> float | None:
        """candidate - reference accuracy (negative: the export lost accuracy)."""
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return self.candidate_accuracy - self.reference_accuracy

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "passed": self.passed,
            "accuracy_delta": self.accuracy_delta,
        }

    def check(self) -> Equivalence:
        """Returns self, or raises `EquivalenceError` when the tolerance is not met."""
        if not self.passed:
            raise EquivalenceError(
                f"{self.candidate} differs from {self.reference} by {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.1g} x scale {self.scale:.3g}) over "
                f"{self.samples} samples; the export does not compute what the model computes."
            )
        return self


def _predict(fn: Callable[[np.ndarray], Any] | Any, x: Any, batch_size: int) -> np.ndarray:
    if hasattr(fn, "predict"):  # a Keras model: its compiled predict loop
        return np.asarray(fn.predict(x, batch_size=batch_size, verbose=0), dtype="float64")
    parts = [np.asarray(fn(_rows(x, i, i + batch_size))) for i in range(0, _len(x), batch_size)]
    return np.concatenate(parts).astype("float64")


def _len(x: Any) -> int:
    """Samples in `x`: an array, or a dict of arrays (a text model's named inputs)."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _rows(x: Any, start: int, stop: int) -> Any:
    return {k: v[start:stop] for k, v in x.items()} if isinstance(x, dict) else x[start:stop]


def compare_outputs(
    reference: Callable[[np.ndarray], Any] | Any,
    candidate: Callable[[np.ndarray], Any] | Any,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    tolerance: float | None = None,
    reference_name: str = "keras",
    candidate_name: str = "export",
    batch_size: int = 256,
) -> Equivalence:
    """Runs `x` through both and compares the outputs (and accuracies, with labels `y`).

    Args:
        reference: a Keras model or a callable from a batch to outputs.
        candidate: the same (e.g. a `TFLiteRunner`).
        x: the samples (a validation set): an array, or a dict of arrays for a model with
            named inputs (`token_ids`, `padding_mask`).
        y: their integer labels, or None.
        tolerance: bound on `max_abs_diff / max(1, max |reference|)`, or None.
        reference_name: label of the reference in the result.
        candidate_name: label of the candidate in the result.
        batch_size: samples per call.

    Returns:
        An `Equivalence`; call `.check()` to raise when it fails.

    Raises:
        ValueError: no samples, or outputs of different shapes.
    """
    x = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)
    if _len(x) == 0:
        raise ValueError("compare_outputs needs samples. Received: x with 0 samples")
    ref = _predict(reference, x, batch_size)
    out = _predict(candidate, x, batch_size)
    if ref.shape != out.shape:
        raise ValueError(
            f"{candidate_name} outputs have shape {out.shape}, {reference_name}'s {ref.shape}: "
            f"they are not the same model."
        )
    diff = np.abs(out - ref)
    fields: dict[str, Any] = {}
    if y is not None:
        labels = np.asarray(y).reshape(-1)
        fields["reference_accuracy"] = float(np.mean(ref.argmax(-1).reshape(-1) == labels))
        fields["candidate_accuracy"] = float(np.mean(out.argmax(-1).reshape(-1) == labels))
    return Equivalence(
        reference=reference_name,
        candidate=candidate_name,
        samples=_len(x),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        scale=float(max(1.0, np.abs(ref).max())),
        tolerance=tolerance,
        agreement=float(np.mean(ref.argmax(-1) == out.argmax(-1))),
        **fields,
    )


def tflite_equivalence(
    model: Any,
    out_dir: Any,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    quantizations: tuple[str, ...] = QUANTIZATIONS,
    calibration_x: np.ndarray | None = None,
    sparse: bool = False,
    name: str = "check",
) -> dict[str, dict]:
    """Converts `model` with each TFLite quantization and checks every file against Keras.

    Writes `out_dir/<name>_<quantization>.tflite` for each; the `none` file must match the
    Keras outputs to `FLOAT_TOLERANCE` (see `Equivalence.passed`).

    Args:
        model: a plain Keras model.
        out_dir: destination folder.
        x: validation samples.
        y: their labels, or None.
        quantizations: the TFLite quantizations to check.
        calibration_x: samples for `int8` calibration (needed when `int8` is listed).
        sparse: convert with sparse storage.
        name: file name stem.

    Returns:
        quantization -> the `Equivalence.to_dict()` plus `tflite_raw_bytes` and
        `tflite_gzip_bytes`.

    Raises:
        ValueError: unknown quantization, or `int8` without calibration samples.
    """
    from pathlib import Path

    from keras_lean.export.sizes import file_sizes
    from keras_lean.export.tflite import TFLiteRunner, convert_to_tflite

    for q in quantizations:
        tolerance_for(q)  # validates before any conversion runs
    out = {}
    for q in quantizations:
        path = convert_to_tflite(
            model,
            Path(out_dir) / f"{name}_{q}.tflite",
            quantization=q,
            calibration_x=calibration_x,
            sparse=sparse,
        )
        eq = compare_outputs(
            model,
            TFLiteRunner(path),
            x,
            y,
            tolerance=tolerance_for(q),
            candidate_name=f"tflite:{q}" + (":sparse" if sparse else ""),
        )
        raw, gz = file_sizes(path)
        out[q] = {**eq.to_dict(), "tflite_raw_bytes": raw, "tflite_gzip_bytes": gz}
    return out
