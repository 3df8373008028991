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


LEGACY_SUFFIXES = (".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def load_model(path: str | os.PathLike, *, compile: bool = False) -> keras.Model:
    """Loads a Keras model file with clear errors: Keras 3 `.keras`, or a legacy model.

    Legacy models are read by Keras 3 itself: an HDF5 file (`.h5` / `.hdf5`, from
    `model.save("model.h5")` in tf_keras / Keras 2 or Keras 3) and a `.keras` archive saved by
    tf_keras. The caller adopts the returned model as any other (the pipeline saves it as
    `baseline.keras`). A legacy file Keras 3 cannot rebuild is refused with one line saying how
    to convert it.

    Args:
        path: the `.keras`, `.h5` or `.hdf5` file.
        compile: restore the training configuration too (optimizer state for resuming).

    Returns:
        The model.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a model file, is corrupt, holds only weights, or cannot be
            rebuilt by Keras 3 (the message says how to convert it).
    """
    import keras

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model file not found: {path}")
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; expected a '.keras' file (or a legacy '.h5'). A SavedModel "
            "folder cannot be fine-tuned in Keras 3: if tf_keras saved it, convert it with "
            f"python -c \"import tf_keras; tf_keras.models.load_model('{path}')"
            f".save('{path.name}.h5')\" and pass the .h5 file."
        )
    suffix = path.suffix.lower()
    if suffix in LEGACY_SUFFIXES:
        _check_legacy_h5(path)
    elif suffix != ".keras":
        raise ValueError(
            f"{path} is not a Keras model file: expected a '.keras' file, or a legacy '.h5' / "
            f"'.hdf5' (model.save('model.h5') in tf_keras). Received suffix {path.suffix!r}."
        )
    elif not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a valid .keras file (not a zip archive; corrupt?).")
    # Importing the technique packages registers their layers (pruning wrappers, channel masks,
    # low-rank layers) with Keras' serialization, so a mid-fine-tuning model loads by name.
    import keras_lean.lowrank  # noqa: F401
    import keras_lean.sparsity  # noqa: F401
    import keras_lean.structured  # noqa: F401
    from keras_lean.pipeline.text import import_hub_if_needed

    import_hub_if_needed(path)  # a text model (keras-hub backbone) needs keras_hub registered
    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many types for a broken archive; report them as one
        raise ValueError(_load_error(path, e)) from e
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a Keras model.")
    return model


def _check_legacy_h5(path: Path) -> None:
    """Refuses an HDF5 file that is corrupt or holds only weights, before Keras reads it."""
    with open(path, "rb") as f:
        signature = f.read(len(_HDF5_SIGNATURE))
    if signature != _HDF5_SIGNATURE:
        raise ValueError(
            f"{path} is not a Keras model file: not a valid HDF5 file (no HDF5 signature; "
            "truncated or corrupt?)."
        )
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            has_config = "model_config" in h5.attrs
    except OSError as e:
        raise ValueError(
            f"{path} is not a Keras model file: not a valid HDF5 file (truncated or corrupt?): {e}"
        ) from e
    if not has_config:
        raise ValueError(
            f"{path} holds only weights (saved with save_weights, no model config). Convert "
            f"it: build the same architecture with Keras 3 layers, call model.load_weights("
            f"'{path}'), then model.save('{path.stem}.keras') and pass that file."
        )


def _saved_by(path: Path) -> str | None:
    """The Keras version that wrote a `.keras` or HDF5 file, when it says."""
    try:
        if path.suffix.lower() in LEGACY_SUFFIXES:
            import h5py

            with h5py.File(path, "r") as h5:
                version = h5.attrs.get("keras_version")
            return version.decode() if isinstance(version, bytes) else version
        import json

        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("metadata.json")).get("keras_version")
    except Exception:  # an unreadable version is only a missing detail in the message
        return None


def _load_error(path: Path, error: Exception) -> str:
    """The one line that says why Keras 3 could not load `path` and how to convert it."""
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
    version = _saved_by(path)
    legacy = path.suffix.lower() in LEGACY_SUFFIXES
    if not legacy and not (version or "").startswith(("1.", "2.")):
        return f"{path} could not be loaded as a Keras model: {first}"
    writer = f"Keras {version}" if version else "an older Keras"
    if legacy:
        how = (
            f"build the same architecture with Keras 3 layers, call model.load_weights('{path}') "
            f"(Keras 3 reads legacy HDF5 weights), then model.save('{path.stem}.keras') and pass "
            "that file"
        )
    else:
        how = (
            f"with tf_keras run tf_keras.models.load_model('{path}').save('{path.stem}.h5') and "
            f"pass {path.stem}.h5 (Keras 3 reads legacy HDF5 models)"
        )
    kind = "legacy HDF5 model" if legacy else "model saved by tf_keras"
    return f"{path} is a {kind} ({writer}) that Keras 3 cannot rebuild: {first}. Convert it: {how}."
