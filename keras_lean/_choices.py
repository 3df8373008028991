"""Names the CLI offers as choices, in a module that imports nothing.

The constants live here (once) so that `keras-lean deploy --quantization int8` can validate its
option without importing `keras_lean.export`, which imports TensorFlow: TensorFlow must only be
imported after the console has silenced its start-up lines.
"""

from __future__ import annotations

#: TFLite post-training quantizations (`keras_lean.export.convert_to_tflite`).
QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
#: Quantizations that sparse storage works with: with "dynamic" (hybrid int8 weights) the converter
#: writes a file the interpreter's default XNNPACK delegate fails to prepare (TF 2.21).
SPARSE_QUANTIZATIONS = ("none", "float16", "int8")
#: Keras' own `Model.quantize` modes for the `.keras` artifact (`keras_lean.export.quantize_keras`);
#: gptq and awq calibrate on data and need a keras-hub causal LM.
KERAS_QUANTIZATIONS = ("none", "int8", "int4", "float8", "gptq", "awq")
