"""keras-hub layers that keras_lean understands, recognised by class, without importing keras_hub.

keras-hub's `TransformerEncoder` (BERT, MiniLM, RoBERTa, ... backbones) and `TransformerDecoder`
(GPT-2, BART, ...) are each one layer holding attention and a feed-forward block. Their
configuration has `num_heads` and `intermediate_dim`; the attention `key_dim` is derived as
`hidden_dim // num_heads` and the hidden width comes from the input. The feed-forward neurons
(`intermediate_dim`) are removed by rebuilding the layer from its config; heads are removed by
rebuilding it as `keras_lean.structured.hub_layers.PrunedTransformerEncoder` / `...Decoder`, which
keep each head's width (`head_dim`) while `num_heads` falls. The hidden width stays.

The supported keras-hub versions are those `pyproject.toml` allows (`keras-hub>=0.20,<0.33`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "FFN_INTERMEDIATE",
    "FFN_OUTPUT",
    "is_hub_class",
    "is_transformer_block",
    "is_transformer_decoder",
    "is_transformer_encoder",
    "transformer_encoder_flops",
]

#: Sub-layer names of the feed-forward block inside a keras-hub TransformerEncoder.
FFN_INTERMEDIATE = "feedforward_intermediate_dense"
FFN_OUTPUT = "feedforward_output_dense"


def is_hub_class(layer: Any, class_name: str) -> bool:
    """Whether `layer` is (a subclass of) the keras-hub class `class_name`."""
    return any(
        c.__name__ == class_name and c.__module__.startswith("keras_hub")
        for c in type(layer).__mro__
    )


def is_transformer_encoder(layer: Any) -> bool:
    """Whether `layer` is (a subclass of) keras-hub's `TransformerEncoder`."""
    return is_hub_class(layer, "TransformerEncoder")


def is_transformer_decoder(layer: Any) -> bool:
    """Whether `layer` is (a subclass of) keras-hub's `TransformerDecoder`."""
    return is_hub_class(layer, "TransformerDecoder")


def is_transformer_block(layer: Any) -> bool:
    """Whether `layer` is a keras-hub `TransformerEncoder` or `TransformerDecoder`."""
    return is_transformer_encoder(layer) or is_transformer_decoder(layer)


def transformer_encoder_flops(layer: Any, in_shape: tuple) -> int:
    """Forward FLOPs per sample of one TransformerEncoder call on `(batch, tokens..., hidden)`.

    Counted as `keras_lean.flops` counts the layers it is made of: the four attention
    projections (with biases) and the two attention matmuls, two LayerNormalizations (7 FLOPs
    per element), the two feed-forward Dense layers (with biases) and the two residual adds.
    Unknown token dimensions count as 1 (per-token FLOPs).
    """
    d = int(in_shape[-1])
    t = math.prod(1 if s is None else int(s) for s in in_shape[1:-1])
    head_dim = getattr(layer, "head_dim", None) or d // int(layer.num_heads)
    inner = int(layer.num_heads) * int(head_dim)  # num_heads x key_dim
    ff = int(layer.intermediate_dim)
    attention = 3 * t * inner * (2 * d + 1) + 2 * 2 * t * t * inner + t * d * (2 * inner + 1)
    feed_forward = t * ff * (2 * d + 1) + t * d * (2 * ff + 1)
    return attention + feed_forward + 2 * 7 * t * d + 2 * t * d
