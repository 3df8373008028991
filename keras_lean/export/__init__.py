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
from keras_lean.export.fold import fold_batchnorm
from keras_lean.export.saved_model import export_saved_model
from keras_lean.export.sizes import SizeReport, file_sizes, gzip_size, weight_sizes
from keras_lean.export.tflite import (
    QUANTIZATIONS,
    TFLiteRunner,
    convert_to_tflite,
    make_interpreter,
)

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "ExportReport",
    "SizeReport",
    "TFLiteRunner",
    "convert_to_tflite",
    "export_model",
    "export_saved_model",
    "file_sizes",
    "fold_batchnorm",
    "gzip_size",
    "make_interpreter",
    "measure_latency_ms",
    "weight_sizes",
]
