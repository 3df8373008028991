"""Model plumbing shared by factorization and LoRA: layer paths, filters, copies, state transfer.

Layers are addressed by their path inside the model: the chain of layer names from the model down
(`"fc1"`, `"backbone/dense"`, `"transformer_layer_0/self_attention_layer/query"`). Unlike Keras'
`layer.path` (the name scope the layer happened to be built under, which carries a Sequential's
own name and is lost when the model is rebuilt from its config), it is the same in a model and in
every copy rebuilt from that model's config. Filters follow `keras.Model.quantize(filters=...)`:
a regex string searched in the path, a list of them (any may match), or a callable taking the
layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import keras

from keras_lean import _backend
from keras_lean import _keras_internals as internals

Filters = str | Sequence[str] | Callable[[keras.layers.Layer], bool] | None


def _children(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers directly inside `layer`, in Keras' tracking order.

    Keras' recursive walk is depth first, each layer before its own sublayers, so a layer is a
    direct child unless an earlier one already holds it.
    """
    children, covered = [], set()
    for sub in internals.flatten_layers(layer):
        if id(sub) in covered:
            continue
        children.append(sub)
        covered.update(id(inner) for inner in internals.flatten_layers(sub))
    return children


def named_layers(model: keras.layers.Layer) -> list[tuple[str, keras.layers.Layer]]:
    """Every layer nested in `model` (depth first, each once) with its path inside `model`.

    A layer reached twice (shared) keeps the path where it was first met.
    """
    out: list[tuple[str, keras.layers.Layer]] = []
    seen = {id(model)}

    def walk(layer, prefix):
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            out.append((path, child))
            walk(child, path + "/")

    walk(model, "")
    return out


def layer_paths(model: keras.layers.Layer) -> dict[int, str]:
    """`id(layer) -> path inside model` for every layer nested in `model`."""
    return {id(layer): path for path, layer in named_layers(model)}


def iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Yields every layer nested in `model` (depth first, each once), not `model` itself."""
    for _, layer in named_layers(model):
        yield layer


def paired_layers(
    source: keras.layers.Layer, target: keras.layers.Layer
) -> list[tuple[str, keras.layers.Layer, keras.layers.Layer]]:
    """Pairs each layer of `source` with its twin in `target`, a model rebuilt from its config.

    Twins are found level by level: by name when both levels hold the same names, else by
    position when both hold as many layers (a custom layer's unnamed sublayers get fresh
    automatic names when rebuilt). Returns `(path in source, source layer, target layer)`, the
    models themselves first with path `""`.

    Raises:
        ValueError: if a level of `target` holds a different number of layers than `source`'s.
    """
    pairs = [("", source, target)]
    seen = {id(source)}

    def walk(src, tgt, prefix):
        src_children, tgt_children = _children(src), _children(tgt)
        src_names = [c.name for c in src_children]
        tgt_names = [c.name for c in tgt_children]
        if sorted(src_names) == sorted(tgt_names) and len(set(src_names)) == len(src_names):
            by_name = dict(zip(tgt_names, tgt_children, strict=True))
            twins = [by_name[name] for name in src_names]
        elif len(src_children) == len(tgt_children):
            twins = tgt_children
        else:
            raise ValueError(
                f"Cannot match the layers of {prefix.rstrip('/') or 'the model'!r} with its "
                f"rebuilt copy: the model holds {src_names}, the copy {tgt_names}."
            )
        for child, twin in zip(src_children, twins, strict=True):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            pairs.append((path, child, twin))
            walk(child, twin, path + "/")

    walk(source, target, "")
    return pairs


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


def matches(filters: Filters, layer: keras.layers.Layer, path: str) -> bool:
    """Whether `layer`, at `path` in its model, is selected by `filters` (None selects all)."""
    if filters is None:
        return True
    if callable(filters):
        return bool(filters(layer))
    patterns = [filters] if isinstance(filters, str) else filters
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
    return internals.own_variables(layer)


def copy_state(source: keras.Model, target: keras.Model) -> None:
    """Copies every layer's saved state from `source` into its twin in `target` (`paired_layers`).

    Uses each layer's own `save_own_variables` / `load_own_variables`, i.e. exactly what a `.keras`
    save followed by a load would transfer. For a LoRA-enabled source layer that is Keras' merged
    kernel (`kernel + (lora_alpha / lora_rank) * lora_kernel_a @ lora_kernel_b`).

    Raises:
        ValueError: if `target` is not built like `source` (a level with other layers, or a
            layer whose variables do not fit).
    """
    for path, layer, twin in paired_layers(source, target):
        if not own_variables(layer):
            continue
        store = _backend.saved_state(layer)
        try:
            twin.load_own_variables(store)
        except ValueError as e:
            raise ValueError(
                f"Cannot copy the weights of layer {path or source.name!r} into its rebuilt "
                f"copy ({type(twin).__name__}): {e}"
            ) from e


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


def _first_sentence(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.split(". ")[0].splitlines()[0]


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
    # keras-hub tasks rebuild their preprocessor from config without its vocabulary (that is an
    # asset of the .keras file); the preprocessor holds no trainable state, so the copy shares
    # the original, attached after the rebuild (rebuilt without one, so it is tracked once).
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None and "preprocessor" in (config.get("config") or {}):
        config["config"]["preprocessor"] = None
    try:
        new = keras.saving.deserialize_keras_object(config)
    except Exception as e:  # Keras raises TypeError, ValueError or others from a user's class
        raise ValueError(
            f"Cannot copy model {model.name!r} ({type(model).__name__}): Keras could not rebuild "
            f"it from its config ({type(e).__name__}: {_first_sentence(e)}). "
            "A subclassed model must be registered with "
            "@keras.saving.register_keras_serializable() and have a get_config() returning its "
            "__init__ arguments; or build it with the functional API (keras.Model(inputs, "
            "outputs)) or as a keras.Sequential."
        ) from e
    if not new.built:
        raise ValueError(
            f"Cannot copy model {model.name!r} ({type(model).__name__}): the model rebuilt from "
            "its config is not built. Give the subclassed model a build() (or a "
            "get_build_config()) so Keras can rebuild it, or build it with the functional API "
            "(keras.Model(inputs, outputs)) or as a keras.Sequential."
        )
    if preprocessor is not None:
        new.preprocessor = preprocessor
    copy_state(model, new)
    return new
