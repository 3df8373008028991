"""Keras-native quantization of the deployable `.keras` artifact, through `Model.quantize`.

keras_lean does not quantize anything itself here: it copies the stripped / merged model, calls
Keras' own `model.quantize(mode, filters=...)` (int8 and int4 for `Dense`, `EinsumDense` and
`Embedding`; the layers Keras cannot quantize, such as convolutions, stay float), saves it, loads
it back and measures it against the float model: file size (raw and gzip), output difference and
accuracy.

What each mode stores (Keras 3.15): `int8` an int8 kernel and a float scale per output channel;
`int4` int4 values packed two per int8 byte, grouped scales; `float8` keeps the float32 kernel and
adds scaling state for FP8 matmuls on hardware that has them, so the file does not shrink.
`gptq` and `awq` (Keras' `GPTQConfig` / `AWQConfig`) quantize the transformer blocks of a
keras-hub causal LM to 4 bits, block by block, on calibration tokens: the model must describe its
blocks (`get_quantization_layer_structure`, which keras-hub's `CausalLM` implements). Keras 3.15
writes such a `.keras` but cannot load it back (its `Dense` / `EinsumDense` skip `kernel_zero` when
saving gptq / awq variables, so loading reads them out of order): the report says so
(`reloadable: False`) and measures the in-memory quantized model instead. The same happens with
an int8 keras-hub `BertTextClassifier` (its `logits` layer loads no variables): any file Keras
cannot read back is reported that way, never silently.

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
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_lean._choices import KERAS_QUANTIZATIONS
from keras_lean._files import temp_file_beside
from keras_lean.export.equivalence import compare_outputs
from keras_lean.export.sizes import file_sizes

if TYPE_CHECKING:  # pragma: no cover
    import keras

#: Modes that calibrate on data (Keras' GPTQ and AWQ); keras-hub causal LMs only.
CALIBRATED_QUANTIZATIONS = ("gptq", "awq")
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


class _TokenIdsOnly:
    """The tokenizer handed to Keras' GPTQ / AWQ config when the calibration data is already
    token ids: Keras requires one but only calls it on strings."""

    def tokenize(self, text):
        raise ValueError(
            "calibration strings need a tokenizer: pass tokenizer=, or token ids as calibration"
        )


def _calibration_dataset(calibration: Any) -> tuple[list, int | None, bool]:
    """(Keras' `dataset` list, the rows' sequence length or None, whether it holds strings)."""
    if isinstance(calibration, dict):
        if "token_ids" not in calibration:
            raise ValueError(
                f"calibration dict must hold 'token_ids'. Received keys: {sorted(calibration)}"
            )
        calibration = calibration["token_ids"]
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], str):
        return list(calibration), None, True
    ids = np.asarray(calibration)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or not len(ids):
        raise ValueError(
            "calibration must be token ids of shape (samples, sequence_length), a dict with "
            "'token_ids', or a list of strings. Received: "
            f"{type(calibration).__name__} of shape {getattr(ids, 'shape', None)}"
        )
    return [row.astype("int32") for row in ids], int(ids.shape[1]), False


def calibration_config(
    model: keras.Model,
    mode: str,
    calibration: Any,
    *,
    tokenizer: Any = None,
    weight_bits: int = 4,
    group_size: int = 128,
    num_samples: int | None = None,
    sequence_length: int | None = None,
):
    """Keras' `GPTQConfig` / `AWQConfig` for `model` on `calibration`.

    Args:
        model: a keras-hub causal LM (its `get_quantization_layer_structure(mode)` names the
            embedding and the transformer blocks Keras quantizes one after the other).
        mode: `"gptq"` or `"awq"`.
        calibration: token ids `(samples, sequence_length)`, a dict with `token_ids` (the
            pipeline's text inputs), or a list of strings (then a tokenizer is needed).
        tokenizer: for strings (default: the model's preprocessor's tokenizer).
        weight_bits: bits per weight.
        group_size: input rows sharing one scale (-1: one per output channel).
        num_samples: calibration windows (default: the token rows, at most 128; strings: 128).
        sequence_length: tokens per window (default: the rows' length, else the
            preprocessor's, else 128).

    Raises:
        ValueError: `mode` is not calibrated, the model is not a causal LM Keras can quantize
            this way, or the calibration data is missing or malformed.
    """
    import keras

    if mode not in CALIBRATED_QUANTIZATIONS:
        raise ValueError(
            f"calibration_config takes {' or '.join(CALIBRATED_QUANTIZATIONS)}. Received: {mode!r}"
        )
    structure = getattr(model, "get_quantization_layer_structure", None)
    if structure is None or structure(mode) is None:
        raise ValueError(
            f"keras_quantization={mode!r} needs a keras-hub causal LM (a model whose "
            f"get_quantization_layer_structure({mode!r}) names its embedding and transformer "
            f"blocks, such as GPT2CausalLM); model {model.name!r} ({type(model).__name__}) has "
            f"none. Use keras_quantization int8 or int4 for other models."
        )
    if calibration is None:
        raise ValueError(
            f"keras_quantization={mode!r} calibrates on data: pass calibration= (token ids of "
            f"shape (samples, sequence_length), a dict with 'token_ids', or strings)."
        )
    dataset, rows_length, strings = _calibration_dataset(calibration)
    preprocessor = getattr(model, "preprocessor", None)
    tokenizer = tokenizer or getattr(preprocessor, "tokenizer", None)
    if tokenizer is None:
        if strings:
            raise ValueError(
                f"keras_quantization={mode!r}: calibration strings need a tokenizer and model "
                f"{model.name!r} has no preprocessor; pass tokenizer= or token ids."
            )
        tokenizer = _TokenIdsOnly()
    seq = sequence_length or rows_length or getattr(preprocessor, "sequence_length", None) or 128
    n = num_samples or (min(len(dataset), 128) if not strings else 128)
    common = dict(
        dataset=dataset,
        tokenizer=tokenizer,
        weight_bits=weight_bits,
        num_samples=int(n),
        sequence_length=int(seq),
        group_size=group_size,
    )
    if mode == "gptq":
        return keras.quantizers.GPTQConfig(**common)
    return keras.quantizers.AWQConfig(**common)


def quantize_keras(
    model: keras.Model,
    mode: str,
    *,
    filters: Filters = None,
    calibration: Any = None,
    tokenizer: Any = None,
    group_size: int = 128,
) -> keras.Model:
    """Returns a copy of `model` quantized by Keras' `Model.quantize(mode, filters=filters)`.

    Args:
        model: a built, deployable Keras model (pruning wrappers stripped, LoRA merged).
        mode: `"none"` (a plain copy), `"int8"`, `"int4"`, `"float8"`, or `"gptq"` / `"awq"`
            (keras-hub causal LMs, calibrated on `calibration`; see `calibration_config`).
        filters: Keras' `filters`: a regex, a list of regexes or a callable on the layer,
            selecting the layers to quantize (None: every layer Keras can quantize).
        calibration: gptq / awq only: token ids, a dict with `token_ids`, or strings.
        tokenizer: gptq / awq with strings (default: the model's preprocessor's).
        group_size: gptq / awq: input rows per scale (-1: per output channel).

    Returns:
        A new model; `model` is left as it was.

    Raises:
        ValueError: unknown mode, no layer of the model can be quantized (Keras quantizes
            `Dense`, `EinsumDense` and `Embedding` layers), or gptq / awq on a model that is
            not a keras-hub causal LM or without calibration data.

    Example:
        >>> q = quantize_keras(model, "int4", filters=r"attention|ffn")
        >>> q = quantize_keras(causal_lm, "gptq", calibration=x_train["token_ids"][:64])
    """
    from keras_lean.lowrank._model import copy_model

    _check_mode(mode)
    config = None
    if mode in CALIBRATED_QUANTIZATIONS:  # checked on the caller's model, before copying it
        config = calibration_config(
            model, mode, calibration, tokenizer=tokenizer, group_size=group_size
        )
    copy = copy_model(model)
    if mode == "none":
        return copy
    with warnings.catch_warnings():
        # Keras warns once per layer type it cannot quantize (InputLayer, Conv2D, ...): expected.
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        warnings.filterwarnings("ignore", message=".*__array__ implementation")
        # gptq / awq: the layers outside the blocks (embeddings) refuse the mode: expected.
        warnings.filterwarnings("ignore", message="Invalid quantization mode")
        copy.quantize(mode, config=config, filters=filters)
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
        max_abs_diff: largest |quantized - float| output over the check samples (reloaded file;
            the in-memory quantized model when the file cannot be reloaded).
        float_accuracy: the float model's accuracy on the check labels.
        accuracy: the quantized model's accuracy on them.
        note: what the mode does not buy, where it matters (float8: no smaller file; a file
            Keras cannot load back).
        reloadable: `keras.saving.load_model` reads the file back (checked when `check_x` is
            given; Keras 3.15 fails on gptq / awq files and on an int8 BertTextClassifier).
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
    reloadable: bool | None = None

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
    calibration: Any = None,
    tokenizer: Any = None,
    group_size: int = 128,
) -> KerasQuantizationReport:
    """Quantizes `model` with Keras, saves it to `path`, reloads it and measures it.

    Args:
        model: the deployable float model.
        path: destination `.keras` file (written through a temporary name and a rename).
        mode: `"int8"`, `"int4"`, `"float8"`, `"gptq"` or `"awq"` (keras-hub causal LMs).
        filters: Keras' layer filters (see `quantize_keras`).
        calibration: gptq / awq: token ids, a dict with `token_ids`, or strings.
        tokenizer: gptq / awq with strings.
        group_size: gptq / awq: input rows per scale.
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
    quantized = quantize_keras(
        model,
        mode,
        filters=filters,
        calibration=calibration,
        tokenizer=tokenizer,
        group_size=group_size,
    )
    _save(quantized, path)
    if float_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            reference = Path(tmp) / "float.keras"
            _save(quantize_keras(model, "none"), reference)
            float_raw, float_gz = file_sizes(reference)
    else:
        float_raw, float_gz = file_sizes(float_path)
    raw, gz = file_sizes(path)
    fields: dict = {"note": _NOTES.get(mode)}
    if check_x is not None and _samples(check_x):
        try:
            candidate = keras.saving.load_model(path)
            fields["reloadable"] = True
        except ValueError as e:  # a Keras bug (module docstring): say so, measure in memory
            candidate, fields["reloadable"] = quantized, False
            fields["note"] = (
                f"Keras {keras.__version__} cannot load this {mode} .keras back "
                f"({str(e).splitlines()[0]}); accuracy and max |diff| are the in-memory "
                f"quantized model's"
            )
        eq = compare_outputs(model, candidate, check_x, check_y, candidate_name=f"keras:{mode}")
        fields.update(
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
        **fields,
    )


def _samples(x: Any) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
