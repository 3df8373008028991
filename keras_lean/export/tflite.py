"""TFLite (LiteRT) conversion with quantization, and running a `.tflite` file in the interpreter."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_lean._choices import QUANTIZATIONS, SPARSE_QUANTIZATIONS
from keras_lean._files import atomic_write_bytes, temp_file_beside

if TYPE_CHECKING:  # pragma: no cover
    import keras


def _converter_kwargs(
    quantization: str, calibration_x: np.ndarray | None, sparse: bool = False
) -> dict[str, Any]:
    import tensorflow as tf

    # EXPERIMENTAL_SPARSITY stores weights that are mostly zero in TFLite's sparse format (CSR-like
    # index arrays); with DEFAULT it is sparsity-preserving quantization.
    sparsity = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
    if quantization == "none":
        return {"optimizations": sparsity} if sparse else {}
    kwargs: dict[str, Any] = {"optimizations": [tf.lite.Optimize.DEFAULT, *sparsity]}
    if quantization == "float16":
        kwargs["target_spec"] = {"supported_types": [tf.float16]}
    elif quantization == "int8":
        if calibration_x is None or len(calibration_x) == 0:
            raise ValueError(
                "quantization='int8' needs calibration samples. Received: calibration_x=None"
            )
        samples = np.asarray(calibration_x, dtype="float32")

        def representative_dataset() -> Iterator[list[np.ndarray]]:
            for i in range(len(samples)):
                yield [samples[i : i + 1]]

        kwargs["representative_dataset"] = representative_dataset
    return kwargs


def convert_to_tflite(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    quantization: str = "none",
    calibration_x: np.ndarray | None = None,
    sparse: bool = False,
) -> Path:
    """Converts a Keras model to a `.tflite` file with Keras' LiteRT exporter.

    Args:
        model: a plain Keras model (no training-only wrappers).
        path: destination, ending in `.tflite`; written through a temporary name and a rename.
        quantization: `"none"` (float32), `"dynamic"` (int8 weights, float activations),
            `"float16"` (float16 weights) or `"int8"` (int8 weights and activations calibrated
            on `calibration_x`; the input and output stay float32).
        calibration_x: samples for `int8` calibration (training samples, one per step).
        sparse: store mostly-zero weight tensors in TFLite's sparse format
            (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`; with a quantization, sparsity-preserving
            quantization). The converter decides per tensor (it keeps dense the ones too dense
            to gain); outputs equal the dense-format file's. The runtime densifies the weights
            when it prepares the model, so the file shrinks but inference is not faster.

    Returns:
        The destination path.

    Raises:
        ValueError: unknown `quantization`, a path not ending in `.tflite`, `int8` without
            calibration samples, or `sparse` with `dynamic` quantization.

    Example:
        >>> convert_to_tflite(model, "out/model.tflite", quantization="dynamic")
        >>> convert_to_tflite(pruned, "out/sparse.tflite", quantization="int8",
        ...                   calibration_x=x_train[:100], sparse=True)
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}. "
            f"Received: quantization={quantization!r}"
        )
    path = Path(path)
    if path.suffix != ".tflite":
        raise ValueError(f"A TFLite file must end in '.tflite'. Received: path={str(path)!r}")
    if sparse and quantization not in SPARSE_QUANTIZATIONS:
        raise ValueError(
            f"sparse=True works with quantization {', '.join(SPARSE_QUANTIZATIONS)}: with "
            f"{quantization!r} the TFLite runtime cannot prepare the file (XNNPACK fails on "
            "sparse hybrid weights). Use quantization='int8' (sparsity-preserving) or sparse=False."
        )
    kwargs = _converter_kwargs(quantization, calibration_x, sparse)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(temp_file_beside(path, ".tflite"))  # the umask's mode, kept by the rename
    try:
        model.export(tmp, format="litert", verbose=False, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def strip_tflite_names(path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Removes the strings a `.tflite` file does not need at run time: tensor names, subgraph
    names and the model description.

    The converter names every tensor after the Keras ops it fused (often a few hundred bytes of
    `model/layer/op;model/layer/op2`); the interpreter runs by tensor index. Kept: the weights
    and graph (outputs are bit-identical), the signature defs (their input and output keys and
    tensor indices, so `get_signature_runner` still works), the metadata entries
    (`min_runtime_version`, `CONVERSION_METADATA`) and custom op codes. Unlike TFLite's own
    `flatbuffer_utils.strip_strings`, the signature defs survive. What is lost: tensor names in
    `get_input_details()` / `get_tensor_details()` (they become empty), which only debugging
    tools read.

    Args:
        path: a `.tflite` file.
        out_path: destination (default: `path`, replaced); written through a temporary name and
            a rename (`_files.atomic_write_bytes`).

    Returns:
        The destination path.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a TFLite model, or `out_path` does not end in `.tflite`.

    Example:
        >>> convert_to_tflite(pruned, "out/model.tflite", quantization="int8",
        ...                   calibration_x=x_train[:100])
        >>> strip_tflite_names("out/model.tflite")  # a few hundred bytes fewer, same outputs
    """
    from keras_lean.export.sparse import _read_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TFLite file not found: {path}")
    out = path if out_path is None else Path(out_path)
    if out.suffix != ".tflite":
        raise ValueError(f"A TFLite file must end in '.tflite'. Received: out_path={str(out)!r}")
    from tensorflow.lite.tools import flatbuffer_utils

    model = _read_model(path)
    model.description = None
    for graph in model.subgraphs:
        graph.name = None
        for tensor in graph.tensors:
            tensor.name = None
    return atomic_write_bytes(out, bytes(flatbuffer_utils.convert_object_to_bytearray(model)))


def make_interpreter(path: str | os.PathLike) -> Any:
    """Loads a `.tflite` file in the LiteRT interpreter (`ai_edge_litert` when installed, else
    `tf.lite.Interpreter`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid TFLite model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TFLite file not found: {path}")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    try:
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it moves to ai_edge_litert; it still works.
            warnings.simplefilter("ignore", UserWarning)
            return Interpreter(model_path=str(path))
    except ValueError as e:
        raise ValueError(f"{path} is not a valid TFLite model: {e}") from e


class TFLiteRunner:
    """Runs batches through a `.tflite` model (single input, single output).

    Args:
        path: the `.tflite` file.

    Example:
        >>> runner = TFLiteRunner("out/model.tflite")
        >>> probs = runner(x_val[:32])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.interpreter = make_interpreter(self.path)
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{self.path}: only single-input single-output models are supported. "
                f"Received {len(inputs)} inputs and {len(outputs)} outputs."
            )
        self._in = inputs[0]
        self._out_index = outputs[0]["index"]
        self._batch: int | None = None

    def _resize(self, batch: int) -> None:
        if self._batch != batch:
            shape = [batch, *self._in["shape"][1:]]
            self.interpreter.resize_tensor_input(self._in["index"], shape)
            self.interpreter.allocate_tensors()
            self._batch = batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self._in["dtype"])
        self._resize(len(x))
        self.interpreter.set_tensor(self._in["index"], x)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self._out_index))
