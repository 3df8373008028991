"""keras-hub layers that keras_lean understands, recognised by class, without importing keras_hub.

keras-hub's `TransformerEncoder` (BERT, MiniLM, RoBERTa, ... backbones) is one layer holding a
self-attention block and a feed-forward block. Its configuration has `num_heads` and
`intermediate_dim`; the attention `key_dim` is derived as `hidden_dim // num_heads` and the hidden
width comes from the input. So the feed-forward neurons (`intermediate_dim`) can be removed by
rebuilding the layer from its config, while heads and the hidden width cannot without changing
the layer's definition: `keras_lean.structured` prunes the former and reports the latter.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["FFN_INTERMEDIATE", "FFN_OUTPUT", "is_transformer_encoder", "transformer_encoder_flops"]

#: Sub-layer names of the feed-forward block inside a keras-hub TransformerEncoder.
FFN_INTERMEDIATE = "feedforward_intermediate_dense"
FFN_OUTPUT = "feedforward_output_dense"


def is_transformer_encoder(layer: Any) -> bool:
    """Whether `layer` is (a subclass of) keras-hub's `TransformerEncoder`."""
    return any(
        c.__name__ == "TransformerEncoder" and c.__module__.startswith("keras_hub")
        for c in type(layer).__mro__
    )


def transformer_encoder_flops(layer: Any, in_shape: tuple) -> int:
    """Forward FLOPs per sample of one TransformerEncoder call on `(batch, tokens..., hidden)`.

    Counted as `keras_lean.flops` counts the layers it is made of: the four attention
    projections (with biases) and the two attention matmuls, two LayerNormalizations (7 FLOPs
    per element), the two feed-forward Dense layers (with biases) and the two residual adds.
    Unknown token dimensions count as 1 (per-token FLOPs).
    """
    d = int(in_shape[-1])
    t = math.prod(1 if s is None else int(s) for s in in_shape[1:-1])
    inner = int(layer.num_heads) * (d // int(layer.num_heads))  # num_heads x key_dim
    ff = int(layer.intermediate_dim)
    attention = 3 * t * inner * (2 * d + 1) + 2 * 2 * t * t * inner + t * d * (2 * inner + 1)
    feed_forward = t * ff * (2 * d + 1) + t * d * (2 * ff + 1)
    return attention + feed_forward + 2 * 7 * t * d + 2 * t * d
