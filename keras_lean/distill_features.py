"""Intermediate-layer (hidden-state) distillation: the student's layer outputs learn the teacher's.

Logits carry one vector per sample; a pruned student that must re-learn its inner layers gets
more signal from the teacher's inner activations (FitNets, Romero et al. 2015; TinyBERT's
hidden-state loss, Jiao et al. 2020; Minitron's prune + distill). After structured pruning the
student is the teacher with units removed, so its layers correspond to the teacher's by name, and
no learned projection is needed:

- a layer whose width pruning kept (a transformer block's output: the residual stream, when the
  hidden width is not pruned) is compared with the teacher's same layer directly;
- a narrowed layer (a convolution that lost filters) is compared with the teacher's **same
  channels**: `keras_lean.structured.kept_output_channels(student)` says which of the original
  channels each narrowed layer kept (recorded by the surgery, composed over successive shrinks).

Each pair's loss is the normalised mean squared error

    NMSE = mean((s - t[..., kept])^2) / (mean(t[..., kept]^2) + 1e-6)

(scale-free, so one weight suits layers and models of any activation size), and the pairs are
averaged. It is a `keras.distillation.FeatureDistillation`, so Keras' own `Distiller` extracts the
features (in one teacher forward pass, inside the same train step as the logits term, so the
stage's energy counts it). Keras' `Distiller` runs the student a second time for its feature
extractor; that forward pass is in the energy too.

`feature_losses(teacher, student, layers)` picks the pairs (`layers=None`: every keras-hub
transformer block the two share, else every weighted layer they share but the output layer) and
returns the teacher to give the `Distiller`: the teacher itself, or, when it has nested models (a
keras-hub task around its backbone), a flattened copy with the same weights and outputs, because
Keras' extractor reaches only top-level layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_lean._hub import is_transformer_block

_FLOOR = 1e-6


@keras.saving.register_keras_serializable(package="keras_lean")
class HiddenStateDistillation(keras.distillation.FeatureDistillation):
    """Normalised MSE between one student layer's output and the teacher's same layer.

    Args:
        layer_name: the layer's name, the same in both models.
        channels: indices of the teacher's output channels (last axis) that the student's layer
            kept, or None when the widths are equal.
    """

    def __init__(self, layer_name: str, channels: Sequence[int] | None = None):
        super().__init__(loss="mse", teacher_layer_name=layer_name, student_layer_name=layer_name)
        self.channels = None if channels is None else [int(c) for c in channels]

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        t = keras.tree.flatten(teacher_outputs)[0]
        s = keras.tree.flatten(student_outputs)[0]
        if self.channels is not None:
            t = keras.ops.take(t, np.asarray(self.channels, dtype="int32"), axis=-1)
        t = keras.ops.stop_gradient(keras.ops.cast(t, "float32"))
        s = keras.ops.cast(s, "float32")
        err = keras.ops.mean(keras.ops.square(s - t))
        return err / (keras.ops.mean(keras.ops.square(t)) + _FLOOR)

    def validate_outputs(self, teacher_outputs, student_outputs):
        keras.tree.assert_same_structure(teacher_outputs, student_outputs)

    def get_config(self) -> dict:
        return {"layer_name": self.teacher_layer_name, "channels": self.channels}

    @classmethod
    def from_config(cls, config: dict) -> HiddenStateDistillation:
        return cls(**config)


@dataclasses.dataclass(frozen=True)
class FeaturePair:
    """One distilled layer: its name, and the teacher's kept channels (None: same width)."""

    name: str
    channels: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {
            "layer": self.name,
            "channels": None if self.channels is None else len(self.channels),
        }


def _top_layers(model: keras.Model) -> dict[str, Any]:
    return {la.name: la for la in model.layers if not isinstance(la, keras.layers.InputLayer)}


def _output_layers(model: keras.Model) -> set[str]:
    from keras_lean._keras_internals import keras_history

    names = set()
    for t in keras.tree.flatten(model.outputs or []):
        history = keras_history(t)
        if history is not None:
            names.add(history[0].name)
    return names


def _single_shape(layer: Any) -> tuple | None:
    try:
        out = layer.output
    except (AttributeError, ValueError):  # a layer called more than once, or not called
        return None
    flat = keras.tree.flatten(out)
    if len(flat) != 1 or len(flat[0].shape) < 2:
        return None
    return tuple(flat[0].shape)


def teacher_for_features(teacher: keras.Model) -> keras.Model:
    """`teacher`, or a flattened copy of it (same weights and outputs) when it has nested
    models: Keras' feature extractor reaches only top-level layers."""
    from keras_lean.structured.surgery import flatten_model, has_nested_models

    if isinstance(teacher, keras.Sequential) or not has_nested_models(teacher):
        return teacher
    flat, _ = flatten_model(teacher)
    return flat


def feature_pairs(
    teacher: keras.Model, student: keras.Model, layers: Sequence[str] | None = None
) -> list[FeaturePair]:
    """The layers to distil, matched by name (`teacher` must be flat: `teacher_for_features`).

    Args:
        teacher: the (flat) teacher.
        student: the student; its top-level layers are the candidates.
        layers: names to distil; None: every keras-hub transformer block the two models share,
            or, when they share none, every layer with weights they share except the one that
            makes the output.

    Returns:
        The pairs, in the student's layer order.

    Raises:
        ValueError: a named layer missing from either model, or whose widths differ with no
            record of which channels the student kept (`kept_output_channels`); or, with
            `layers=None`, no layer to distil.
    """
    from keras_lean.structured.surgery import kept_output_channels

    t_layers, s_layers = _top_layers(teacher), _top_layers(student)
    kept = kept_output_channels(student)
    if layers is None:
        outputs = _output_layers(student)
        shared = [n for n in s_layers if n in t_layers and n not in outputs]
        blocks = [n for n in shared if is_transformer_block(s_layers[n])]
        names = blocks or [n for n in shared if s_layers[n].weights]
        explicit = False
    else:
        names = list(dict.fromkeys(str(n) for n in layers))
        explicit = True
    pairs = []
    for name in names:
        for where, table in (("student", s_layers), ("teacher", t_layers)):
            if name not in table:
                raise ValueError(
                    f"distill hidden_layers: no top-level layer {name!r} in the {where} "
                    f"(layers: {sorted(table)[:12]}...). Name layers the two models share."
                )
        s_shape, t_shape = _single_shape(s_layers[name]), _single_shape(t_layers[name])
        problem = None
        channels = None
        if s_shape is None or t_shape is None:
            problem = "it has no single output tensor (or is called more than once)"
        elif s_shape[:-1] != t_shape[:-1]:
            problem = f"its output shapes differ beyond the last axis ({s_shape} vs {t_shape})"
        elif s_shape[-1] != t_shape[-1]:
            ids = kept.get(name)
            if ids is None or len(ids) != s_shape[-1] or ids.max(initial=-1) >= t_shape[-1]:
                problem = (
                    f"its widths differ ({s_shape[-1]} vs the teacher's {t_shape[-1]}) and there "
                    "is no record of which channels the student kept (a model straight from "
                    "prune_structured / shrink has one; a reloaded or re-cloned one has not)"
                )
            else:
                channels = np.asarray(ids)
        if problem is not None:
            if explicit:
                raise ValueError(f"distill hidden_layers: cannot distil layer {name!r}: {problem}.")
            continue
        pairs.append(FeaturePair(name, channels))
    if not pairs:
        raise ValueError(
            "distill hidden: no layer of the student matches the teacher by name and width; "
            "name them with hidden_layers, or set hidden to 0."
        )
    return pairs


def distilled_layers(distiller: keras.distillation.Distiller) -> list[dict]:
    """The layers a distiller's hidden-state term compares, as `FeaturePair.to_dict` rows
    (`channels`: how many of the teacher's channels a narrowed layer is compared on, None when
    the widths are equal); [] for logits only."""
    return [
        FeaturePair(d.teacher_layer_name, d.channels).to_dict()
        for d in distiller.distillation_losses
        if isinstance(d, HiddenStateDistillation)
    ]


def feature_losses(
    teacher: keras.Model,
    student: keras.Model,
    layers: Sequence[str] | None = None,
) -> tuple[keras.Model, list[HiddenStateDistillation], list[FeaturePair]]:
    """`(teacher for the Distiller, one HiddenStateDistillation per pair, the pairs)`."""
    flat = teacher_for_features(teacher)
    pairs = feature_pairs(flat, student, layers)
    losses = [HiddenStateDistillation(p.name, p.channels) for p in pairs]
    return flat, losses, pairs
