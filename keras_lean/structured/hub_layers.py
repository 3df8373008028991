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

Gradual structured pruning replaces a block by `MaskedTransformerEncoder` / `...Decoder`: the same
block, with two sublayers swapped for masked twins once it is built. `HeadMaskedProjection` (the
attention output projection) zeroes whole heads of its input, which is exactly what removing the
heads computes; `UnitMaskedDense` (the feed-forward intermediate Dense) zeroes whole neurons of its
output. Their masks follow the schedule inside the train step like every `masks.py` mask, and
`api.shrink` turns the block back into the plain (or `Pruned*`) one without the switched-off units.
"""

from __future__ import annotations

from typing import Any

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_lean._keras_internals import (
    HUB_FFN_INTERMEDIATE_ATTR,
    MHA_OUTPUT_ATTR,
    hub_attention_sublayers,
    mha_projections,
    replace_sublayer,
)
from keras_lean.structured.masks import ChannelMask, MaskedBlock

__all__ = [
    "HeadMaskedProjection",
    "MaskedTransformerDecoder",
    "MaskedTransformerEncoder",
    "PrunedTransformerDecoder",
    "PrunedTransformerEncoder",
    "UnitMaskedDense",
    "masked_block",
    "pruned_class_for",
]


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


# -- gradual masks -------------------------------------------------------------------------------

#: The config entries a masked block adds to its plain block's.
_MASK_KEYS = ("head_mask", "inner_mask", "pruning_schedule")
_GROUP_KEYS = ("ranks", "sizes", "scales", "round_to", "min_channels")


class _UnitMasked:
    """A layer holding one group mask in a `masks.ChannelMask` child (`unit_mask`), so its own
    variables (and its base class's saving of them) stay those of the plain layer. Listed first
    among the bases, so `super()` here is the Keras layer."""

    def __init__(
        self, ranks, sizes, scales, pruning_schedule, round_to=1, min_channels=1, **kwargs
    ):
        super().__init__(**kwargs)
        self.unit_mask = ChannelMask(
            ranks, sizes, scales, pruning_schedule, round_to, min_channels, name="unit_mask"
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.unit_mask.build((None, len(self.unit_mask.ranks)))

    def _mask(self, training, dtype):
        if training:
            self.unit_mask._update_mask()
        return ops.cast(self.unit_mask.mask, dtype)

    def get_config(self):
        return {**super().get_config(), **self.unit_mask._mask_config()}


@keras.saving.register_keras_serializable(package="keras_lean")
class HeadMaskedProjection(_UnitMasked, keras.layers.EinsumDense):
    """An attention output projection that zeroes whole heads of its input first.

    Its input is `[batch, tokens..., heads, head_dim]`; a masked head contributes nothing to the
    output, as if its query/key/value slices and output rows were gone.

    Args:
        ranks, sizes, scales, pruning_schedule, round_to, min_channels: as for
            `masks.ChannelMask`, one entry per head.
        **kwargs: `EinsumDense` arguments.
    """

    def call(self, inputs, training=None):
        mask = ops.reshape(self._mask(training, inputs.dtype), (-1, 1))
        return super().call(inputs * mask, training=training)


@keras.saving.register_keras_serializable(package="keras_lean")
class UnitMaskedDense(_UnitMasked, keras.layers.Dense):
    """A `Dense` whose output units are switched off whole (exact zeros) by a group mask.

    Args:
        ranks, sizes, scales, pruning_schedule, round_to, min_channels: as for
            `masks.ChannelMask`, one entry per unit.
        **kwargs: `Dense` arguments.
    """

    def call(self, inputs, training=None):
        outputs = super().call(inputs, training=training)
        return outputs * self._mask(training, outputs.dtype)


def _check_group(block: Any, key: str, group: Any, size: int) -> dict | None:
    if group is None:
        return None
    if not isinstance(group, dict) or set(group) - set(_GROUP_KEYS) or "ranks" not in group:
        raise ValueError(
            f"{block.name}: {key} must be None or a dict with keys {', '.join(_GROUP_KEYS)}. "
            f"Received: {key}={group!r}"
        )
    if len(group["ranks"]) != size:
        raise ValueError(
            f"{block.name}: {key} has {len(group['ranks'])} ranks for {size} units (num_heads for "
            "head_mask, intermediate_dim for inner_mask)."
        )
    return dict(group)


class _MaskedBlockMixin(MaskedBlock):
    """What the masked encoder and decoder share: mask config, sublayer swap, `shrink` hooks."""

    _plain_hub: str  # the keras-hub class name of the plain block
    _plain_pruned: type  # the `Pruned*` class of the plain block with its own head width

    def _init_block_masks(self, head_mask, inner_mask, pruning_schedule):
        from keras_lean.sparsity.schedules import as_schedule

        if head_mask is None and inner_mask is None:
            raise ValueError(f"{self.name}: a masked block needs head_mask or inner_mask.")
        self.head_mask = _check_group(self, "head_mask", head_mask, int(self.num_heads))
        self.inner_mask = _check_group(self, "inner_mask", inner_mask, int(self.intermediate_dim))
        self.pruning_schedule = as_schedule(pruning_schedule)

    def _swap_in_masks(self):
        """Replaces the built sublayers by their masked twins (same names, so same weight paths)."""
        schedule = self.pruning_schedule
        if self.inner_mask is not None:
            old = getattr(self, HUB_FFN_INTERMEDIATE_ATTR)
            new = UnitMaskedDense(**self.inner_mask, pruning_schedule=schedule, **old.get_config())
            new.build((None, int(old.kernel.shape[0])))
            replace_sublayer(self, HUB_FFN_INTERMEDIATE_ATTR, new)
        if self.head_mask is None:
            return
        for mha in hub_attention_sublayers(self).values():
            old = getattr(mha, MHA_OUTPUT_ATTR)
            new = HeadMaskedProjection(
                **self.head_mask, pruning_schedule=schedule, **old.get_config()
            )
            with keras.name_scope(mha.name):  # the weights' paths stay those of the plain block
                new.build((None, None) + tuple(int(d) for d in old.kernel.shape[:2]))
            replace_sublayer(mha, MHA_OUTPUT_ATTR, new)

    def get_config(self):  # the mixin comes first among the bases: `super()` is the block
        return {
            **super().get_config(),
            "head_mask": None if self.head_mask is None else dict(self.head_mask),
            "inner_mask": None if self.inner_mask is None else dict(self.inner_mask),
            "pruning_schedule": keras.saving.serialize_keras_object(self.pruning_schedule),
        }

    def unit_masks(self) -> dict[str, np.ndarray | None]:
        """The current 0/1 masks of the heads and feed-forward neurons (None: not masked)."""
        heads = inner = None
        if self.inner_mask is not None:
            inner = np.asarray(getattr(self, HUB_FFN_INTERMEDIATE_ATTR).unit_mask.mask.numpy())
        if self.head_mask is not None:
            masks = [
                np.asarray(getattr(mha, MHA_OUTPUT_ATTR).unit_mask.mask.numpy())
                for mha in hub_attention_sublayers(self).values()
            ]
            if any(not np.array_equal(m, masks[0]) for m in masks[1:]):
                raise ValueError(f"{self.name}: self and cross attention masks disagree.")
            heads = masks[0]
        return {"heads": heads, "inner": inner}

    def unmasked(self) -> Any:
        """A plain block of the same configuration (keras-hub's own class unless `head_dim` is
        set), unbuilt, without masks."""
        config = self.get_config()
        for key in _MASK_KEYS:
            config.pop(key)
        for key in ("decoder_sequence_shape", "encoder_sequence_shape"):
            config.pop(key, None)  # built when called, like every replayed layer
        if config.get("head_dim") is None:
            config.pop("head_dim", None)
            return getattr(keras_hub.layers, self._plain_hub).from_config(config)
        return self._plain_pruned.from_config(config)


@keras.saving.register_keras_serializable(package="keras_lean")
class MaskedTransformerEncoder(_MaskedBlockMixin, PrunedTransformerEncoder):
    """A keras-hub `TransformerEncoder` whose heads and feed-forward neurons are switched off
    whole by schedule-driven masks during training (gradual structured pruning).

    Args:
        head_mask: None, or the heads' mask arguments (`ranks`, `sizes`, `scales`, `round_to`,
            `min_channels`: as for `masks.ChannelMask`, one entry per head).
        inner_mask: None, or the feed-forward neurons' mask arguments (one entry per neuron).
        pruning_schedule: as for `masks.ChannelMask`.
        *args, **kwargs: those of `PrunedTransformerEncoder` (`head_dim`, keras-hub's arguments).
    """

    _plain_hub = "TransformerEncoder"
    _plain_pruned = PrunedTransformerEncoder

    def __init__(self, *args, head_mask=None, inner_mask=None, pruning_schedule=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_block_masks(head_mask, inner_mask, pruning_schedule)

    def build(self, inputs_shape):
        super().build(inputs_shape)
        self._swap_in_masks()


@keras.saving.register_keras_serializable(package="keras_lean")
class MaskedTransformerDecoder(_MaskedBlockMixin, PrunedTransformerDecoder):
    """A keras-hub `TransformerDecoder` whose heads (self and cross attention together) and
    feed-forward neurons are switched off whole by schedule-driven masks during training.

    Args:
        head_mask, inner_mask, pruning_schedule: as for `MaskedTransformerEncoder`.
        *args, **kwargs: those of `PrunedTransformerDecoder`.
    """

    _plain_hub = "TransformerDecoder"
    _plain_pruned = PrunedTransformerDecoder

    def __init__(self, *args, head_mask=None, inner_mask=None, pruning_schedule=None, **kwargs):
        decoder_shape = kwargs.pop("decoder_sequence_shape", None)  # build once masks are known
        encoder_shape = kwargs.pop("encoder_sequence_shape", None)
        super().__init__(*args, **kwargs)
        self._init_block_masks(head_mask, inner_mask, pruning_schedule)
        if decoder_shape:
            self.build(decoder_shape, encoder_shape)

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        super().build(decoder_sequence_shape, encoder_sequence_shape)
        self._swap_in_masks()


def masked_block(layer: Any, head_mask: dict | None, inner_mask: dict | None, schedule: Any):
    """A new, unbuilt masked twin of the keras-hub (or `Pruned*`) block `layer`.

    Args:
        layer: a keras-hub `TransformerEncoder` / `TransformerDecoder` or a `Pruned*` block.
        head_mask: the heads' mask arguments, or None to keep every head.
        inner_mask: the feed-forward neurons' mask arguments, or None to keep them all.
        schedule: the pruning schedule both masks follow.
    """
    config = layer.get_config()
    config.pop("decoder_sequence_shape", None)
    config.pop("encoder_sequence_shape", None)
    masked = (
        MaskedTransformerDecoder
        if isinstance(layer, keras_hub.layers.TransformerDecoder)
        else MaskedTransformerEncoder
    )
    return masked(head_mask=head_mask, inner_mask=inner_mask, pruning_schedule=schedule, **config)
