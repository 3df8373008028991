"""keras-hub transformer blocks with fewer attention heads of the original width.

keras-hub's `TransformerEncoder` and `TransformerDecoder` derive the attention head width as
`key_dim = hidden_dim // num_heads`, so a block rebuilt from its config with fewer heads would
get *wider* heads (and weights that no longer fit). `PrunedTransformerEncoder` and
`PrunedTransformerDecoder` are the same blocks with one more config entry, `head_dim`: once the
keras-hub block is built, its attention sublayers are rebuilt with `key_dim = value_dim =
head_dim` and the block's `num_heads`. Everything else (feed-forward, LayerNorms, masks, the
decoder's cache) is keras-hub's own code.

Both classes are registered with Keras under the package `keras_lean`, so a pruned model saves to
`.keras` and loads with no `custom_objects` once `keras_lean.structured` is imported (importing
it imports this module when keras-hub is installed). Structured pruning produces them only for
blocks that lost heads; an unpruned block stays the plain keras-hub class.
"""

from __future__ import annotations

from typing import Any

import keras
import keras_hub

from keras_lean._keras_internals import hub_attention_sublayers, mha_projections, replace_sublayer

__all__ = ["PrunedTransformerDecoder", "PrunedTransformerEncoder", "pruned_class_for"]


def _check_head_dim(head_dim: Any, name: str) -> None:
    if head_dim is None:
        return
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(
            f"{name}: head_dim must be a positive integer (each head's width) or None (keras-hub's "
            f"hidden_dim // num_heads). Received: head_dim={head_dim!r}"
        )


def _set_head_dim(block: Any, head_dim: int | None) -> None:
    """Rebuilds each attention sublayer of the built `block` with heads `head_dim` wide."""
    if head_dim is None:
        return
    for attr, old in hub_attention_sublayers(block).items():
        if old.key_dim == head_dim and old.num_heads == block.num_heads:
            continue
        config = old.get_config()
        config.update(num_heads=block.num_heads, key_dim=head_dim, value_dim=head_dim)
        new = type(old).from_config(config)
        parts = mha_projections(old)
        shapes = [(None, None, int(parts[p].kernel.shape[0])) for p in ("query", "value", "key")]
        new.build(*shapes)
        replace_sublayer(block, attr, new)


@keras.saving.register_keras_serializable(package="keras_lean")
class PrunedTransformerEncoder(keras_hub.layers.TransformerEncoder):
    """keras-hub's `TransformerEncoder` whose attention heads are `head_dim` wide.

    Args:
        head_dim: the width of each attention head (None: keras-hub's `hidden_dim // num_heads`).
        *args, **kwargs: those of `keras_hub.layers.TransformerEncoder`.
    """

    def __init__(self, *args, head_dim: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        _check_head_dim(head_dim, self.name)
        self.head_dim = head_dim

    def build(self, inputs_shape):
        super().build(inputs_shape)
        _set_head_dim(self, self.head_dim)

    def get_config(self):
        config = super().get_config()
        config["head_dim"] = self.head_dim
        return config


@keras.saving.register_keras_serializable(package="keras_lean")
class PrunedTransformerDecoder(keras_hub.layers.TransformerDecoder):
    """keras-hub's `TransformerDecoder` whose attention heads (self and cross) are `head_dim` wide.

    Args:
        head_dim: the width of each attention head (None: keras-hub's `hidden_dim // num_heads`).
        *args, **kwargs: those of `keras_hub.layers.TransformerDecoder`.
    """

    def __init__(self, *args, head_dim: int | None = None, **kwargs):
        # keras-hub builds the decoder inside __init__ when it gets its saved build shapes:
        # hold them back until head_dim is known.
        decoder_shape = kwargs.pop("decoder_sequence_shape", None)
        encoder_shape = kwargs.pop("encoder_sequence_shape", None)
        super().__init__(*args, **kwargs)
        _check_head_dim(head_dim, self.name)
        self.head_dim = head_dim
        if decoder_shape:
            self.build(decoder_shape, encoder_shape)

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        super().build(decoder_sequence_shape, encoder_sequence_shape)
        _set_head_dim(self, self.head_dim)

    def get_config(self):
        config = super().get_config()
        config["head_dim"] = self.head_dim
        return config


def pruned_class_for(layer: Any) -> type:
    """The keras_lean class that keeps `layer`'s head width (encoder or decoder)."""
    if isinstance(layer, keras_hub.layers.TransformerDecoder):
        return PrunedTransformerDecoder
    if isinstance(layer, keras_hub.layers.TransformerEncoder):
        return PrunedTransformerEncoder
    raise TypeError(
        f"{layer.name}: expected a keras-hub TransformerEncoder or TransformerDecoder. "
        f"Received: {type(layer).__name__}"
    )
