"""Model-level pruning API: prune_low_magnitude, strip_pruning, reports, masks."""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from keras_lean._keras_internals import flatten_layers, functional_class
from keras_lean.sparsity import masks as mask_math
from keras_lean.sparsity.registry import prunable_layer_types
from keras_lean.sparsity.wrapper import PruneLowMagnitude, is_prunable, prunable_weights

__all__ = [
    "LayerSparsity",
    "SparsityReport",
    "check_m_by_n",
    "get_masks",
    "prune_low_magnitude",
    "set_masks",
    "sparsity_report",
    "strip_pruning",
]

_OVERRIDE_KEYS = (
    "pruning_schedule",
    "block_size",
    "block_pooling_type",
    "sparsity_m_by_n",
    "criterion",
    "update_masks",
    "score_lr_multiplier",
    "threshold",
    "l1_coefficient",
    "score_init",
)


def _is_legacy(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] == "tf_keras" for c in type(obj).__mro__)


def _check_keras3(obj: Any, what: str = "to_prune") -> None:
    if _is_legacy(obj):
        raise ValueError(
            f"{what} must be a Keras 3 model or layer, but received a tf_keras (legacy Keras 2) "
            f"{type(obj).__name__} {getattr(obj, 'name', '')!r}. Build the model with "
            "`import keras` (Keras 3), or keep tf_keras and use "
            "tensorflow_model_optimization.sparsity.keras.prune_low_magnitude."
        )


def _iter_layers(model) -> Iterable:
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not isinstance(layer, PruneLowMagnitude):
            yield from _iter_layers(layer)
        else:
            yield layer


def _is_wildcard(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class _Selector:
    """Resolves `filters` to per-layer keyword overrides (None: leave the layer alone).

    A pattern with wildcards (`"*"`, `"dense_?"`) selects the *prunable* layers it matches and
    passes over the others (Flatten, Dropout, ...); a plain name must name a prunable layer.
    Every pattern must select at least one layer.
    """

    def __init__(self, filters: Any):
        self.filters = filters
        self.matched: set[str] = set()
        self.seen: dict[str, list] = {}  # wildcard -> non-prunable layers it matched
        if filters is None or callable(filters):
            return
        if isinstance(filters, str):
            self.filters = [filters]
        elif isinstance(filters, dict):
            for pattern, overrides in filters.items():
                if not isinstance(pattern, str):
                    raise ValueError(
                        "filters dict keys must be layer-name patterns (str). "
                        f"Received: {pattern!r}"
                    )
                if overrides is not None and not isinstance(overrides, dict):
                    raise ValueError(
                        f"filters[{pattern!r}] must be a dict of overrides or None. "
                        f"Received: {overrides!r}"
                    )
        elif isinstance(filters, list | tuple) and all(isinstance(p, str) for p in filters):
            self.filters = list(filters)
        else:
            raise ValueError(
                "filters must be None, a callable(layer), a list of layer-name patterns or a "
                f"dict {{pattern: overrides}}. Received: filters={filters!r}"
            )

    def __call__(self, layer) -> dict | None:
        f = self.filters
        if f is None:
            return {} if is_prunable(layer) else None
        if callable(f) and not isinstance(f, list | dict):
            chosen = f(layer)
            if chosen is None or chosen is False:
                return None
            overrides = {} if chosen is True else chosen
            if not isinstance(overrides, dict):
                raise ValueError(
                    "filters callable must return a bool, None or a dict of overrides. "
                    f"Received: {chosen!r} for layer {layer.name!r}"
                )
            return self._checked(layer, overrides)
        items = f.items() if isinstance(f, dict) else ((p, {}) for p in f)
        for pattern, overrides in items:
            if not fnmatch.fnmatchcase(layer.name, pattern):
                continue
            if _is_wildcard(pattern) and not is_prunable(layer):
                self.seen.setdefault(pattern, []).append(layer)
                continue  # a wildcard passes over the layers it cannot prune
            self.matched.add(pattern)
            return None if overrides is None else self._checked(layer, overrides)
        return None

    @staticmethod
    def _checked(layer, overrides: dict) -> dict:
        unknown = set(overrides) - set(_OVERRIDE_KEYS)
        if unknown:
            raise ValueError(
                f"Unknown pruning option(s) {sorted(unknown)} for layer {layer.name!r}. "
                f"Allowed: {', '.join(_OVERRIDE_KEYS)}."
            )
        if isinstance(layer, PruneLowMagnitude):
            raise ValueError(
                f"Layer {layer.name!r} is already wrapped in PruneLowMagnitude; strip_pruning "
                "the model first, or leave this layer out of filters."
            )
        if not is_prunable(layer):
            raise ValueError(
                f"Layer {layer.name!r} of type {type(layer).__name__} cannot be pruned. "
                f"Prunable: {', '.join(prunable_layer_types())}, or a layer with a "
                "get_prunable_weights() method (keras_lean.sparsity.PrunableLayer)."
            )
        return overrides

    def check_all_matched(self) -> None:
        if isinstance(self.filters, list | dict):
            missing = [p for p in self.filters if p not in self.matched]
            unprunable = [p for p in missing if p in self.seen]
            if unprunable:
                found = ", ".join(
                    f"{layer.name} ({type(layer).__name__})"
                    for p in unprunable
                    for layer in self.seen[p]
                )
                raise ValueError(
                    f"filters pattern(s) {unprunable} matched no prunable layer of the model, "
                    f"only: {found}."
                )
            if missing:
                raise ValueError(f"filters pattern(s) {missing} matched no layer of the model.")


def _clones_as_graph(model) -> bool:
    """Whether `keras.models.clone_model(recursive=True)` rebuilds `model` layer by layer: a
    Sequential, a functional model, or a functional subclass that keeps Functional's `call`
    (keras-hub backbones such as `BertBackbone`, `GPT2Backbone`). Such a subclass comes back as a
    plain functional model with the same graph, layers and weights."""
    if isinstance(model, keras.Sequential):
        return True
    fn = functional_class()
    return isinstance(model, fn) and type(model).call is fn.call


def _copy_layer(layer):
    """A new, built layer with the same config and weights (the original is untouched).

    A `keras.ops` operation of a functional graph (`GetItem`, `Add`, ... : no weights, no
    `built`) is rebuilt from its config, as `clone_model` does by default.
    """
    if not isinstance(layer, keras.layers.Layer):
        return type(layer).from_config(layer.get_config())
    try:
        new = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    except TypeError:
        # A custom layer that is not registered as serializable: its class is at hand here,
        # so rebuild it from its config (what keras.models.clone_model does by default).
        new = type(layer).from_config(layer.get_config())
    if layer.built and not new.built:
        new.build_from_config(layer.get_build_config())
    if layer.built:
        new.set_weights(layer.get_weights())
    return new


def _wrap(layer, defaults: dict, overrides: dict) -> PruneLowMagnitude:
    kwargs = {**defaults, **overrides}
    wrapper = PruneLowMagnitude(layer, **kwargs)
    if layer.built:
        wrapper.build(None)
    return wrapper


def prune_low_magnitude(
    to_prune,
    pruning_schedule=None,
    block_size=(1, 1),
    block_pooling_type="AVG",
    sparsity_m_by_n=None,
    filters=None,
    criterion="magnitude",
    **kwargs,
):
    """Wraps the prunable layers of a Keras 3 model (or a layer, or a list of layers).

    The caller's model and layers are never modified: a model is cloned (weights copied) and a
    layer is copied before it is wrapped.

    Args:
        to_prune: a Keras 3 Sequential or functional model, a layer, or a list of layers. A
            functional subclass that keeps Functional's `call` (a keras-hub backbone such as
            `BertBackbone`, alone or nested) is rebuilt layer by layer and comes back as a plain
            functional model with the same graph and weights.
        pruning_schedule: a keras_lean or TFMOT `PruningSchedule` or a dict config. Default:
            `ConstantSparsity(0.5, begin_step=0, frequency=100)` (TFMOT's default).
        block_size: (height, width) of weight blocks pruned together (2-D weights only).
        block_pooling_type: "AVG" or "MAX".
        sparsity_m_by_n: (m, n): m zeros in every n consecutive weights along the input axis.
        filters: which layers to prune, for models: None (every prunable layer); a
            callable(layer) returning True/False/None or a dict of per-layer overrides; a list
            of `fnmatch` layer-name patterns; or a dict `{pattern: overrides or None}`.
        criterion: "magnitude", "movement" or "soft_movement" (see `PruneLowMagnitude`; the
            movement options `score_lr_multiplier`, `threshold`, `l1_coefficient`,
            `score_init` go in kwargs).
        **kwargs: further `PruneLowMagnitude` arguments (e.g. `update_masks=False`).

    Returns:
        A new model, a wrapped layer, or a list of wrapped layers.

    Raises:
        ValueError: for tf_keras objects, non-prunable or already-wrapped layers named by
            `filters`, and invalid pruning parameters.

    Example:

    >>> pruned = prune_low_magnitude(model, ConstantSparsity(0.8, frequency=50))
    >>> pruned.compile("adam", "sparse_categorical_crossentropy")
    >>> pruned.fit(x, y)  # prunes; no callback needed
    """
    defaults = {
        "pruning_schedule": pruning_schedule,
        "block_size": block_size,
        "block_pooling_type": block_pooling_type,
        "sparsity_m_by_n": sparsity_m_by_n,
        "criterion": criterion,
        **kwargs,
    }
    unknown = set(kwargs) - set(_OVERRIDE_KEYS) - {"name"}
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {sorted(unknown)} to prune_low_magnitude. "
            f"Allowed: {', '.join(_OVERRIDE_KEYS)}."
        )
    if isinstance(to_prune, list | tuple):
        for layer in to_prune:
            _check_keras3(layer)
        return [prune_low_magnitude(layer, filters=filters, **defaults) for layer in to_prune]
    _check_keras3(to_prune)
    if isinstance(to_prune, keras.Model):
        return _prune_model(to_prune, defaults, filters)
    if isinstance(to_prune, keras.layers.Layer):
        if isinstance(to_prune, PruneLowMagnitude):
            raise ValueError(
                f"Layer {to_prune.name!r} is already wrapped in PruneLowMagnitude; wrap each "
                "layer once."
            )
        if not is_prunable(to_prune):
            _Selector._checked(to_prune, {})
        return _wrap(_copy_layer(to_prune), defaults, {})
    raise ValueError(
        "to_prune must be a Keras 3 model, a Keras 3 layer or a list of layers. "
        f"Received: to_prune={to_prune!r} of type {type(to_prune).__name__}"
    )


def _prune_model(model: keras.Model, defaults: dict, filters) -> keras.Model:
    # keras.models.clone_model swaps the layers of exactly these kinds of models.
    if not _clones_as_graph(model):
        raise ValueError(
            f"prune_low_magnitude supports Sequential and functional models. Received the "
            f"subclassed model {model.name!r} ({type(model).__name__}): wrap its layers "
            "yourself with prune_low_magnitude(layer)."
        )
    if filters is None:
        for layer in _iter_layers(model):
            if isinstance(layer, PruneLowMagnitude):
                raise ValueError(
                    f"Layer {layer.name!r} is already wrapped in PruneLowMagnitude; "
                    "strip_pruning the model first, or pass filters that leave it out."
                )
    selector = _Selector(filters)
    if not model.built:
        raise ValueError(f"Model {model.name!r} must be built before pruning (call it once).")

    def clone_fn(layer):
        overrides = selector(layer)
        copy = _copy_layer(layer)
        if overrides is None:
            return copy
        return _wrap(copy, defaults, overrides)

    _check_nested(model)
    # recursive: the layers of nested Sequential / functional models are selected and wrapped
    # too (each nested model is rebuilt around its wrapped layers).
    clone = keras.models.clone_model(model, clone_function=clone_fn, recursive=True)
    selector.check_all_matched()
    return clone


def _check_nested(model: keras.Model) -> None:
    """Refuses nested models clone_model cannot look into, when they hold prunable layers."""
    for layer in model.layers:
        if not isinstance(layer, keras.Model):
            continue
        if _clones_as_graph(layer):
            _check_nested(layer)
            continue
        inner = [sub.name for sub in flatten_layers(layer) if is_prunable(sub)]
        if inner:
            raise ValueError(
                f"Model {model.name!r} contains the nested model {layer.name!r} "
                f"({type(layer).__name__}), whose layers cannot be rebuilt with wrappers "
                f"(it holds prunable layers {inner[:4]}). Build the nested model with the "
                "functional API or Sequential, or prune it on its own first with "
                "prune_low_magnitude(its layers)."
            )


def strip_pruning(model):
    """Returns a plain Keras model (or layer) with the wrappers removed and zeros in place.

    Args:
        model: a model (or a single `PruneLowMagnitude` layer) from `prune_low_magnitude`.

    Returns:
        A new model with the same architecture minus wrappers, whose outputs equal the wrapped
        model's; the argument is not modified.
    """
    if isinstance(model, PruneLowMagnitude):
        return _unwrap(model)
    _check_keras3(model, "model")
    if not isinstance(model, keras.Model):
        raise ValueError(
            "strip_pruning expects a Keras 3 model or a PruneLowMagnitude layer. "
            f"Received: {model!r}"
        )

    def clone_fn(layer):
        if isinstance(layer, PruneLowMagnitude):
            return _unwrap(layer)
        return _copy_layer(layer)

    # recursive: wrappers inside nested Sequential / functional models are removed too.
    return keras.models.clone_model(model, clone_function=clone_fn, recursive=True)


def _unwrap(wrapper: PruneLowMagnitude):
    inner = _copy_layer(wrapper.layer)
    if wrapper.built:
        for new, old, mask in zip(
            prunable_weights(inner), wrapper.pruned_weights, wrapper.mask_variables, strict=True
        ):
            new.variable.assign(
                np.asarray(old.variable.numpy()) * np.asarray(mask.numpy(), old.variable.dtype)
            )
    return inner


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One pruned (or prunable) layer of a `SparsityReport`.

    Attributes:
        name: layer name (the inner layer's name for wrapped layers).
        params: number of prunable weights.
        nonzero: how many of them are nonzero.
        sparsity: fraction of them that are zero.
    """

    name: str
    params: int
    nonzero: int
    sparsity: float


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Sparsity and size of a model's weights.

    Attributes:
        layers: per-layer rows for every prunable layer, wrapped or not.
        total_params: all weights of the model (masks, steps and scores excluded).
        nonzero_params: nonzero weights of the model.
        prunable_params: weights in prunable layers' pruned tensors.
        prunable_nonzero: nonzero ones among them.
        sparsity: zero fraction over the prunable weights.
        raw_bytes: size of all weights as float32 bytes.
        gzip_bytes: size of those bytes gzip-compressed (level 9), as TFMOT users measure.
    """

    layers: tuple[LayerSparsity, ...]
    total_params: int
    nonzero_params: int
    prunable_params: int
    prunable_nonzero: int
    sparsity: float
    raw_bytes: int
    gzip_bytes: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _nested_wrappers(layer) -> list[PruneLowMagnitude]:
    """Wrappers at any depth inside `layer` (e.g. under `TimeDistributed` or a custom layer)."""
    return [sub for sub in flatten_layers(layer) if isinstance(sub, PruneLowMagnitude)]


def _model_weight_arrays(model) -> list[np.ndarray]:
    """The model's real weights (pruned ones masked), in `model.weights` order.

    A wrapper's own variables (pruning step, masks, movement scores and previous-weight
    snapshots) are bookkeeping, not weights of the deployed model: everything a wrapper holds
    beyond its inner layer's weights is left out, wherever the wrapper sits in the model.
    """
    wrappers = [*(_wrappers(model)), *_nested_wrappers(model)]
    bookkeeping: set[int] = set()
    masked: dict[int, Any] = {}
    for wrapper in wrappers:
        inner = {id(v) for v in wrapper.layer.weights}
        bookkeeping.update(id(v) for v in wrapper.weights if id(v) not in inner)
        for w, m in zip(wrapper.pruned_weights, wrapper.mask_variables, strict=True):
            masked[id(w.variable)] = m
    out, seen = [], set()
    for v in model.weights:
        if id(v) in bookkeeping or id(v) in seen:
            continue
        seen.add(id(v))
        arr = np.asarray(v.numpy())
        if id(v) in masked:
            arr = arr * np.asarray(masked[id(v)].numpy(), arr.dtype)
        out.append(arr)
    return out


def sparsity_report(model) -> SparsityReport:
    """Per-layer and total sparsity, nonzero count and raw/gzip size of a model's weights.

    Works on wrapped and stripped models (for a stripped model, every prunable layer is
    reported with the zeros it has).

    Args:
        model: a Keras 3 model.

    Returns:
        A `SparsityReport`.
    """
    _check_keras3(model, "model")
    rows = []
    layers = []
    for layer in _iter_layers(model):
        layers.append(layer)
        if not isinstance(layer, PruneLowMagnitude) and not is_prunable(layer):
            layers.extend(_nested_wrappers(layer))
    for layer in layers:
        if isinstance(layer, PruneLowMagnitude):
            arrays = [
                np.asarray(w.variable.numpy()) * np.asarray(m.numpy())
                for w, m in zip(layer.pruned_weights, layer.mask_variables, strict=True)
            ]
            name = layer.layer.name
        elif is_prunable(layer) and layer.built:
            arrays = [np.asarray(w.variable.numpy()) for w in prunable_weights(layer)]
            name = layer.name
        else:
            continue
        params = int(sum(a.size for a in arrays))
        nonzero = int(sum(np.count_nonzero(a) for a in arrays))
        rows.append(LayerSparsity(name, params, nonzero, 1.0 - nonzero / params if params else 0.0))
    arrays = _model_weight_arrays(model)
    raw = b"".join(np.asarray(a, "float32").tobytes() for a in arrays)
    total = int(sum(a.size for a in arrays))
    prunable = sum(r.params for r in rows)
    prunable_nz = sum(r.nonzero for r in rows)
    return SparsityReport(
        layers=tuple(rows),
        total_params=total,
        nonzero_params=int(sum(np.count_nonzero(a) for a in arrays)),
        prunable_params=prunable,
        prunable_nonzero=prunable_nz,
        sparsity=1.0 - prunable_nz / prunable if prunable else 0.0,
        raw_bytes=len(raw),
        gzip_bytes=len(gzip.compress(raw, compresslevel=9)),
    )


def check_m_by_n(model, n: int = 4, m: int = 2) -> dict[str, bool]:
    """Which prunable layers have at least `m` zeros in every `n` consecutive input weights.

    Args:
        model: a Keras 3 model (wrapped or stripped).
        n: group size.
        m: zeros required per group (0 < m < n).

    Returns:
        `{layer_name: complies}` for every prunable layer.

    Raises:
        ValueError: if not 0 < m < n.
    """
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
    if m >= n:
        raise ValueError(f"m must be smaller than n. Received: m={m}, n={n}")
    result = {}
    for layer in _iter_layers(model):
        if isinstance(layer, PruneLowMagnitude):
            pairs = [
                (np.asarray(w.variable.numpy()) * np.asarray(k.numpy()), w.input_axis)
                for w, k in zip(layer.pruned_weights, layer.mask_variables, strict=True)
            ]
            name = layer.layer.name
        elif is_prunable(layer) and layer.built:
            pairs = [
                (np.asarray(w.variable.numpy()), w.input_axis) for w in prunable_weights(layer)
            ]
            name = layer.name
        else:
            continue
        result[name] = all(mask_math.m_by_n_ok(a, m, n, axis) for a, axis in pairs)
    return result


def _wrappers(model) -> list[PruneLowMagnitude]:
    if isinstance(model, PruneLowMagnitude):
        return [model]
    return [layer for layer in _iter_layers(model) if isinstance(layer, PruneLowMagnitude)]


def get_masks(model) -> dict[str, np.ndarray]:
    """The current masks, keyed `"<layer name>/<weight name>"` (e.g. `"dense/kernel"`)."""
    out = {}
    for wrapper in _wrappers(model):
        for w, m in zip(wrapper.pruned_weights, wrapper.mask_variables, strict=True):
            out[f"{wrapper.layer.name}/{w.name}"] = np.asarray(m.numpy())
    return out


def set_masks(model, masks: dict[str, np.ndarray], apply: bool = True) -> None:
    """Sets masks (keys as in `get_masks`) and, with `apply`, zeroes the masked weights now.

    To keep the masks fixed during training, wrap with `update_masks=False` (or
    `pruning_schedule=None, update_masks=False`); otherwise the schedule recomputes them.

    Raises:
        ValueError: for an unknown key or a mask of the wrong shape.
    """
    by_key = {}
    for wrapper in _wrappers(model):
        for w, m in zip(wrapper.pruned_weights, wrapper.mask_variables, strict=True):
            by_key[f"{wrapper.layer.name}/{w.name}"] = (w, m)
    unknown = sorted(set(masks) - set(by_key))
    if unknown:
        raise ValueError(f"Unknown mask key(s) {unknown}. Known: {sorted(by_key)}.")
    for key, value in masks.items():
        w, m = by_key[key]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(m.shape):
            raise ValueError(
                f"Mask {key!r} must have shape {tuple(m.shape)}. Received: shape {value.shape}"
            )
        m.assign(value.astype(m.dtype))
        if apply:
            w.variable.assign(np.asarray(w.variable.numpy()) * value.astype(w.variable.dtype))


def pruning_wrappers(model) -> list[PruneLowMagnitude]:
    """The `PruneLowMagnitude` layers of a model (nested models included)."""
    return _wrappers(model)
