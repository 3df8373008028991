"""Built-in baseline architectures and loading the user's own model."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import keras

ARCHITECTURES = ("cnn", "mlp")


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Builds an untrained built-in classifier (softmax outputs).

    Args:
        arch: `"cnn"` (two 3x3 convolutions, max pooling, a 128-unit dense layer; for image
            inputs of shape (height, width, channels)) or `"mlp"` (two dense layers of 256 and
            128 units over the flattened input).
        input_shape: one sample's shape, e.g. `(8, 8, 1)`.
        num_classes: number of classes (>= 2).

    Returns:
        A functional Keras model with named layers (`conv1`, `conv2`, `dense1`, `dense2`,
        `output`), not compiled.

    Raises:
        ValueError: unknown `arch`, a CNN on non-image inputs, or `num_classes < 2`.

    Example:
        >>> model = build_model("cnn", (8, 8, 1), 10)
        >>> model.output_shape
        (None, 10)
    """
    import keras

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}. Received: arch={arch!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2. Received: num_classes={num_classes}")
    input_shape = tuple(int(d) for d in input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    if arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(
                f"arch='cnn' needs image inputs of shape (height, width, channels). "
                f"Received: input_shape={input_shape}; use arch='mlp' for flat features."
            )
        x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
        x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
        # Small inputs (digits are 8x8) pool once; larger ones pool down to at most 8x8.
        pool = max(2, min(input_shape[0], input_shape[1]) // 8)
        x = keras.layers.MaxPooling2D(pool, name="pool")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(128, activation="relu", name="dense1")(x)
        x = keras.layers.Dropout(0.25, name="dropout")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(inputs)
        x = keras.layers.Dense(256, activation="relu", name="dense1")(x)
        x = keras.layers.Dense(128, activation="relu", name="dense2")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="output")(x)
    return keras.Model(inputs, outputs, name=f"keras_lean_{arch}")


def load_model(path: str | os.PathLike, *, compile: bool = False) -> keras.Model:
    """Loads a Keras 3 `.keras` model file with clear errors.

    Args:
        path: the `.keras` file.
        compile: restore the training configuration too (optimizer state for resuming).

    Returns:
        The model.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a `.keras` archive, or it is corrupt or not loadable.
    """
    import keras

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model file not found: {path}")
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; expected a Keras 3 '.keras' file (a SavedModel folder cannot "
            f"be fine-tuned: save the model with model.save('model.keras'))."
        )
    if path.suffix != ".keras":
        raise ValueError(
            f"{path} is not a Keras model file: expected a '.keras' file "
            f"(save with model.save('model.keras')). Received suffix {path.suffix!r}."
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a valid .keras file (not a zip archive; corrupt?).")
    # Importing the technique packages registers their layers (pruning wrappers, channel masks,
    # low-rank layers) with Keras' serialization, so a mid-fine-tuning model loads by name.
    import keras_lean.lowrank  # noqa: F401
    import keras_lean.sparsity  # noqa: F401
    import keras_lean.structured  # noqa: F401

    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many types for a broken archive; report them as one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} could not be loaded as a Keras model: {first}") from e
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a Keras model.")
    return model
