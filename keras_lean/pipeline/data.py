"""Training and validation data: scikit-learn's digits, `.npz` files and image folders.

`load_data(spec)` returns a checked `Data` (float32 inputs, int32 labels, no NaNs, labels in
`[0, num_classes)`); `check_data_against_model` compares it with a model's input and output shapes.
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
    if not (isinstance(val_split, (int, float)) and 0 < val_split < 1):
        raise ValueError(f"val_split must be in (0, 1). Received: val_split={val_split!r}")
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
        return _finish(*_split(x, y, val_split, seed), source=str(path), num_classes=len(classes))
    if path.suffix.lower() == ".npz":
        return _npz(path, val_split, seed)
    raise ValueError(
        f"Unsupported data file {str(path)!r}: expected 'digits', a .npz file or an image folder."
    )


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    return x, d.target.astype("int32")


def _split(x, y, val_split, seed):
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}; they must match.")
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    n_val = max(1, int(round(len(x) * val_split)))
    if n_val >= len(x):
        raise ValueError(
            f"val_split={val_split} leaves no training samples out of {len(x)}; lower it."
        )
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def _npz(path: Path, val_split: float, seed: int) -> Data:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile/pickle/OS errors: all mean "not a readable .npz"
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    keys = set(arrays)
    split_keys = {"x_train", "y_train", "x_val", "y_val"}
    if split_keys <= keys:
        parts = [arrays[k] for k in ("x_train", "y_train", "x_val", "y_val")]
    elif {"x", "y"} <= keys:
        parts = _split(arrays["x"], arrays["y"], val_split, seed)
    else:
        raise ValueError(
            f"{path}: expected arrays x_train, y_train, x_val, y_val (or x, y). "
            f"Found: {', '.join(sorted(keys)) or 'none'}"
        )
    return _finish(*parts, source=str(path))


def _image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(
            f"{path}: an image folder needs one subfolder per class (at least 2). Found: {classes}"
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        imgs = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise ValueError(f"{path / name}: class folder has no images ({IMAGE_SUFFIXES}).")
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
            raise ValueError(f"{p}: not a readable image ({e})") from e
    mode = "L" if modes == {"L"} else "RGB"
    size = images[0].size
    arrays = []
    for (p, _), im in zip(files, images, strict=True):
        if im.size != size:
            raise ValueError(
                f"{p}: image size {im.size} differs from the first image's {size}; "
                f"all images must have the same size."
            )
        a = np.asarray(im.convert(mode), dtype="float32") / 255.0
        arrays.append(a[..., None] if mode == "L" else a)
    x = np.stack(arrays)
    y = np.array([label for _, label in files], dtype="int32")
    return x, y, classes


def _labels(y: np.ndarray, name: str, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.shape[1] > 1:
        # One-hot labels: accept them if every row is exactly one-hot.
        if np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1):
            y = y.argmax(axis=1)
        else:
            raise ValueError(
                f"{source}: {name} has shape {y.shape}; expected integer class labels of shape "
                f"(n,) or one-hot rows."
            )
    if y.ndim != 1:
        raise ValueError(f"{source}: {name} must be 1-D class labels. Received shape {y.shape}")
    if y.dtype.kind == "f":
        if np.isnan(y).any():
            raise ValueError(f"{source}: {name} contains NaN labels.")
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError(
                f"{source}: {name} has non-integer labels, e.g. {y[np.mod(y, 1) != 0][0]}"
            )
    elif y.dtype.kind not in "iub":
        raise ValueError(f"{source}: {name} must hold integer labels. Received dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise ValueError(
            f"{source}: labels out of range: {name} has label {int(y.min())}; labels must be >= 0."
        )
    return y.astype("int32")


def _inputs(x: np.ndarray, name: str, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{source}: {name} must be numeric. Received dtype {x.dtype}")
    x = x.astype("float32")
    if x.ndim < 2:
        raise ValueError(f"{source}: {name} must have a sample axis and features. Shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        kind = "NaN" if np.isnan(x[first]) else "infinite"
        raise ValueError(
            f"{source}: {name} contains {int(bad.sum())} NaN/infinite values "
            f"(first {kind} at index {first})."
        )
    return x


def _finish(x_train, y_train, x_val, y_val, *, source: str, num_classes: int | None = None) -> Data:
    x_train = _inputs(x_train, "x_train", source)
    x_val = _inputs(x_val, "x_val", source)
    y_train = _labels(y_train, "y_train", source)
    y_val = _labels(y_val, "y_val", source)
    for x, y, n in ((x_train, y_train, "train"), (x_val, y_val, "val")):
        if len(x) != len(y):
            raise ValueError(f"{source}: x_{n} has {len(x)} samples but y_{n} has {len(y)}.")
        if len(x) == 0:
            raise ValueError(f"{source}: the {n} split is empty.")
    if x_train.shape[1:] != x_val.shape[1:]:
        raise ValueError(
            f"{source}: x_train samples have shape {x_train.shape[1:]} but x_val samples "
            f"{x_val.shape[1:]}."
        )
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    if num_classes is not None:
        n_classes = max(n_classes, num_classes)
    return Data(x_train, y_train, x_val, y_val, num_classes=n_classes)


def check_data_against_model(data: Data, model: keras.Model, *, model_name: str = "model") -> None:
    """Raises ValueError if `data` does not fit `model`'s input shape or number of outputs.

    Args:
        data: the data.
        model: a single-input classifier.
        model_name: how to call the model in the message (a file name).

    Raises:
        ValueError: the shapes differ (both are shown), or a label is >= the number of outputs.
    """
    in_shape = model.input_shape
    if isinstance(in_shape, list):
        if len(in_shape) != 1:
            raise ValueError(f"{model_name} has {len(in_shape)} inputs; only 1 is supported.")
        in_shape = in_shape[0]
    sample = data.x_train.shape[1:]
    expected = tuple(in_shape[1:])
    if len(expected) != len(sample) or any(
        e is not None and e != s for e, s in zip(expected, sample, strict=False)
    ):
        raise ValueError(
            f"Data shape {sample} (per sample) does not match {model_name}'s input shape "
            f"{tuple(in_shape)}."
        )
    out_shape = model.output_shape
    if isinstance(out_shape, list):
        out_shape = out_shape[0]
    n_out = out_shape[-1]
    max_label = int(max(data.y_train.max(), data.y_val.max()))
    if n_out is not None and n_out > 1 and max_label >= n_out:
        raise ValueError(
            f"Labels out of range: the data has label {max_label} but {model_name} has "
            f"{n_out} outputs (labels must be in [0, {n_out - 1}])."
        )
