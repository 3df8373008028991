"""Model plumbing shared by factorization and LoRA: layer paths, filters, copies, state transfer.

Layers are addressed by their Keras path (`layer.path`, e.g.
`"transformer_layer_0/self_attention_layer/query"`), which is unique inside a model and the same in
a copy rebuilt from the model's config. Filters follow `keras.Model.quantize(filters=...)`: a regex
string searched in the path, a list of them (any may match), or a callable taking the layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import keras

Filters = str | Sequence[str] | Callable[[keras.layers.Layer], bool] | None


def layer_path(layer: keras.layers.Layer) -> str:
    """Returns the layer's Keras path, or its name when it was never built under a scope."""
    return layer.path or layer.name


def iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Yields every layer nested in `model` (depth first, each once), not `model` itself."""
    # `_flatten_layers` is the walk Keras itself (and keras-hub's `enable_lora`) uses; there is no
    # public recursive equivalent.
    yield from model._flatten_layers(include_self=False, recursive=True)


def check_filters(filters: Filters, name: str = "filters") -> None:
    """Validates a filters argument (and compiles the regexes) at the entry of a public function.

    Raises:
        TypeError: if `filters` is not None, a string, a sequence of strings or a callable.
        ValueError: if a pattern is not a valid regular expression.
    """
    if filters is None or callable(filters):
        return
    patterns = [filters] if isinstance(filters, str) else filters
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"`{name}` must be None, a regex string, a list of regex strings or a callable "
            f"taking a layer. Received: {name}={filters!r}"
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"`{name}` contains an invalid regular expression {pattern!r}: {e}. "
                f"Received: {name}={filters!r}"
            ) from e


def matches(filters: Filters, layer: keras.layers.Layer) -> bool:
    """Whether `layer` is selected by `filters` (None selects every layer)."""
    if filters is None:
        return True
    if callable(filters):
        return bool(filters(layer))
    patterns = [filters] if isinstance(filters, str) else filters
    path = layer_path(layer)
    return any(re.search(p, path) for p in patterns)


def describe_filters(filters: Filters) -> str:
    """A short human description of `filters` for error messages."""
    if callable(filters):
        return getattr(filters, "__name__", repr(filters))
    return repr(filters)


def check_model(model, name: str = "model") -> None:
    """Raises TypeError/ValueError unless `model` is a built `keras.Model`."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`{name}` must be a keras.Model. Received: {name}={type(model).__name__}")
    if not model.built:
        raise ValueError(
            f"`{name}` must be built (call it on data or give it an Input) before it can be "
            f"transformed. Received: an unbuilt model {model.name!r}"
        )


def own_variables(layer: keras.layers.Layer) -> list:
    """The variables a layer saves itself (not those of its sublayers)."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def copy_state(source: keras.Model, target: keras.Model) -> None:
    """Copies every layer's saved state from `source` into the same-path layer of `target`.

    Uses each layer's own `save_own_variables` / `load_own_variables`, i.e. exactly what a `.keras`
    save followed by a load would transfer. For a LoRA-enabled source layer that is Keras' merged
    kernel (`kernel + (lora_alpha / lora_rank) * lora_kernel_a @ lora_kernel_b`).

    Raises:
        ValueError: if a layer holding variables in `source` has no same-path layer in `target`.
    """
    targets = {}
    for layer in [target, *iter_layers(target)]:
        if own_variables(layer):
            targets[layer_path(layer)] = layer
    for layer in [source, *iter_layers(source)]:
        if not own_variables(layer):
            continue
        path = layer_path(layer)
        if path not in targets:
            raise ValueError(
                f"Cannot copy the weights of layer {path!r}: the rebuilt model has no layer at "
                f"that path. Layers with weights there: {sorted(targets)}"
            )
        store: dict = {}
        layer.save_own_variables(store)
        targets[path].load_own_variables(store)


def _strip_lora(config):
    """Removes LoRA settings and freezing from every layer config in a serialized model."""
    if isinstance(config, dict):
        inner = config.get("config")
        if "class_name" in config and isinstance(inner, dict):
            inner.pop("lora_rank", None)
            inner.pop("lora_alpha", None)
            if "trainable" in inner:
                inner["trainable"] = True
        for value in config.values():
            _strip_lora(value)
    elif isinstance(config, list):
        for value in config:
            _strip_lora(value)
    return config


def copy_model(model: keras.Model, strip_lora: bool = False) -> keras.Model:
    """Rebuilds `model` from its config and copies its weights; the original is untouched.

    Args:
        model: a built Keras model (Sequential, functional, or a keras-hub model).
        strip_lora: rebuild every layer without LoRA and unfrozen; LoRA-enabled layers then receive
            their merged kernels through `copy_state`.

    Returns:
        A new, uncompiled model with equal outputs and no variables shared with `model` (a
        keras-hub task's preprocessor, which holds no weights, is shared).
    """
    config = keras.saving.serialize_keras_object(model)
    # The copy is returned uncompiled: its trainable variables differ (LoRA) and keras-hub tasks
    # warn when their custom compile is replayed from config.
    config.pop("compile_config", None)
    if strip_lora:
        config = _strip_lora(config)
    new = keras.saving.deserialize_keras_object(config)
    # keras-hub tasks rebuild their preprocessor from config without its vocabulary (that is an
    # asset of the .keras file); the preprocessor holds no trainable state, so share the original.
    if getattr(model, "preprocessor", None) is not None:
        new.preprocessor = model.preprocessor
    copy_state(model, new)
    return new
