"""SavedModel export through Keras' `model.export(format="tf_saved_model")`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from keras_lean._files import give_default_modes, temp_dir_beside

if TYPE_CHECKING:  # pragma: no cover
    import keras


def export_saved_model(model: keras.Model, path: str | os.PathLike) -> Path:
    """Exports an inference SavedModel (endpoint `serve`) to the folder `path`.

    The export goes to a temporary folder beside `path` that replaces it in one rename, so a
    failed export leaves an earlier one intact.

    Args:
        model: a plain Keras model.
        path: the SavedModel folder.

    Returns:
        The folder. Load it with `tf.saved_model.load(path)` and call `.serve(x)`.

    Example:
        >>> export_saved_model(model, "out/saved_model")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(path)
    old = None
    try:
        target = tmp / "saved_model"
        model.export(str(target), format="tf_saved_model", verbose=False)
        give_default_modes(target)  # TensorFlow makes its folders 0755 whatever the umask
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
