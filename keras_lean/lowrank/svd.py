"""Truncated-SVD factorization: the `LowRankDense` layer and `factorize`.

A Dense kernel W (in x out) is replaced by U (in x r) @ V (r x out) from its truncated SVD
W ~= U_r S_r V_r^T, with sqrt(S_r) folded into both factors so they are equally scaled for
fine-tuning. That saves parameters when r * (in + out) < in * out; the rank is fixed or the smallest
that keeps a share `energy` of the squared singular values (the spectral energy).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_lean import _backend
from keras_lean import _keras_internals as internals
from keras_lean.lowrank._model import (
    Filters,
    check_filters,
    check_model,
    matches,
    named_layers,
    own_variables,
    paired_layers,
)


@keras.saving.register_keras_serializable(package="keras_lean")
class LowRankDense(keras.layers.Layer):
    """A Dense layer whose kernel is the product of two thin factors: `act(x @ u @ v + bias)`.

    Args:
        units: positive integer, output width.
        rank: positive integer, inner width of the factorization; at most min(input width, units).
        activation: activation function (name or callable), None for linear.
        use_bias: whether to add a bias vector.
        kernel_initializer: initializer of both factors `u` (in x rank) and `v` (rank x units).
        bias_initializer: initializer of the bias.
        **kwargs: base `Layer` arguments (name, dtype, trainable...).

    Example:

    ```python
    layer = LowRankDense(64, rank=8, activation="relu")
    y = layer(np.zeros((2, 256)))   # 256*8 + 8*64 + 64 weights instead of 256*64 + 64
    ```
    """

    def __init__(
        self,
        units,
        rank,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for arg, value in (("units", units), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}")
        self.units = int(units)
        self.rank = int(rank)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        bound = min(input_dim, self.units)
        if self.rank > bound:
            raise ValueError(
                f"`rank` must be in [1, min(input width, units)] = [1, {bound}]"
                f" for layer {self.name!r} (input width {input_dim}, units {self.units}). "
                f"Received: rank={self.rank}"
            )
        self.u = self.add_weight(
            name="u", shape=(input_dim, self.rank), initializer=self.kernel_initializer
        )
        self.v = self.add_weight(
            name="v", shape=(self.rank, self.units), initializer=self.kernel_initializer
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer
            )
        else:
            self.bias = None

    @property
    def kernel(self):
        """The equivalent dense kernel `u @ v` (in x units), computed on demand."""
        return ops.matmul(self.u, self.v)

    def call(self, inputs):
        x = ops.matmul(ops.matmul(inputs, self.u), self.v)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "rank": self.rank,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config


@dataclasses.dataclass(frozen=True)
class LayerFactorization:
    """What `factorize` did to one candidate layer.

    Attributes:
        path: the layer's Keras path.
        layer_type: "Dense" or "EinsumDense".
        input_dim: kernel rows.
        units: kernel columns.
        rank: the chosen rank (None when the layer could not be factorized at all).
        params_before: kernel + bias parameters of the original layer.
        params_after: parameters after (equal to `params_before` when left alone).
        relative_error: ||W - U V||_F / ||W||_F at `rank` (None when not computed).
        retained_energy: share of the squared singular values kept at `rank`.
        factorized: whether the layer was replaced by a `LowRankDense`.
        reason: why it was left alone ("" when factorized).
    """

    path: str
    layer_type: str
    input_dim: int
    units: int
    rank: int | None
    params_before: int
    params_after: int
    relative_error: float | None
    retained_energy: float | None
    factorized: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FactorizationReport:
    """Per-layer outcome of `factorize`, with totals over the candidate layers.

    Attributes:
        layers: one `LayerFactorization` per candidate (Dense or EinsumDense selected by filters).
    """

    layers: tuple[LayerFactorization, ...]

    @property
    def params_before(self) -> int:
        """Parameters of all candidate layers before factorization."""
        return sum(entry.params_before for entry in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the same layers after (left-alone layers count unchanged)."""
        return sum(entry.params_after for entry in self.layers)

    @property
    def factorized(self) -> tuple[LayerFactorization, ...]:
        return tuple(entry for entry in self.layers if entry.factorized)

    @property
    def skipped(self) -> dict[str, str]:
        """`{layer path: why it was left alone}` for every candidate that was not factorized."""
        return {entry.path: entry.reason for entry in self.layers if not entry.factorized}

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "skipped": self.skipped,
            "layers": [entry.to_dict() for entry in self.layers],
        }

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'shape':>11s} {'rank':>5s} {'params':>17s} {'rel.err':>8s}"]
        for e in self.layers:
            err = "" if e.relative_error is None else f"{e.relative_error:.4f}"
            rank = "" if e.rank is None else str(e.rank)
            note = "" if e.factorized else f"  left alone: {e.reason}"
            lines.append(
                f"{e.path:40s} {e.input_dim:>5d}x{e.units:<5d} {rank:>5s} "
                f"{e.params_before:>8d}->{e.params_after:<8d} {err:>8s}{note}"
            )
        lines.append(f"total {self.params_before} -> {self.params_after} parameters")
        return "\n".join(lines)


def _dense_like_einsum(layer: keras.layers.EinsumDense) -> str:
    """Returns "" when the EinsumDense is a Dense on its last axis, else why it is not."""
    kernel_rank = len(internals.layer_kernel(layer).shape)
    if kernel_rank != 2:
        return f"kernel has {kernel_rank} axes; only a 2-D kernel (a Dense on the last axis) is"
    m = re.fullmatch(r"([a-zA-Z.]*),([a-zA-Z]{2})->([a-zA-Z.]*)", layer.equation.replace(" ", ""))
    if not m:
        return f"equation {layer.equation!r} is not of the form '...i,io->...o'"
    lhs, kernel, out = m.groups()
    contracted, produced = kernel
    if not lhs.endswith(contracted) or lhs.count(contracted) != 1 or out != lhs[:-1] + produced:
        return f"equation {layer.equation!r} does not act as a Dense on the last input axis"
    if layer.bias_axes not in (None, produced):
        return f"bias_axes={layer.bias_axes!r} is not the output axis"
    return ""


def _candidate(layer: keras.layers.Layer) -> str | None:
    if type(layer) is keras.layers.Dense:
        return "Dense"
    if type(layer) is keras.layers.EinsumDense:
        return "EinsumDense"
    return None


def _rank_for(singular: np.ndarray, rank: int | None, energy: float) -> int:
    if rank is not None:
        return rank
    squared = singular.astype("float64") ** 2
    total = squared.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(squared) / total
    # Smallest r whose kept share reaches `energy` (tolerance for float round-off at energy=1).
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(singular)))


def factorize(
    model: keras.Model,
    rank: int | None = None,
    energy: float = 0.9,
    filters: Filters = None,
) -> tuple[keras.Model, FactorizationReport]:
    """Returns a copy of `model` with Dense kernels replaced by their truncated SVD.

    Candidates are the `Dense` layers, and the `EinsumDense` layers that act as a Dense on the last
    axis, of a Sequential or functional model (nested models included), selected by `filters`. Each
    kernel W (in x out) is factored at `rank`, or at the smallest rank keeping a share `energy` of
    its spectral energy, into a `LowRankDense` with the same name, bias and activation. A layer is
    skipped, and `report.skipped` says why, where factoring would save no parameters
    (rank * (in + out) >= in * out, which includes a fixed rank above min(in, out): a 10-class
    head at `rank=32`). `model` is not touched.

    Args:
        model: a built Sequential or functional Keras model.
        rank: a fixed rank for every factorized layer; layers it does not fit are skipped. None
            picks the rank per layer from `energy`.
        energy: share of the sum of squared singular values to keep, in (0, 1]; used when `rank`
            is None.
        filters: which layers are candidates: regex string(s) searched in the layer path or a
            callable taking a layer; None: all Dense / Dense-like EinsumDense layers.

    Returns:
        `(new_model, report)`: the factorized copy and a `FactorizationReport` with per-layer
        parameters before/after, rank, relative reconstruction error, and `skipped`
        (`{path: reason}` for the candidates left alone).

    Raises:
        ValueError: bad `rank` or `energy`, a fixed rank that fits no candidate layer, or a
            model that is not Sequential/functional.
        TypeError: `model` is not a Keras model or `filters` has the wrong type.

    Example:

    ```python
    small, report = factorize(model, rank=32)   # layers narrower than 64 are skipped
    print(report.skipped)
    ```
    """
    check_model(model)
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank <= 0
    ):
        raise ValueError(f"`rank` must be a positive integer or None. Received: rank={rank!r}")
    if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
        raise ValueError(f"`energy` must be in (0, 1]. Received: energy={energy!r}")
    check_filters(filters)
    if not isinstance(model, keras.Sequential) and not _is_plain_functional(model):
        raise ValueError(
            "factorize supports Sequential and functional models, whose layers can be swapped "
            "by keras.models.clone_model; rebuild this one with the functional API "
            "(keras.Model(inputs, outputs)) or as a keras.Sequential, or put LowRankDense "
            f"layers in it yourself. Received: a {type(model).__name__} model"
        )
    rank = None if rank is None else int(rank)

    plans: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    entries = []
    for path, layer in named_layers(model):
        layer_type = _candidate(layer)
        if layer_type is None or not matches(filters, layer, path):
            continue
        entry, plan = _plan_layer(layer, path, layer_type, rank, energy)
        entries.append(entry)
        if plan is not None:
            plans[id(layer)] = plan
    report = FactorizationReport(tuple(entries))
    if rank is not None and entries and not plans:
        _raise_rank_fits_nothing(rank, report)

    def clone(layer):
        if id(layer) in plans:
            _, _, r = plans[id(layer)]
            units = (
                layer.units
                if isinstance(layer, keras.layers.Dense)
                else internals.layer_kernel(layer).shape[-1]
            )
            return LowRankDense(
                units=int(units),
                rank=r,
                activation=layer.activation,
                use_bias=layer.bias is not None,
                name=layer.name,
                dtype=layer.dtype_policy,
                trainable=layer.trainable,
            )
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone, recursive=True)
    _transfer(model, new, plans)
    return new, report


def _plan_layer(
    layer: keras.layers.Layer, path: str, layer_type: str, rank: int | None, energy: float
) -> tuple[LayerFactorization, tuple[np.ndarray, np.ndarray, int] | None]:
    """What to do with one candidate: its report entry, and `(u, v, rank)` if it is factored."""
    kernel = keras.ops.convert_to_numpy(internals.layer_kernel(layer))
    bias_params = 0 if layer.bias is None else int(np.prod(layer.bias.shape))
    in_dim, out_dim = (int(d) for d in kernel.shape[-2:]) if kernel.ndim >= 2 else (0, 0)
    before = int(kernel.size) + bias_params

    def left_alone(why, r=None, rel_err=None, kept=None):
        entry = LayerFactorization(
            path, layer_type, in_dim, out_dim, r, before, before, rel_err, kept, False, why
        )  # fmt: skip
        return entry, None

    why = _dense_like_einsum(layer) if layer_type == "EinsumDense" else ""
    if not why and getattr(layer, "lora_enabled", False):
        why = "LoRA is enabled on it (merge_lora first)"
    if not why and layer.quantization_mode is not None:
        why = f"it is quantized ({layer.quantization_mode})"
    if why:
        return left_alone(why)
    if rank is not None and rank > min(in_dim, out_dim):
        return left_alone(
            f"{_RANK_SKIP}{rank} is above min(in, out) = {min(in_dim, out_dim)} of its "
            f"{in_dim}x{out_dim} kernel"
        )
    u, s, vt = np.linalg.svd(kernel.astype("float64"), full_matrices=False)
    r = _rank_for(s, rank, energy)
    total = float((s**2).sum())
    kept = float((s[:r] ** 2).sum() / total) if total else 1.0
    rel_err = float(np.sqrt(max(total - (s[:r] ** 2).sum(), 0.0) / total)) if total else 0.0
    after = r * (in_dim + out_dim) + bias_params
    if after >= before:
        return left_alone(
            f"{_RANK_SKIP}{r} saves nothing: {r}*({in_dim}+{out_dim}) >= {in_dim}*{out_dim}",
            r,
            rel_err,
            kept,
        )
    root = np.sqrt(s[:r])
    entry = LayerFactorization(
        path, layer_type, in_dim, out_dim, r, before, after, rel_err, kept, True
    )  # fmt: skip
    return entry, (u[:, :r] * root, root[:, None] * vt[:r], r)


# The reasons that start with this are about the rank (the others about the layer itself).
_RANK_SKIP = "rank "


def _largest_saving_rank(entry: LayerFactorization) -> int:
    """The largest rank r with r * (in + out) < in * out, 0 when there is none."""
    in_dim, out_dim = entry.input_dim, entry.units
    if in_dim + out_dim == 0:
        return 0
    return max(0, min(min(in_dim, out_dim), (in_dim * out_dim - 1) // (in_dim + out_dim)))


def _raise_rank_fits_nothing(rank: int, report: FactorizationReport) -> None:
    sized = [e for e in report.layers if e.reason.startswith(_RANK_SKIP)]
    if not sized:
        return  # every candidate was left alone for another reason (LoRA, quantized...)
    best = max(_largest_saving_rank(e) for e in sized)
    shapes = ", ".join(f"{e.path} {e.input_dim}x{e.units}" for e in sized[:8])
    hint = (
        f"the largest rank that saves parameters on some layer is {best}"
        if best
        else "no layer is wide enough for any rank to save parameters"
    )
    raise ValueError(
        f"`rank` fits no layer: at rank {rank} factoring saves parameters on none of the "
        f"candidate layers ({shapes}); {hint}. Pass a smaller `rank`, or `energy` instead. "
        f"Received: rank={rank}"
    )


def _is_plain_functional(model: keras.Model) -> bool:
    # keras.Model(inputs, outputs) builds a `Functional`; subclasses (keras-hub models) rebuild
    # themselves from their own config and cannot have their layers swapped by clone_model.
    return type(model) is internals.functional_class()


def _transfer(model: keras.Model, new: keras.Model, plans: dict) -> None:
    """Copies weights layer by layer (`paired_layers`); factorized layers get their SVD factors."""
    for _, layer, target in paired_layers(model, new):
        if not own_variables(layer):
            continue
        if id(layer) in plans:
            u, v, _ = plans[id(layer)]
            target.u.assign(u.astype(target.u.dtype))
            target.v.assign(v.astype(target.v.dtype))
            if target.bias is not None:
                target.bias.assign(ops.convert_to_numpy(layer.bias))
            continue
        target.load_own_variables(_backend.saved_state(layer))


__all__: Sequence[str] = ("LowRankDense", "LayerFactorization", "FactorizationReport", "factorize")
