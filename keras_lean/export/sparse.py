"""What a `.tflite` file's sparse storage holds: values, index arrays, the entropy bound.

TFLite stores a weight tensor converted with `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` as its
nonzero values plus, per sparse dimension, a segment array and an index array (CSR-like). This
module reads those arrays back from the flatbuffer and puts them beside the information-theoretic
bound: `n * H(k / n)` bits to say which `k` of `n` positions are nonzero, plus the values at their
stored width. It also lists the operators, so a report can say whether the runtime densifies the
weights at load time (a `DENSIFY` op per sparse tensor: smaller file, same dense kernels).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

# TFLite TensorType -> bytes per element (schema.fbs); types that weights use.
_ITEMSIZE = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8, 16: 2, 17: 1}


@dataclasses.dataclass(frozen=True)
class SparseTensorStorage:
    """One weight tensor stored in TFLite's sparse format.

    Attributes:
        name: the tensor's name in the flatbuffer.
        shape: its dense shape.
        elements: elements of the dense tensor.
        stored_values: values stored (the nonzeros, and any zeros inside stored blocks).
        values_bytes: bytes of the stored values.
        index_bytes: bytes of the segment and index arrays.
        dense_bytes: bytes the tensor takes in dense format.
        position_entropy_bytes: `elements * H(stored_values / elements) / 8`, the fewest bytes
            any code needs on average to say which positions are stored.
    """

    name: str
    shape: tuple[int, ...]
    elements: int
    stored_values: int
    values_bytes: int
    index_bytes: int
    dense_bytes: int
    position_entropy_bytes: float


@dataclasses.dataclass(frozen=True)
class SparseStorage:
    """The sparse storage of a `.tflite` file.

    Attributes:
        file_bytes: the file's size.
        tensors: every tensor stored sparsely.
        densify_ops: `DENSIFY` operators in the graph: each expands a sparse weight tensor to
            dense when the interpreter prepares the model, after which the usual dense kernels run.
    """

    file_bytes: int
    tensors: tuple[SparseTensorStorage, ...]
    densify_ops: int

    @property
    def values_bytes(self) -> int:
        return sum(t.values_bytes for t in self.tensors)

    @property
    def index_bytes(self) -> int:
        return sum(t.index_bytes for t in self.tensors)

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def position_entropy_bytes(self) -> float:
        return sum(t.position_entropy_bytes for t in self.tensors)

    @property
    def entropy_bound_bytes(self) -> float:
        """Stored values at their width plus the position entropy: what an ideal index costs."""
        return self.values_bytes + self.position_entropy_bytes

    @property
    def index_overhead_bytes(self) -> float:
        """How many bytes the index arrays take beyond the position entropy."""
        return self.index_bytes - self.position_entropy_bytes

    @property
    def runtime_densifies(self) -> bool:
        return self.densify_ops > 0

    def to_dict(self) -> dict:
        return {
            "file_bytes": self.file_bytes,
            "sparse_tensors": len(self.tensors),
            "values_bytes": self.values_bytes,
            "index_bytes": self.index_bytes,
            "dense_bytes": self.dense_bytes,
            "position_entropy_bytes": round(self.position_entropy_bytes, 1),
            "entropy_bound_bytes": round(self.entropy_bound_bytes, 1),
            "index_overhead_bytes": round(self.index_overhead_bytes, 1),
            "densify_ops": self.densify_ops,
            "runtime_densifies": self.runtime_densifies,
            "tensors": [dataclasses.asdict(t) for t in self.tensors],
        }


def _binary_entropy_bits(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _index_bytes(sparsity) -> int:
    total = 0
    for dim in sparsity.dimMetadata or ():
        for arr in (dim.arraySegments, dim.arrayIndices):
            values = getattr(arr, "values", None)
            if values is not None:
                total += np.asarray(values).nbytes
    return total


def _read_model(path: Path):
    from tensorflow.lite.tools import flatbuffer_utils

    try:
        return flatbuffer_utils.read_model(str(path))
    except Exception as e:  # the flatbuffer reader raises bare errors on bad files
        raise ValueError(f"{path} is not a valid TFLite model: {e}") from e


def tflite_ops(path: str | os.PathLike) -> list[str]:
    """Returns the builtin operator names of a `.tflite` file's main graph, in execution order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a TFLite model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TFLite file not found: {path}")
    from tensorflow.lite.python import schema_py_generated as schema

    model = _read_model(path)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [
        names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "CUSTOM")
        for c in model.operatorCodes
    ]
    return [codes[op.opcodeIndex] for op in model.subgraphs[0].operators]


def sparse_storage(path: str | os.PathLike) -> SparseStorage:
    """Reads how a `.tflite` file stores its sparse tensors.

    Args:
        path: a `.tflite` file (converted with or without sparsity; without, `tensors` is empty).

    Returns:
        A `SparseStorage`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a TFLite model.

    Example:
        >>> s = sparse_storage("out/model.tflite")
        >>> s.index_bytes, s.position_entropy_bytes, s.runtime_densifies
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"TFLite file not found: {path}")
    model = _read_model(path)
    tensors = []
    for graph in model.subgraphs:
        for t in graph.tensors:
            if t.sparsity is None:
                continue
            data = model.buffers[t.buffer].data
            values_bytes = 0 if data is None else len(data)
            itemsize = _ITEMSIZE.get(int(t.type), 1)
            shape = tuple(int(d) for d in t.shape)
            elements = int(np.prod(shape)) if shape else 1
            stored = values_bytes // itemsize
            tensors.append(
                SparseTensorStorage(
                    name=t.name.decode() if isinstance(t.name, bytes) else str(t.name),
                    shape=shape,
                    elements=elements,
                    stored_values=stored,
                    values_bytes=values_bytes,
                    index_bytes=_index_bytes(t.sparsity),
                    dense_bytes=elements * itemsize,
                    position_entropy_bytes=elements * _binary_entropy_bits(stored / elements) / 8,
                )
            )
    densify = sum(1 for op in tflite_ops(path) if op == "DENSIFY")
    return SparseStorage(path.stat().st_size, tuple(tensors), densify)


def latency_note(storage: SparseStorage, sparse_ms: float | None, dense_ms: float | None) -> str:
    """One honest sentence on what the sparse format buys at run time on this runtime."""
    if not storage.tensors:
        return "the converter stored no tensor sparsely (the weights are not sparse enough)"
    measured = ""
    if sparse_ms is not None and dense_ms is not None:
        measured = f" (measured {sparse_ms:.3f} ms sparse vs {dense_ms:.3f} ms dense format)"
    if storage.runtime_densifies:
        return (
            f"storage only: the runtime expands the {storage.densify_ops} sparse weight tensors "
            f"to dense at load (DENSIFY ops) and runs dense kernels, so no speed-up is expected"
            f"{measured}"
        )
    return f"the runtime executes the sparse tensors with sparse kernels{measured}"
