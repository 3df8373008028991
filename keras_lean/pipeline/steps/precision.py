"""Mixed precision for fine-tuning, and the float32 form deploy exports."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import keras


def _with_policy(
    model: keras.Model, policy: str, keep: frozenset[str] = frozenset()
) -> keras.Model:
    """A clone whose layers (except those named in `keep`) use dtype policy `policy`."""
    import keras

    def clone_fn(layer):
        cfg = layer.get_config()
        if layer.name not in keep and "dtype" in cfg:
            cfg["dtype"] = policy
        return layer.__class__.from_config(cfg)

    clone = keras.models.clone_model(model, clone_function=clone_fn)
    clone.set_weights(model.get_weights())
    return clone


def _output_layer_names(model: keras.Model) -> frozenset[str]:
    from keras_lean._keras_internals import keras_history

    names = set()
    for t in model.outputs:
        history = keras_history(t)
        if history is not None:
            names.add(history[0].name)
    return frozenset(names)


def with_mixed_precision(model: keras.Model) -> keras.Model:
    """A clone computing in float16 (variables float32); output layers stay float32."""
    return _with_policy(model, "mixed_float16", keep=_output_layer_names(model))


def as_float32(model: keras.Model) -> keras.Model:
    """Deployment form of a mixed-precision model: float32 everywhere (TFLite's float path)."""

    def mixed(m) -> bool:
        return any(
            getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32") != "float32"
            or (hasattr(layer, "layers") and mixed(layer))
            for layer in m.layers
        )

    return _with_policy(model, "float32") if mixed(model) else model
