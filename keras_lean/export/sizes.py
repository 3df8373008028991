"""Model size figures: parameter and nonzero counts, raw and gzip bytes of files and weights."""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras

# gzip level 9, as TFMOT's pruning guide measures compressed model size.
_GZIP_LEVEL = 9


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Sizes of a model or an artifact.

    Attributes:
        params: number of weights (every variable of the model).
        nonzero_params: weights that are not exactly zero.
        raw_bytes: uncompressed size in bytes.
        gzip_bytes: gzip (level 9) size in bytes.
    """

    params: int
    nonzero_params: int
    raw_bytes: int
    gzip_bytes: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sparsity": self.sparsity}


def gzip_size(data: bytes) -> int:
    """Returns the size of `data` after gzip compression at level 9."""
    return len(gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0))


def file_sizes(path: str | os.PathLike) -> tuple[int, int]:
    """Returns (raw_bytes, gzip_bytes) of a file, or summed over the files of a folder.

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file or folder: {path}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    raw = gz = 0
    for f in files:
        data = f.read_bytes()
        raw += len(data)
        gz += gzip_size(data)
    return raw, gz


def weight_sizes(model: keras.Model) -> SizeReport:
    """Counts a model's weights and measures them as raw and gzip bytes.

    The weights are concatenated in their own dtypes (float32 for a float32 model), as they would
    be stored, so the gzip size shows what zeros buy after compression.

    Args:
        model: a Keras model (in its deployable form: wrappers stripped).

    Returns:
        A `SizeReport`.
    """
    arrays = [np.asarray(w) for w in model.get_weights()]
    params = int(sum(a.size for a in arrays))
    nonzero = int(sum(np.count_nonzero(a) for a in arrays))
    blob = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return SizeReport(params, nonzero, len(blob), gzip_size(blob))
