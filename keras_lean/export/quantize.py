"""Keras-native quantization of the deployable `.keras` artifact, through `Model.quantize`.

keras_lean does not quantize anything itself here: it copies the stripped / merged model, calls
Keras' own `model.quantize(mode, filters=...)` (int8 and int4 for `Dense`, `EinsumDense` and
`Embedding`; the layers Keras cannot quantize, such as convolutions, stay float), saves it, loads
it back and measures it against the float model: file size (raw and gzip), output difference and
accuracy.

What each mode stores (Keras 3.15): `int8` an int8 kernel and a float scale per output channel;
`int4` int4 values packed two per int8 byte, grouped scales; `float8` keeps the float32 kernel and
adds scaling state for FP8 matmuls on hardware that has them, so the file does not shrink.

Example:
    >>> from keras_lean.export import quantize_keras_artifact
    >>> rep = quantize_keras_artifact(model, "out/model_int8.keras", "int8",
    ...                               check_x=x_val, check_y=y_val)
    >>> rep.raw_bytes / rep.float_raw_bytes, rep.accuracy_delta
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keras_lean._files import temp_file_beside
from keras_lean.export.equivalence import compare_outputs
from keras_lean.export.sizes import file_sizes

if TYPE_CHECKING:  # pragma: no cover
    import keras

KERAS_QUANTIZATIONS = ("none", "int8", "int4", "float8")
_NOTES = {
    "float8": "float8 keeps the float32 kernels (plus FP8 scaling state): it speeds up matmuls "
    "on FP8 hardware, it does not shrink the file",
}

Filters = str | Sequence[str] | Callable | None


def _check_mode(mode: str) -> None:
    if mode not in KERAS_QUANTIZATIONS:
        raise ValueError(
            f"keras_quantization must be one of {', '.join(KERAS_QUANTIZATIONS)}. "
            f"Received: keras_quantization={mode!r}"
        )


def quantized_layers(model: keras.Model) -> list[str]:
    """Paths of the layers whose dtype policy is a Keras quantization policy."""
    from keras_lean._keras_internals import flatten_layers

    return [
        layer.path
        for layer in flatten_layers(model)
        if getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)
    ]


def quantize_keras(model: keras.Model, mode: str, *, filters: Filters = None) -> keras.Model:
    """Returns a copy of `model` quantized by Keras' `Model.quantize(mode, filters=filters)`.

    Args:
        model: a built, deployable Keras model (pruning wrappers stripped, LoRA merged).
        mode: `"none"` (a plain copy), `"int8"`, `"int4"` or `"float8"`.
        filters: Keras' `filters`: a regex, a list of regexes or a callable on the layer,
            selecting the layers to quantize (None: every layer Keras can quantize).

    Returns:
        A new model; `model` is left as it was.

    Raises:
        ValueError: unknown mode, or no layer of the model can be quantized (Keras quantizes
            `Dense`, `EinsumDense` and `Embedding` layers).

    Example:
        >>> q = quantize_keras(model, "int4", filters=r"attention|ffn")
    """
    from keras_lean.lowrank._model import copy_model

    _check_mode(mode)
    copy = copy_model(model)
    if mode == "none":
        return copy
    with warnings.catch_warnings():
        # Keras warns once per layer type it cannot quantize (InputLayer, Conv2D, ...): expected.
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        warnings.filterwarnings("ignore", message=".*__array__ implementation")
        copy.quantize(mode, filters=filters)
    if not quantized_layers(copy):
        raise ValueError(
            f"keras_quantization={mode!r}: no layer of model {model.name!r} can be quantized "
            f"by Keras (it quantizes Dense, EinsumDense and Embedding layers"
            + ("" if filters is None else f" matching filters={filters!r}")
            + "). Use keras_quantization='none', or TFLite quantization for convolutions."
        )
    return copy


def _save(model: keras.Model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(temp_file_beside(path, ".keras"))  # the umask's mode, kept by the rename
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclasses.dataclass(frozen=True)
class KerasQuantizationReport:
    """A Keras-quantized `.keras` artifact, measured against the float model.

    Attributes:
        mode: the Keras quantization mode.
        path: the saved `.keras` file.
        raw_bytes: its size.
        gzip_bytes: its gzip size.
        float_raw_bytes: the float model's `.keras` size (saved the same way, uncompiled).
        float_gzip_bytes: its gzip size.
        quantized_layers: the layers Keras quantized.
        max_abs_diff: largest |quantized - float| output over the check samples (reloaded file).
        float_accuracy: the float model's accuracy on the check labels.
        accuracy: the quantized model's accuracy on them.
        note: what the mode does not buy, where it matters (float8: no smaller file).
    """

    mode: str
    path: str
    raw_bytes: int
    gzip_bytes: int
    float_raw_bytes: int
    float_gzip_bytes: int
    quantized_layers: tuple[str, ...]
    max_abs_diff: float | None = None
    float_accuracy: float | None = None
    accuracy: float | None = None
    note: str | None = None

    @property
    def size_ratio(self) -> float:
        """float size / quantized size (raw): how many times smaller the file is."""
        return self.float_raw_bytes / self.raw_bytes

    @property
    def accuracy_delta(self) -> float | None:
        if self.accuracy is None or self.float_accuracy is None:
            return None
        return self.accuracy - self.float_accuracy

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "quantized_layers": list(self.quantized_layers),
            "size_ratio": self.size_ratio,
            "accuracy_delta": self.accuracy_delta,
        }


def quantize_keras_artifact(
    model: keras.Model,
    path: str | os.PathLike,
    mode: str,
    *,
    filters: Filters = None,
    check_x: np.ndarray | None = None,
    check_y: np.ndarray | None = None,
    float_path: str | os.PathLike | None = None,
) -> KerasQuantizationReport:
    """Quantizes `model` with Keras, saves it to `path`, reloads it and measures it.

    Args:
        model: the deployable float model.
        path: destination `.keras` file (written through a temporary name and a rename).
        mode: `"int8"`, `"int4"` or `"float8"`.
        filters: Keras' layer filters (see `quantize_keras`).
        check_x: validation samples to compare outputs on.
        check_y: their labels, for accuracies.
        float_path: the float model's `.keras` file, if already saved (else it is saved to a
            temporary file to measure).

    Returns:
        A `KerasQuantizationReport`.

    Raises:
        ValueError: unknown mode, `"none"`, a path not ending in `.keras`, or nothing quantizable.
    """
    import keras

    _check_mode(mode)
    if mode == "none":
        raise ValueError("quantize_keras_artifact needs a quantization mode. Received: 'none'")
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"A Keras file must end in '.keras'. Received: path={str(path)!r}")
    quantized = quantize_keras(model, mode, filters=filters)
    _save(quantized, path)
    if float_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            reference = Path(tmp) / "float.keras"
            _save(quantize_keras(model, "none"), reference)
            float_raw, float_gz = file_sizes(reference)
    else:
        float_raw, float_gz = file_sizes(float_path)
    raw, gz = file_sizes(path)
    fields: dict = {}
    if check_x is not None and len(check_x):
        reloaded = keras.saving.load_model(path)
        eq = compare_outputs(model, reloaded, check_x, check_y, candidate_name=f"keras:{mode}")
        fields = dict(
            max_abs_diff=eq.max_abs_diff,
            float_accuracy=eq.reference_accuracy,
            accuracy=eq.candidate_accuracy,
        )
    return KerasQuantizationReport(
        mode=mode,
        path=str(path),
        raw_bytes=raw,
        gzip_bytes=gz,
        float_raw_bytes=float_raw,
        float_gzip_bytes=float_gz,
        quantized_layers=tuple(quantized_layers(quantized)),
        note=_NOTES.get(mode),
        **fields,
    )
