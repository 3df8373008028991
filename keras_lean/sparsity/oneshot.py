"""One-shot calibration pruning of Dense / EinsumDense projections: magnitude, Wanda, SparseGPT.

No training: a few calibration batches are run through the model and every selected projection
is pruned once, in the order the model calls them. Each layer sees the outputs of the layers
already pruned before it (as in the Wanda and SparseGPT papers), because its inputs are captured
by running the partially pruned copy again.

- magnitude: the smallest `|W|` of the layer.
- wanda (Sun et al., 2023): score `|W_ij| * ||X_j||_2` (X_j: the calibration activations of input
  feature j), the lowest scores removed *per output* (each output keeps the same count).
- sparsegpt (Frantar & Alistarh, 2023): layer-wise optimal brain surgeon. With `H = XᵀX + λI`
  (λ: a fraction of the mean diagonal), the upper Cholesky factor of `H⁻¹` gives, column by column,
  the weights to remove (lowest `w² / [H⁻¹]_jj²`) and the update of the remaining columns that
  compensates the removed ones; columns are processed in blocks with lazy batch updates.

All three support N:M (e.g. 2:4) semi-structured sparsity along the input axis, grouped like
`keras_lean.sparsity.check_m_by_n` checks it.

Inputs are captured by replacing the layer's `call` on the private copy for one forward pass
(eager), which sees through Sequential, functional, nested and keras-hub models alike. A
calibration pass for a layer that the model calls once ends as soon as that layer's input is
seen (the layers after it cannot change it). Text inputs with a `padding_mask` are calibrated
on their real tokens only.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np

from keras_lean._keras_internals import flatten_layers, layer_kernel

__all__ = ["ONESHOT_METHODS", "HoldZeros", "OneshotLayer", "OneshotReport", "prune_oneshot"]

ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class OneshotLayer:
    """What one-shot pruning did to one projection."""

    name: str  # the kernel's variable path without "/kernel", e.g. "block_0/attention/query"
    size: int
    zeros: int
    sparsity: float
    relative_error: float | None  # ||(W - W')X||² / ||WX||² on the calibration inputs


@dataclass
class OneshotReport:
    method: str
    target_sparsity: float | None
    m_by_n: tuple[int, int] | None
    calibration_rows: int  # input rows (tokens / samples) seen by the first layer
    layers: list[OneshotLayer] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        size = sum(layer.size for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / size if size else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sparsity"] = self.sparsity
        out["m_by_n"] = list(self.m_by_n) if self.m_by_n else None
        return out


# -- the kernel as an (inputs, outputs) matrix ------------------------------------------------


class _Projection:
    """A Dense or EinsumDense seen as `y = x @ W` with W of shape (inputs, outputs).

    For an EinsumDense the contracted kernel axes (in kernel order) become the rows, the last
    one fastest, so N:M groups run along the same axis that `check_m_by_n` checks.
    """

    def __init__(self, layer, name: str):
        self.layer, self.name = layer, name
        self.called_once = False  # set by _call_order: then a capture may end the pass early
        kernel = layer_kernel(layer)
        self.shape = tuple(int(d) for d in kernel.shape)
        if isinstance(layer, keras.layers.EinsumDense):
            self._einsum(layer.equation)
        else:
            self.perm, self.in_size = (0, 1), self.shape[0]
            self.in_axes, self.segment = [-1], self.shape[0]
        self.out_size = int(np.prod(self.shape)) // self.in_size

    def _einsum(self, equation: str) -> None:
        lhs, out = equation.replace(" ", "").split("->")
        inp, ker = lhs.split(",")
        contracted = [c for c in ker if c in inp and c not in out]
        outputs = [c for c in ker if c not in contracted]
        shared = [c for c in outputs if c in inp]
        if not contracted or shared or "." in ker:
            raise ValueError(
                f"Layer {self.name!r}: one-shot pruning supports EinsumDense equations whose "
                f"kernel axes are either contracted with the input or output axes. Received: "
                f"equation={equation!r}. Leave this layer out with `filters`."
            )
        self.perm = tuple(ker.index(c) for c in contracted + outputs)
        self.in_size = int(np.prod([self.shape[ker.index(c)] for c in contracted]))
        self.segment = self.shape[ker.index(contracted[-1])]
        if "..." in inp:
            head, tail = inp.split("...")
            pos = {c: i for i, c in enumerate(head)}
            pos.update({c: i - len(tail) for i, c in enumerate(tail)})
        else:
            pos = {c: i - len(inp) for i, c in enumerate(inp)}
        self.in_axes = [pos[c] for c in contracted]

    def rows(self, x, keep=None) -> np.ndarray:
        """The layer's input as (rows, inputs) float64; with `keep` (the batch's padding mask,
        shape (batch, sequence)), only the rows of real tokens, where the input's leading
        axes are (batch, sequence)."""
        x = np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)
        axes = [a % x.ndim for a in self.in_axes]
        moved = np.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
        if keep is not None and moved.shape[: moved.ndim - len(axes)] == keep.shape:
            return moved[keep].reshape(-1, self.in_size)
        return moved.reshape(-1, self.in_size)

    def matrix(self) -> np.ndarray:
        w = np.asarray(keras.ops.convert_to_numpy(layer_kernel(self.layer)), dtype=np.float64)
        return np.transpose(w, self.perm).reshape(self.in_size, self.out_size)

    def assign(self, matrix: np.ndarray) -> None:
        permuted = tuple(self.shape[a] for a in self.perm)
        w = np.transpose(matrix.reshape(permuted), np.argsort(self.perm))
        var = layer_kernel(self.layer)
        var.assign(w.astype(keras.backend.standardize_dtype(var.dtype)))

    def groups(self, n: int) -> list[tuple[int, int]]:
        """[start, end) of every N:M group along the rows (a segment's last group may be short)."""
        out = []
        for seg in range(0, self.in_size, self.segment):
            out += [(s, min(s + n, seg + self.segment)) for s in range(seg, seg + self.segment, n)]
        return out


# -- criteria ----------------------------------------------------------------------------------


def _n_pruned(m: int, n: int, size: int) -> int:
    """Zeros in a group of `size` weights (a short group keeps at most n - m, as masks.py)."""
    return max(0, size - (n - m))


def _group_mask(scores: np.ndarray, groups, m: int, n: int) -> np.ndarray:
    """Per output column, zero the lowest scores of every input group. True = keep."""
    keep = np.ones_like(scores, dtype=bool)
    for start, end in groups:
        k = _n_pruned(m, n, end - start)
        if k:
            low = np.argsort(scores[start:end], axis=0, kind="stable")[:k]
            np.put_along_axis(keep[start:end], low, False, axis=0)
    return keep


def _lowest(scores: np.ndarray, count: int) -> np.ndarray:
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores, axis=None, kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def _magnitude(w, h, proj, sparsity, m_by_n) -> np.ndarray:
    if m_by_n:
        return w * _group_mask(np.abs(w), proj.groups(m_by_n[1]), *m_by_n)
    return w * _lowest(np.abs(w), round(sparsity * w.size))


def _wanda(w, h, proj, sparsity, m_by_n) -> np.ndarray:
    scores = np.abs(w) * np.sqrt(np.maximum(np.diag(h), 0.0))[:, None]
    if m_by_n:
        return w * _group_mask(scores, proj.groups(m_by_n[1]), *m_by_n)
    k = round(sparsity * w.shape[0])
    keep = np.ones_like(w, dtype=bool)
    low = np.argsort(scores, axis=0, kind="stable")[:k]  # per output: its k lowest inputs
    np.put_along_axis(keep, low, False, axis=0)
    return w * keep


def _blocks(proj, block_size: int, m_by_n) -> list[tuple[int, int]]:
    """Column blocks for SparseGPT, never splitting an N:M group."""
    starts = [g[0] for g in proj.groups(m_by_n[1])] if m_by_n else range(proj.in_size)
    bounds, last = [0], 0
    for s in starts:
        if s - last >= block_size:
            bounds.append(s)
            last = s
    bounds.append(proj.in_size)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _sparsegpt(w, h, proj, sparsity, m_by_n, block_size=128, damp=0.01) -> np.ndarray:
    """SparseGPT on W (inputs, outputs); rows of the paper's W are our columns."""
    wt = w.T.copy()  # (outputs, inputs): the paper's orientation
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor U of H⁻¹ = UᵀU
    group_end = dict(proj.groups(m_by_n[1])) if m_by_n else {}
    rows, cols = wt.shape
    target = sparsity * rows * cols if not m_by_n else 0.0
    for i1, i2 in _blocks(proj, block_size, m_by_n):
        w1, hinv1 = wt[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
        d = np.diag(hinv1)
        err1 = np.zeros_like(w1)
        if m_by_n:
            pruned = np.zeros_like(w1, dtype=bool)
        else:  # the block's share of the total, rounded cumulatively: exact overall count
            k = round(target * i2 / cols) - round(target * i1 / cols)
            pruned = ~_lowest(w1**2 / d**2, k)
        for i in range(i2 - i1):
            col = i1 + i
            if col in group_end:
                end = group_end[col] - i1
                k = _n_pruned(*m_by_n, end - i)
                if k:
                    low = np.argsort(w1[:, i:end] ** 2 / d[i:end] ** 2, axis=1, kind="stable")
                    np.put_along_axis(pruned[:, i:end], low[:, :k], True, axis=1)
            q = np.where(pruned[:, i], 0.0, w1[:, i])
            e = (w1[:, i] - q) / d[i]
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        wt[:, i1:i2] = w1
        wt[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return wt.T


_CRITERIA = {"magnitude": _magnitude, "wanda": _wanda, "sparsegpt": _sparsegpt}


# -- capturing layer inputs --------------------------------------------------------------------


class _Hooks:
    """Replaces `call` of some layers (on the private copy) to see their first input."""

    def __init__(self, layers, on_input: Callable[[int, Any], None]):
        self.layers, self.on_input = layers, on_input

    def __enter__(self):
        for index, layer in enumerate(self.layers):
            original = layer.call

            def hooked(*args, _i=index, _call=original, **kwargs):
                self.on_input(_i, args[0] if args else kwargs.get("inputs"))
                return _call(*args, **kwargs)

            object.__setattr__(layer, "call", hooked)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            object.__delattr__(layer, "call")


def _as_batches(data, batch_size: int) -> list:
    """Calibration inputs as a list of model-input batches (labels dropped)."""

    def features(item):
        return item[0] if isinstance(item, tuple) and len(item) in (2, 3) else item

    if data is None:
        raise ValueError("calibration_data is required for method 'wanda' and 'sparsegpt'.")
    if isinstance(data, tuple) and len(data) in (2, 3):
        data = data[0]
    if _is_array(data) or isinstance(data, dict):
        first = next(iter(data.values())) if isinstance(data, dict) else data
        count = int(np.shape(first)[0])
        if count == 0:
            raise ValueError("calibration_data is empty: give at least one sample.")
        return [
            {k: v[s : s + batch_size] for k, v in data.items()}
            if isinstance(data, dict)
            else data[s : s + batch_size]
            for s in range(0, count, batch_size)
        ]
    if isinstance(data, Iterable):
        batches = [features(item) for item in data]
        if not batches:
            raise ValueError("calibration_data yielded no batch.")
        return batches
    raise ValueError(
        "calibration_data must be an array, a dict of arrays, an (x, y) tuple, or an iterable "
        f"of batches (e.g. a tf.data.Dataset). Received: {type(data).__name__}"
    )


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


class _Captured(BaseException):  # noqa: N818 - a signal, not an error
    """Raised by a hook to end a forward pass once the input it needs is seen (a
    BaseException, so that no `except Exception` in a layer's call swallows it)."""


def _padding_mask(batch):
    """The batch's token mask (`padding_mask` of a keras-hub input dict) as bool, or None."""
    if not isinstance(batch, dict) or batch.get("padding_mask") is None:
        return None
    mask = np.asarray(keras.ops.convert_to_numpy(batch["padding_mask"])).astype(bool)
    return mask if mask.ndim == 2 and mask.any() else None


def _forward(model, batches, on_batch: Callable[[Any], None] | None = None) -> None:
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        try:
            model(batch, training=False)
        except _Captured:  # the rest of the model is not needed for this capture
            pass


# -- selecting layers --------------------------------------------------------------------------


def _select(model, filters) -> list[_Projection]:
    candidates = []
    for layer in flatten_layers(model, include_self=False):
        if not isinstance(layer, keras.layers.Dense | keras.layers.EinsumDense) or not layer.built:
            continue
        path = layer_kernel(layer).path
        name = path[: -len("/kernel")] if path.endswith("/kernel") else path
        candidates.append((layer, name))
    if filters is None:
        chosen = candidates
    elif callable(filters):
        chosen = [(layer, name) for layer, name in candidates if filters(layer)]
    else:
        patterns = [filters] if isinstance(filters, str) else list(filters)
        if not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                "filters must be None, a callable(layer) -> bool, or layer-name patterns "
                f"(str or list of str). Received: filters={filters!r}"
            )
        chosen, unmatched = [], []
        for p in patterns:
            hit = [c for c in candidates if _matches(p, c)]
            if not hit:
                unmatched.append(p)
            chosen += [c for c in hit if c not in chosen]
        if unmatched:
            raise ValueError(
                f"filters pattern(s) {unmatched} matched no Dense or EinsumDense layer. "
                f"Layers: {', '.join(name for _, name in candidates) or 'none'}."
            )
    if not chosen:
        raise ValueError(
            f"Model {model.name!r} has no built Dense or EinsumDense layer to prune one-shot."
        )
    for layer, name in chosen:
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer {name!r} has LoRA enabled: its effective kernel (kernel + a @ b) would "
                "not stay sparse. Merge LoRA first (keras_lean.lowrank.merge_lora)."
            )
    return [_Projection(layer, name) for layer, name in chosen]


def _matches(pattern: str, candidate) -> bool:
    layer, name = candidate
    parts = name.split("/")
    return (
        fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(layer.name, pattern)
        or any(fnmatch.fnmatchcase(p, pattern) for p in parts)
    )


def _call_order(model, projections, batches) -> list[list[_Projection]]:
    """The projections in the order the model calls them, grouped when consecutive ones read
    the same input tensor (e.g. query/key/value): those can be pruned from one capture."""
    seen: dict[int, Any] = {}
    calls = [0] * len(projections)

    def record(i, x):
        seen.setdefault(i, x)
        calls[i] += 1

    with _Hooks([p.layer for p in projections], record):
        _forward(model, batches[:1])
    for i, proj in enumerate(projections):  # a layer called once per pass ends its captures
        proj.called_once = calls[i] == 1
    missing = [p.name for i, p in enumerate(projections) if i not in seen]
    if missing:
        raise ValueError(
            f"Layer(s) {missing} were not called on the calibration data; leave them out with "
            "`filters`."
        )
    groups: list[list[_Projection]] = []
    last = None
    for i in seen:  # insertion order: the order of the first calls
        if groups and seen[i] is last:
            groups[-1].append(projections[i])
        else:
            groups.append([projections[i]])
        last = seen[i]
    return groups


def _gram(model, group: list[_Projection], batches) -> tuple[np.ndarray, int]:
    """XᵀX of the group's (shared) input over all calibration batches, and the row count."""
    proj = group[0]
    acc = {"h": np.zeros((proj.in_size, proj.in_size)), "rows": 0, "keep": None}

    def batch(b):
        acc["keep"] = _padding_mask(b)

    def add(_i, x):
        rows = proj.rows(x, acc["keep"])
        acc["h"] += rows.T @ rows
        acc["rows"] += rows.shape[0]
        if proj.called_once:  # nothing after this layer changes its input: skip the rest
            raise _Captured

    with _Hooks([proj.layer], add):
        _forward(model, batches, batch)
    return acc["h"], acc["rows"]


def _check_args(method, sparsity, sparsity_m_by_n, batch_size):
    if method not in ONESHOT_METHODS:
        raise ValueError(f"method must be one of {ONESHOT_METHODS}. Received: method={method!r}")
    if sparsity_m_by_n is not None:
        try:
            m, n = (int(v) for v in sparsity_m_by_n)
        except (TypeError, ValueError):
            m, n = 0, 0
        if not 0 < m < n:
            raise ValueError(
                "sparsity_m_by_n must be (m, n) with 0 < m < n (m zeros in every n weights), "
                f"e.g. (2, 4). Received: sparsity_m_by_n={sparsity_m_by_n!r}"
            )
        sparsity_m_by_n = (m, n)
    elif isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ValueError(f"sparsity must be a number in [0, 1). Received: sparsity={sparsity!r}")
    elif not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
        raise ValueError(f"sparsity must be in [0, 1). Received: sparsity={sparsity!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
    return sparsity_m_by_n


def prune_oneshot(
    model: keras.Model,
    calibration_data=None,
    method: str = "wanda",
    sparsity: float = 0.5,
    sparsity_m_by_n: tuple[int, int] | None = None,
    filters=None,
    batch_size: int = 32,
    block_size: int = 128,
    dampening: float = 0.01,
) -> tuple[keras.Model, OneshotReport]:
    """Prunes the Dense / EinsumDense projections of a copy of `model` in one shot.

    Args:
        model: a built Keras 3 model (Sequential, functional, nested or keras-hub; the
            projections inside MultiHeadAttention and keras-hub Transformer blocks included).
        calibration_data: model inputs (array, dict of arrays, `(x, y)`, or an iterable of
            batches such as a `tf.data.Dataset`; labels are ignored). Required for wanda and
            sparsegpt; with magnitude it only fills `relative_error`. A dict with a
            `padding_mask` (keras-hub text inputs) counts only the real tokens' rows in the
            statistics of every projection whose input is (batch, sequence, ...): padding
            positions are not calibration data.
        method: "magnitude", "wanda" or "sparsegpt".
        sparsity: fraction of each layer's kernel set to zero (ignored with `sparsity_m_by_n`).
        sparsity_m_by_n: (m, n): m zeros in every n consecutive weights along the input axis,
            e.g. (2, 4).
        filters: None (every Dense / EinsumDense), layer-name patterns (matched against the
            layer's name, its variable path or any part of it, so a MultiHeadAttention's or a
            transformer block's name selects its projections), or a callable(layer) -> bool.
        batch_size: batch size for array calibration data.
        block_size: SparseGPT's column block (lazy batch updates).
        dampening: SparseGPT's λ as a fraction of the mean diagonal of XᵀX.

    Returns:
        `(pruned_model, report)`: a new model (the caller's is untouched) and a `OneshotReport`
        with each layer's sparsity and reconstruction error on the calibration inputs.
    """
    from keras_lean.lowrank._model import copy_model

    m_by_n = _check_args(method, sparsity, sparsity_m_by_n, batch_size)
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            f"model must be a built keras.Model. Received: {type(model).__name__}"
            + ("" if not isinstance(model, keras.Model) else " (not built: call it once first)")
        )
    batches = None
    if calibration_data is not None or method != "magnitude":
        batches = _as_batches(calibration_data, batch_size)
    pruned = copy_model(model)
    projections = _select(pruned, filters)
    report = OneshotReport(method, None if m_by_n else float(sparsity), m_by_n, 0)
    groups = _call_order(pruned, projections, batches) if batches else [[p] for p in projections]
    criterion = _CRITERIA[method]
    for group in groups:
        h, rows = _gram(pruned, group, batches) if batches else (None, 0)
        report.calibration_rows = report.calibration_rows or rows
        for proj in group:
            w = proj.matrix()
            if method == "sparsegpt":
                new = _sparsegpt(w, h, proj, sparsity, m_by_n, block_size, dampening)
            else:
                new = criterion(w, h, proj, sparsity, m_by_n)
            proj.assign(new)
            report.layers.append(_layer_report(proj, w, new, h))
    return pruned, report


def _layer_report(proj: _Projection, w, new, h) -> OneshotLayer:
    zeros = int(np.sum(new == 0))
    error = None
    if h is not None:
        delta = w - new
        base = float(np.sum(w * (h @ w)))
        error = float(np.sum(delta * (h @ delta))) / base if base > 0 else 0.0
    return OneshotLayer(proj.name, int(new.size), zeros, zeros / new.size, error)


class HoldZeros(keras.callbacks.Callback):
    """Keeps the zeros of one-shot pruned kernels while the model trains further.

    At the start of training it records which weights of the named kernels are zero (the
    masks); after every batch and at the end it sets them back to zero. It reaches projections
    inside composite layers (keras-hub Transformer blocks) as well.

    Args:
        names: the projections, as `OneshotReport.layers[i].name` (the kernel's variable path
            without `/kernel`).
    """

    def __init__(self, names):
        super().__init__()
        self.names = list(names)
        self._held: list = []

    def on_train_begin(self, logs=None):
        by_path = {v.path: v for v in self.model.weights}
        missing = [n for n in self.names if f"{n}/kernel" not in by_path]
        if missing:
            raise ValueError(
                f"HoldZeros: the model has no kernel {missing}; give the names of "
                "OneshotReport.layers of this model."
            )
        self._held = []
        for n in self.names:
            var = by_path[f"{n}/kernel"]
            keep = keras.ops.convert_to_numpy(var) != 0
            self._held.append((var, keras.ops.cast(keep, var.dtype)))

    def _apply(self):
        for var, keep in self._held:
            var.assign(var * keep)

    def on_train_batch_end(self, batch, logs=None):
        self._apply()

    def on_train_end(self, logs=None):
        self._apply()
