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
- `prune_structured_progressively(model, ratio, x, y, epochs=...)`: trains in segments and
  physically removes the channels at each pruning event (optimizer state sliced along,
  `optimizer_state.py`), so every later step is cheaper.
- `round_to="auto"`: surviving widths rounded to this CPU's vector lanes (`simd_lanes`).
- `prune_hidden_width(model, ratio, importance)`: removes hidden channels (the residual stream)
  of a keras-hub transformer from the embeddings, every block, the LayerNorms and the head, as
  one group (Minitron's width pruning; `width.py`, `hidden_width_scores` ranks them).
- `register_channel_rule(layer_class, rule)`: how a custom layer moves and is narrowed
  (`ChannelRule`); the built-in layers are registered the same way (`rules.py`,
  docs/extending.md).

In a gradual model the masks are exact: the masked model computes what the shrunk one will
(LayerNormalization is replaced by `MaskedLayerNormalization`, whose statistics skip the masked
channels; attention heads are masked inside `MaskedMultiHeadAttention`).
"""

import importlib.util

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
from keras_lean.structured.optimizer_state import carry_optimizer_state, trace_weight_slices
from keras_lean.structured.progressive import ProgressiveReport, prune_structured_progressively
from keras_lean.structured.rules import (
    ChannelRule,
    PassThrough,
    Producer,
    UnsupportedLayer,
    get_channel_rule,
    register_channel_rule,
)
from keras_lean.structured.surgery import flatten_model, kept_output_channels
from keras_lean.structured.width import (
    WIDTH_IMPORTANCE,
    hidden_width_scores,
    prune_hidden_width,
)

if importlib.util.find_spec("keras_hub") is not None:
    # registers PrunedTransformerEncoder / PrunedTransformerDecoder (and the gradual masks'
    # MaskedTransformerEncoder / ...Decoder), so pruned and masked keras-hub models load from
    # .keras with no custom_objects
    from keras_lean.structured import hub_layers  # noqa: F401

__all__ = [
    "IMPORTANCE_CRITERIA",
    "ChannelGroup",
    "ChannelMask",
    "ChannelRule",
    "DependencyGraph",
    "LayerStructure",
    "MaskedLayerNormalization",
    "MaskedMultiHeadAttention",
    "PassThrough",
    "Producer",
    "ProgressiveReport",
    "SkippedLayer",
    "StructureReport",
    "UnsupportedLayer",
    "WIDTH_IMPORTANCE",
    "build_graph",
    "carry_optimizer_state",
    "flatten_model",
    "kept_output_channels",
    "get_channel_rule",
    "hidden_width_scores",
    "keep_count",
    "prune_hidden_width",
    "prune_structured",
    "prune_structured_gradually",
    "prune_structured_progressively",
    "register_channel_rule",
    "resolve_round_to",
    "select_units",
    "shrink",
    "simd_lanes",
    "structure_report",
    "trace_weight_slices",
    "unit_scores",
]
