"""Structured pruning: remove whole neurons, channels, filters and attention heads.

Masks alone do not make inference faster; this package rebuilds a smaller Keras 3 model with the
surviving weights, so every runtime (Keras, XLA, TFLite) runs fewer FLOPs.

- `build_graph(model)`: the channel dependency graph (coupled groups, skipped layers and why).
- `prune_structured(model, ratio, importance)`: one shot, returns a new smaller model.
- `prune_structured_gradually(model, schedule)` then `shrink(model)`: masks during fine-tuning,
  then physical removal.
- `structure_report(original, pruned)`: widths, parameters and FLOPs before and after.
- `flatten_model(model)`: inlines nested models called once (both prune functions do this first),
  so a backbone used as a layer or a keras-hub task is pruned through.
- `round_to="auto"`: surviving widths rounded to this CPU's vector lanes (`simd_lanes`).

In a gradual model the masks are exact: the masked model computes what the shrunk one will
(LayerNormalization is replaced by `MaskedLayerNormalization`, whose statistics skip the masked
channels; attention heads are masked inside `MaskedMultiHeadAttention`).
"""

from keras_lean.structured.api import (
    LayerStructure,
    StructureReport,
    prune_structured,
    prune_structured_gradually,
    select_units,
    shrink,
    structure_report,
)
from keras_lean.structured.graph import ChannelGroup, DependencyGraph, SkippedLayer, build_graph
from keras_lean.structured.hardware import resolve_round_to, simd_lanes
from keras_lean.structured.importance import IMPORTANCE_CRITERIA, unit_scores
from keras_lean.structured.masks import (
    ChannelMask,
    MaskedLayerNormalization,
    MaskedMultiHeadAttention,
    keep_count,
)
from keras_lean.structured.surgery import flatten_model

__all__ = [
    "IMPORTANCE_CRITERIA",
    "ChannelGroup",
    "ChannelMask",
    "DependencyGraph",
    "LayerStructure",
    "MaskedLayerNormalization",
    "MaskedMultiHeadAttention",
    "SkippedLayer",
    "StructureReport",
    "build_graph",
    "flatten_model",
    "keep_count",
    "prune_structured",
    "prune_structured_gradually",
    "resolve_round_to",
    "select_units",
    "shrink",
    "simd_lanes",
    "structure_report",
    "unit_scores",
]
