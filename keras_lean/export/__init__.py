"""Deployment: SavedModel and TFLite (with quantization), checked and measured.

The only keras_lean package (with the TFMOT schedules and strategy set-up) that calls `tf.*`
directly; TensorFlow is imported when a function runs, not on import.

Example:
    >>> from keras_lean.export import export_model
    >>> report = export_model(model, "out", quantization="int8", calibration_x=x_train[:100],
    ...                       check_x=x_val, check_y=y_val)
    >>> report.tflite_gzip_bytes, report.max_abs_diff
"""

from __future__ import annotations

from keras_lean.export.api import FORMATS, ExportReport, export_model, measure_latency_ms
from keras_lean.export.equivalence import (
    FLOAT_TOLERANCE,
    Equivalence,
    EquivalenceError,
    compare_outputs,
    tflite_equivalence,
    tolerance_for,
)
from keras_lean.export.fold import fold_batchnorm
from keras_lean.export.quantize import (
    CALIBRATED_QUANTIZATIONS,
    KERAS_QUANTIZATIONS,
    KerasQuantizationReport,
    calibration_config,
    quantize_keras,
    quantize_keras_artifact,
)
from keras_lean.export.saved_model import export_saved_model
from keras_lean.export.sizes import SizeReport, file_sizes, gzip_size, weight_sizes
from keras_lean.export.sparse import SparseStorage, sparse_storage, tflite_ops
from keras_lean.export.tflite import (
    QUANTIZATIONS,
    SPARSE_QUANTIZATIONS,
    TFLiteRunner,
    convert_to_tflite,
    make_interpreter,
    strip_tflite_names,
)

__all__ = [
    "CALIBRATED_QUANTIZATIONS",
    "FLOAT_TOLERANCE",
    "FORMATS",
    "KERAS_QUANTIZATIONS",
    "QUANTIZATIONS",
    "SPARSE_QUANTIZATIONS",
    "Equivalence",
    "EquivalenceError",
    "ExportReport",
    "KerasQuantizationReport",
    "SizeReport",
    "SparseStorage",
    "TFLiteRunner",
    "calibration_config",
    "compare_outputs",
    "convert_to_tflite",
    "export_model",
    "export_saved_model",
    "file_sizes",
    "fold_batchnorm",
    "gzip_size",
    "make_interpreter",
    "measure_latency_ms",
    "quantize_keras",
    "quantize_keras_artifact",
    "sparse_storage",
    "strip_tflite_names",
    "tflite_equivalence",
    "tflite_ops",
    "tolerance_for",
    "weight_sizes",
]
