"""Training and validation data: scikit-learn's digits, `.npz` files and image folders.

`load_data(spec)` returns a checked `Data` (float32 inputs, int32 labels, no NaNs, labels in
`[0, num_classes)`); `check_data_against_model` compares it with a model's input and output shapes.
Both raise `DataError` (a `ValueError`) for bad data, naming the file and the array.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keras_lean.pipeline.methods.base import Data

if TYPE_CHECKING:  # pragma: no cover
    import keras

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
NPZ_SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val")
# Labels index the model's outputs; beyond int32 they cannot be class indices at all.
_MAX_LABEL = np.iinfo(np.int32).max - 1


class DataError(ValueError):
    """Data that cannot be used: `str()` is `"<source>: <message>"`, naming the array.

    Attributes:
        source: the data (a file, a folder), or None when the message names what it is about.
        array: the array or field at fault (`"x_train"`, `"y_val"`, `"val_split"`...), or None
            when it is about the whole file.
        message: what is wrong and what was expected.
    """

    def __init__(self, source: str | None, message: str, array: str | None = None):
        self.source, self.array, self.message = source, array, message
        super().__init__(message if source is None else f"{source}: {message}")


def load_data(spec: str | os.PathLike = "digits", *, val_split: float = 0.2, seed: int = 0) -> Data:
    """Loads and checks a data set.

    Args:
        spec: `"digits"` (scikit-learn's bundled 8x8 digits, 1,797 images of 10 classes), a
            `.npz` file with `x_train, y_train, x_val, y_val` (or `x, y`, split by `val_split`),
            or a folder of images with one subfolder per class (sorted names are the classes).
        val_split: fraction of samples held out for validation when the source has no split.
        seed: seed of the shuffle before the split.

    Returns:
        A `Data` with float32 inputs and int32 labels.

    Raises:
        FileNotFoundError: `spec` is neither `digits` nor an existing file or folder.
        ValueError: unreadable file, missing arrays, NaNs or infinities, bad labels, mismatched
            lengths (the message names the file and the array).

    Example:
        >>> data = load_data("digits")
        >>> data.x_train.shape[1:], data.num_classes
        ((8, 8, 1), 10)
    """
    if isinstance(val_split, bool) or not (
        isinstance(val_split, (int, float)) and 0 < val_split < 1
    ):
        raise DataError(
            None, f"val_split must be in (0, 1). Received: val_split={val_split!r}", "val_split"
        )
    spec_str = str(spec)
    if spec_str == "digits":
        x, y = _digits()
        return _finish(*_split(x, y, val_split, seed), source="digits")
    path = Path(spec_str)
    if not path.exists():
        raise FileNotFoundError(
            f"Data not found: {spec_str!r}. Use 'digits', a .npz file or an image folder."
        )
    if path.is_dir():
        x, y, classes = _image_folder(path)
        parts = _split(x, y, val_split, seed, str(path))
        return _finish(*parts, source=str(path), num_classes=len(classes))
    if path.suffix.lower() == ".npz":
        return _npz(path, val_split, seed)
    raise DataError(
        str(path), "Unsupported data file: expected 'digits', a .npz file or an image folder."
    )


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    return x, d.target.astype("int32")


def _split(x, y, val_split, seed, source: str = "data"):
    for name, a in (("x", x), ("y", y)):
        if np.ndim(a) == 0:
            raise DataError(source, f"{name} must have a sample axis. Received a scalar", name)
    if len(x) != len(y):
        raise DataError(source, f"x has {len(x)} samples but y has {len(y)}; they must match.", "y")
    if len(x) == 0:
        raise DataError(source, "x has no samples.", "x")
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    n_val = max(1, int(round(len(x) * val_split)))
    if n_val >= len(x):
        raise DataError(
            source,
            f"val_split={val_split} leaves no training samples out of {len(x)}; lower it.",
            "val_split",
        )
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def _npz(path: Path, val_split: float, seed: int) -> Data:
    source = str(path)
    arrays = _read_npz(path)
    keys = set(arrays)
    if set(NPZ_SPLIT_KEYS) <= keys:
        parts = [arrays[k] for k in NPZ_SPLIT_KEYS]
    elif {"x", "y"} <= keys:
        parts = _split(arrays["x"], arrays["y"], val_split, seed, source)
    else:
        missing = [k for k in NPZ_SPLIT_KEYS if k not in keys]
        raise DataError(
            source,
            f"expected arrays x_train, y_train, x_val, y_val (or x, y); missing "
            f"{', '.join(missing)}. Found: {', '.join(sorted(keys)) or 'none'}",
            missing[0],
        )
    return _finish(*parts, source=source)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, read without unpickling anything."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile/pickle/OS errors: all mean "not a readable .npz"
        raise DataError(str(path), f"not a readable .npz file ({type(e).__name__}: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):  # a lone .npy saved under a .npz name
        raise DataError(
            str(path),
            "not an .npz archive (it holds one array, like a .npy file); save the arrays with "
            "np.savez(path, x_train=..., y_train=..., x_val=..., y_val=...).",
        )
    arrays = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as e:
                raise DataError(
                    str(path),
                    f"{key} cannot be read without unpickling (an object array?): save numeric "
                    f"arrays only ({e})",
                    key,
                ) from e
            except Exception as e:  # a truncated member: zlib/zipfile/OS errors
                raise DataError(
                    str(path), f"{key} is unreadable ({type(e).__name__}: {e})", key
                ) from e
    return arrays


def _image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            str(path),
            f"an image folder needs one subfolder per class (at least 2). Found: {classes}",
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        imgs = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise DataError(str(path / name), f"class folder has no images ({IMAGE_SUFFIXES}).")
        files.extend((p, label) for p in imgs)
    images = []
    modes = set()
    for p, _ in files:
        try:
            with Image.open(p) as im:
                im.load()
                modes.add("L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB")
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(str(p), f"not a readable image ({e})") from e
    mode = "L" if modes == {"L"} else "RGB"
    size = images[0].size
    arrays = []
    for (p, _), im in zip(files, images, strict=True):
        if im.size != size:
            raise DataError(
                str(p),
                f"image size {im.size} differs from the first image's {size}; all images must "
                "have the same size.",
            )
        a = np.asarray(im.convert(mode), dtype="float32") / 255.0
        arrays.append(a[..., None] if mode == "L" else a)
    x = np.stack(arrays)
    y = np.array([label for _, label in files], dtype="int32")
    return x, y, classes


def _labels(y: np.ndarray, name: str, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iubf":
        raise DataError(source, f"{name} must hold integer labels. Received dtype {y.dtype}", name)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1:
        # One-hot labels: accept them if every row is exactly one-hot.
        if np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1):
            y = y.argmax(axis=1)
        else:
            raise DataError(
                source,
                f"{name} has shape {y.shape}; expected integer class labels of shape (n,) or "
                "one-hot rows.",
                name,
            )
    if y.ndim != 1:
        raise DataError(source, f"{name} must be 1-D class labels. Received shape {y.shape}", name)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(source, f"{name} contains NaN or infinite labels.", name)
        if not np.all(np.mod(y, 1) == 0):
            raise DataError(
                source, f"{name} has non-integer labels, e.g. {y[np.mod(y, 1) != 0][0]}", name
            )
    if len(y) and y.min() < 0:
        raise DataError(
            source, f"labels out of range: {name} has label {y.min()}; labels must be >= 0.", name
        )
    if len(y) and y.max() > _MAX_LABEL:
        raise DataError(
            source,
            f"labels out of range: {name} has label {y.max()}; class labels must be below "
            f"{_MAX_LABEL + 1}.",
            name,
        )
    return y.astype("int32")


def _inputs(x: np.ndarray, name: str, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise DataError(source, f"{name} must be numeric. Received dtype {x.dtype}", name)
    if x.ndim < 2:
        raise DataError(
            source, f"{name} must have a sample axis and features. Received shape {x.shape}", name
        )
    if 0 in x.shape[1:]:
        raise DataError(source, f"{name} samples have no features: shape {x.shape}", name)
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf
        x = x.astype("float32")
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(x[first]) else "infinite (or beyond float32)"
        raise DataError(
            source,
            f"{name} contains {int(bad.sum())} NaN/infinite values (first {kind} at index "
            f"{first}).",
            name,
        )
    return x


def _finish(x_train, y_train, x_val, y_val, *, source: str, num_classes: int | None = None) -> Data:
    x_train = _inputs(x_train, "x_train", source)
    x_val = _inputs(x_val, "x_val", source)
    y_train = _labels(y_train, "y_train", source)
    y_val = _labels(y_val, "y_val", source)
    for x, y, n in ((x_train, y_train, "train"), (x_val, y_val, "val")):
        if len(x) != len(y):
            raise DataError(source, f"x_{n} has {len(x)} samples but y_{n} has {len(y)}.", f"y_{n}")
        if len(x) == 0:
            raise DataError(source, f"the {n} split is empty (x_{n} has no samples).", f"x_{n}")
    if x_train.shape[1:] != x_val.shape[1:]:
        raise DataError(
            source,
            f"x_train samples have shape {x_train.shape[1:]} but x_val samples {x_val.shape[1:]}.",
            "x_val",
        )
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    if num_classes is not None:
        n_classes = max(n_classes, num_classes)
    if n_classes < 2:
        raise DataError(
            source, "y_train and y_val hold one class only (label 0); a classifier needs two.",
            "y_train",
        )  # fmt: skip
    return Data(x_train, y_train, x_val, y_val, num_classes=n_classes)


def _single_shape(shape, what: str, model_name: str):
    """`shape` of a single-input (or single-output) model; DataError for several."""
    if isinstance(shape, dict):
        shape = list(shape.values())
    if isinstance(shape, list):
        if len(shape) != 1:
            raise DataError(
                model_name, f"has {len(shape)} {what}s; only 1 is supported.", f"model {what}"
            )
        shape = shape[0]
    if not isinstance(shape, tuple) or not shape:
        raise DataError(model_name, f"has an unsupported {what} shape {shape!r}", f"model {what}")
    return shape


def check_data_against_model(data: Data, model: keras.Model, *, model_name: str = "model") -> None:
    """Raises `DataError` if `data` does not fit `model`'s input shape or number of outputs.

    Args:
        data: the data.
        model: a single-input classifier.
        model_name: how to call the model in the message (a file name).

    Raises:
        DataError: the shapes differ (both are shown), a label is >= the number of outputs, or
            the model has several inputs/outputs or no known input shape.
    """
    try:
        in_shape, out_shape = model.input_shape, model.output_shape
    except (AttributeError, ValueError) as e:  # a subclassed model never called on data
        raise DataError(
            model_name,
            "has no known input shape (call it on a batch, or give it a keras.Input).",
            "model input",
        ) from e
    in_shape = _single_shape(in_shape, "input", model_name)
    out_shape = _single_shape(out_shape, "output", model_name)
    sample = data.x_train.shape[1:]
    expected = tuple(in_shape[1:])
    if len(expected) != len(sample) or any(
        e is not None and e != s for e, s in zip(expected, sample, strict=False)
    ):
        raise DataError(
            None,
            f"Data shape {sample} (per sample) does not match {model_name}'s input shape "
            f"{tuple(in_shape)}.",
            "x_train",
        )
    n_out = out_shape[-1]
    labels = [y for y in (data.y_train, data.y_val) if len(y)]
    max_label = max((int(y.max()) for y in labels), default=0)
    if n_out is not None and n_out > 1 and max_label >= n_out:
        raise DataError(
            None,
            f"Labels out of range: the data has label {max_label} but {model_name} has {n_out} "
            f"outputs (labels must be in [0, {n_out - 1}]).",
            "y_train" if len(data.y_train) and int(data.y_train.max()) == max_label else "y_val",
        )
