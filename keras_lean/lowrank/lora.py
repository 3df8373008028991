"""LoRA through Keras' own `enable_lora`: `apply_lora` / `merge_lora` and `lora_summary`.

Keras 3 gives `Dense`, `EinsumDense`, `Embedding` and the convolutions an `enable_lora(rank,
lora_alpha)` that freezes the kernel and adds two float32 factors `lora_kernel_a` (kernel shape
without its last axis, plus `rank`) and `lora_kernel_b` (`rank` x last axis); the effective
kernel is `kernel + (lora_alpha / rank) * lora_kernel_a @ lora_kernel_b`. This module only
chooses the layers, freezes the rest of the model, and folds the factors back with Keras' own
merge.

What Keras 3.15 does on `.keras` save/load, which `merge_lora` relies on and the tests pin down:

- `save_own_variables` of a LoRA layer writes the *merged* kernel; the factors are not saved.
- A top-level layer of a functional model keeps `lora_rank` / `lora_alpha` in its config, so it
  loads LoRA-enabled again with zeroed factors (the trained update already folded into the kernel).
  `Dense` (and `Embedding`) re-enable LoRA with `lora_alpha = rank` on load (their `build` does not
  pass the stored alpha on), `EinsumDense` and the convolutions keep it.
- Layers created inside another layer's `build` (keras-hub's attention projections) are not in the
  model config: they load as plain layers holding the merged kernel.

Either way the outputs survive a save/load; `merge_lora` gives the same outputs with no LoRA left.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import keras
import numpy as np

from keras_lean import _keras_internals as internals
from keras_lean.lowrank._model import (
    Filters,
    check_filters,
    check_model,
    copy_model,
    describe_filters,
    iter_layers,
    layer_paths,
    matches,
    named_layers,
)

_LORA_FACTORS = {
    "lora_kernel_a",
    "lora_kernel_b",
    "lora_embeddings_a",
    "lora_embeddings_b",
}


def supports_lora(layer: keras.layers.Layer) -> bool:
    """Whether Keras can enable LoRA on `layer`: it has `enable_lora` and a kernel/embeddings."""
    return hasattr(layer, "enable_lora") and internals.has_base_matrix(layer)


def _base_matrix(layer: keras.layers.Layer):
    """The frozen weight LoRA adapts: the kernel, or the embeddings table of an `Embedding`."""
    if isinstance(layer, keras.layers.Embedding):
        return internals.layer_embeddings(layer)
    return internals.layer_kernel(layer)


def _rank_bound(layer: keras.layers.Layer) -> int:
    """The largest useful rank: min(inputs, outputs) of the kernel seen as a matrix.

    Keras shapes `lora_kernel_a` as the kernel without its last axis, so the update
    `a @ b` is a (prod(kernel.shape[:-1]) x kernel.shape[-1]) matrix of rank at most `rank`.
    """
    shape = tuple(_base_matrix(layer).shape)
    return int(min(math.prod(shape[:-1]), shape[-1]))


def default_lora_targets(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers `apply_lora` adapts when `targets=None`.

    Transformers (any `keras.layers.MultiHeadAttention`, which keras-hub's attention layers
    subclass): the query and value projections of every attention layer, as in the LoRA paper and
    keras-hub's `Backbone.enable_lora`. Any other model: every `keras.layers.Dense` layer.
    """
    layers = list(iter_layers(model))
    attention = [lyr for lyr in layers if isinstance(lyr, keras.layers.MultiHeadAttention)]
    if attention:
        found = []
        for mha in attention:
            projections = internals.mha_projections(mha)
            found.extend(p for p in (projections["query"], projections["value"]) if p is not None)
        return found
    return [lyr for lyr in layers if type(lyr) is keras.layers.Dense]


def _select_targets(model: keras.Model, targets: Filters) -> list[keras.layers.Layer]:
    if targets is None:
        chosen = default_lora_targets(model)
        if not chosen:
            raise ValueError(
                "apply_lora found no default targets: the model has no attention layer "
                "(MultiHeadAttention) and no Dense layer. Pass `targets=` name patterns. "
                f"Layers that support LoRA: {_candidate_paths(model)}"
            )
        return chosen
    chosen = [
        lyr
        for path, lyr in named_layers(model)
        if supports_lora(lyr) and matches(targets, lyr, path)
    ]
    if not chosen:
        raise ValueError(
            f"`targets` matched no layer that supports LoRA. Received: "
            f"targets={describe_filters(targets)}. Patterns are regular expressions searched in "
            f"the layer path. Layers that support LoRA: {_candidate_paths(model)}"
        )
    return chosen


def _candidate_paths(model: keras.Model) -> list[str]:
    return [path for path, lyr in named_layers(model) if supports_lora(lyr)]


def apply_lora(
    model: keras.Model,
    rank: int,
    alpha: float | None = None,
    targets: Filters = None,
    keep_trainable: Filters = None,
) -> keras.Model:
    """Returns a copy of `model` with its base frozen and LoRA adapters on the targeted layers.

    The copy is rebuilt from `model`'s config with the same weights; `model` itself is not touched.
    Every layer of the copy is frozen (`trainable = False`, so BatchNormalization also runs in
    inference mode, as in any Keras fine-tune of a frozen base), then Keras' own
    `layer.enable_lora(rank, lora_alpha=alpha)` adds the trainable factors to each target. The bias
    of a target stays frozen (LoRA adapts the kernel only). Layers matched by `keep_trainable`
    (typically a freshly initialized classification head) stay fully trainable.

    Args:
        model: a built Keras model (Sequential, functional, keras-hub backbone or task).
        rank: LoRA rank, an integer in [1, min(inputs, outputs)] of every targeted kernel.
        alpha: LoRA scale numerator; the update is scaled by `alpha / rank`. None means `rank`
            (scale 1), Keras' default.
        targets: layers to adapt: regex string(s) searched in the layer path
            (e.g. `"query|value"`, `["dense_1$"]`) or a callable taking a layer. None: the query and
            value projections of every attention layer, or every Dense layer when there is none.
        keep_trainable: layers left fully trainable (same forms as `targets`); None: none.

    Returns:
        A new `keras.Model` whose trainable variables are the LoRA factors (and `keep_trainable`).

    Raises:
        ValueError: bad `rank` or `alpha`, `targets` matching nothing, a targeted layer with a
            kernel constraint or with LoRA already enabled.
        TypeError: `model` is not a Keras model or a filter has the wrong type.

    Example:

    ```python
    lora_model = apply_lora(backbone, rank=4)            # query/value of each attention layer
    lora_model = apply_lora(cnn, rank=4, targets="dense")
    ```
    """
    check_model(model)
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank <= 0:
        raise ValueError(f"`rank` must be a positive integer. Received: rank={rank!r}")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0
    ):
        raise ValueError(f"`alpha` must be a positive number or None. Received: alpha={alpha!r}")
    check_filters(targets, "targets")
    check_filters(keep_trainable, "keep_trainable")
    rank = int(rank)

    new = copy_model(model)
    chosen = _select_targets(new, targets)
    paths = layer_paths(new)
    for layer in chosen:
        path = paths[id(layer)]
        if not supports_lora(layer):
            raise ValueError(f"Layer {path!r} ({type(layer).__name__}) does not support LoRA.")
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"LoRA is already enabled on layer {path!r}. Merge it first with merge_lora()."
            )
        if getattr(layer, "kernel_constraint", None) is not None:
            raise ValueError(
                f"Cannot enable LoRA on layer {path!r}: it has a kernel_constraint "
                f"({type(layer.kernel_constraint).__name__}). Keras' enable_lora refuses this: a "
                "constraint is applied to the kernel variable after each update, but under LoRA "
                "the kernel is frozen and the update lives in the low-rank factors, so the "
                "effective kernel (kernel + alpha/rank * A @ B) would escape the constraint. "
                "Remove the constraint or leave this layer out of `targets`."
            )
        bound = _rank_bound(layer)
        if rank > bound:
            raise ValueError(
                f"`rank` must be in [1, min(inputs, outputs)] = [1, {bound}] for layer {path!r} "
                f"(kernel shape {tuple(_base_matrix(layer).shape)}). Received: rank={rank}"
            )

    new.trainable = True
    for layer in iter_layers(new):
        layer.trainable = False
    for layer in chosen:
        layer.trainable = True
        layer.enable_lora(rank, lora_alpha=alpha)
        for variable in internals.own_trainable_variables(layer):
            if variable.name not in _LORA_FACTORS:
                variable.trainable = False
    if keep_trainable is not None:
        kept = [lyr for path, lyr in named_layers(new) if matches(keep_trainable, lyr, path)]
        if not kept:
            raise ValueError(
                f"`keep_trainable` matched no layer. Received: "
                f"keep_trainable={describe_filters(keep_trainable)}. Layer paths: "
                f"{[path for path, lyr in named_layers(new) if lyr.weights]}"
            )
        for layer in kept:
            layer.trainable = True
    return new


def lora_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of `model` that have LoRA enabled."""
    return [lyr for lyr in iter_layers(model) if getattr(lyr, "lora_enabled", False)]


def merge_lora(model: keras.Model) -> keras.Model:
    """Returns a plain copy of `model` with every LoRA update folded into its kernel.

    Each LoRA layer's kernel becomes `kernel + (lora_alpha / lora_rank) * lora_kernel_a @
    lora_kernel_b`, computed by Keras itself (the layer's `save_own_variables`, the same merge a
    `.keras` save performs); the copy is rebuilt from the config with LoRA switched off and every
    layer trainable again, so it has no LoRA variables and saves/loads as a plain model. Outputs
    match `model`'s to float32 rounding. `model` is not touched.

    A model without LoRA layers is returned unchanged (the same object) with a `UserWarning`: it is
    a no-op, not an error, so a deploy step can call it unconditionally.

    Args:
        model: a built Keras model, typically from `apply_lora` after fine-tuning.

    Returns:
        The merged model (or `model` itself when it has no adapters).

    Example:

    ```python
    deployable = merge_lora(lora_model)
    ```
    """
    check_model(model)
    if not lora_layers(model):
        warnings.warn(
            f"merge_lora: model {model.name!r} has no LoRA-enabled layer; nothing to merge, "
            "returning it unchanged.",
            UserWarning,
            stacklevel=2,
        )
        return model
    return copy_model(model, strip_lora=True)


def lora_summary(model: keras.Model) -> dict:
    """Counts of a (LoRA) model's parameters and its adapted layers, JSON-able.

    Returns:
        A dict with `total_params` (all variables' sizes, adapters included), `trainable_params`,
        `trainable_fraction`, `adapter_params`, and `layers`: one entry per LoRA layer with its
        `path`, `rank`, `alpha` and `adapter_params`.
    """
    check_model(model)
    total = int(sum(np.prod(v.shape) for v in model.weights))
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    layers = []
    paths = layer_paths(model)
    for layer in lora_layers(model):
        n = int(sum(np.prod(v.shape) for v in layer.weights if v.name in _LORA_FACTORS))
        layers.append(
            {
                "path": paths[id(layer)],
                "rank": int(layer.lora_rank),
                "alpha": float(layer.lora_alpha),
                "adapter_params": n,
            }
        )
    return {
        "total_params": total,
        "trainable_params": trainable,
        "trainable_fraction": trainable / total if total else 0.0,
        "adapter_params": int(sum(entry["adapter_params"] for entry in layers)),
        "layers": layers,
    }


__all__: Sequence[str] = (
    "apply_lora",
    "merge_lora",
    "lora_summary",
    "lora_layers",
    "default_lora_targets",
    "supports_lora",
)
