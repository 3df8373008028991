"""Group masks for gradual structured pruning, updated inside the compiled train step.

How coupled channels stay in lockstep without any layer talking to another: before fine-tuning,
every unit (channel or head) gets its *rank* inside its group (0 = most important, by the chosen
importance; blocked units rank first). At each pruning step the schedule gives a sparsity `s`;
every mask layer computes, from the same numbers, how many units of the group survive
(`keep_count`) and keeps the units whose rank is below it. Every position of every tensor that
carries a unit holds that unit's rank and group size, so all of them switch off together, in the
same step, with no shared state. The ranking is fixed when pruning starts (the importance of the
trained model); the schedule only decides how many units go.

- `ChannelMask` multiplies a tensor's channels by the mask; the gradual model has one after every
  layer that could make a masked channel non-zero (producers, normalizations, ...), so every
  consumer sees exact zeros and the masked model computes what the shrunk model will.
- `MaskedMultiHeadAttention` is a `MultiHeadAttention` that zeroes whole heads' outputs before the
  output projection (removing a head's contribution exactly).

Both keep TFMOT's step semantics: a step counter starting at 0 advances once per training call, and
masks change only where the schedule's `should_prune` is true.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_lean import _backend

__all__ = [
    "ChannelMask",
    "MaskedBlock",
    "MaskedLayerNormalization",
    "MaskedMultiHeadAttention",
    "keep_count",
]

# Tolerance for `floor(size * sparsity)`, so float32 rounding (in-graph) and float64 (numpy) agree.
_EPS = 1e-4


def keep_count(size: int, sparsity: float, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of `size` units survive at `sparsity` (the same rule as the in-graph masks).

    `size - floor(size * sparsity)`, rounded up to a multiple of `round_to` (capped at `size`),
    and at least `min(min_channels, size)`.
    """
    pruned = int(np.floor(np.float32(size) * np.float32(sparsity) + np.float32(_EPS)))
    keep = size - pruned
    keep = min(-(-keep // round_to) * round_to, size)
    return max(keep, min(min_channels, size))


def _keep_count_ops(sizes, sparsity, round_to: int, min_channels: int):
    sizes = ops.cast(sizes, "float32")
    pruned = ops.floor(sizes * sparsity + _EPS)
    keep = sizes - pruned
    keep = ops.minimum(ops.ceil(keep / float(round_to)) * float(round_to), sizes)
    return ops.maximum(keep, ops.minimum(float(min_channels), sizes))


def _as_schedule(schedule: Any) -> Any:
    from keras_lean.sparsity.schedules import as_schedule

    return as_schedule(schedule)


def _check_int_list(name: str, values: Any) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a list of integers. Received: {name}={values!r}"
        ) from None
    return out


class MaskedBlock:
    """A layer that masks unit groups *inside* itself (a keras-hub transformer block's heads and
    feed-forward neurons, `hub_layers.MaskedTransformerEncoder`), as `shrink` sees it.

    Subclasses implement `unit_masks()`: per inner group the graph knows (`"heads"`, `"inner"`),
    its current 0/1 mask, or None for a group left unmasked; and `unmasked()`: a new, unbuilt
    plain layer of the same configuration without masks (weights are copied by path).
    """

    def unit_masks(self) -> dict[str, np.ndarray | None]:
        raise NotImplementedError

    def unmasked(self) -> Any:
        raise NotImplementedError


class _GroupMaskMixin:
    """Shared mask bookkeeping of the two mask layers (ranks, group sizes, scales, schedule)."""

    def _init_masks(self, ranks, sizes, scales, pruning_schedule, round_to, min_channels):
        self.ranks = _check_int_list("ranks", ranks)
        self.sizes = _check_int_list("sizes", sizes)
        self.scales = [float(s) for s in scales]
        if not (len(self.ranks) == len(self.sizes) == len(self.scales)):
            raise ValueError(
                "ranks, sizes and scales must have one entry per channel. Received lengths "
                f"{len(self.ranks)}, {len(self.sizes)}, {len(self.scales)}"
            )
        if isinstance(round_to, bool) or int(round_to) < 1:
            raise ValueError(f"round_to must be an integer >= 1. Received: round_to={round_to!r}")
        if isinstance(min_channels, bool) or int(min_channels) < 0:
            raise ValueError(
                f"min_channels must be an integer >= 0. Received: min_channels={min_channels!r}"
            )
        self.round_to = int(round_to)
        self.min_channels = int(min_channels)
        self.pruning_schedule = _as_schedule(pruning_schedule)

    def _build_masks(self):
        n = len(self.ranks)
        self.mask = self.add_weight(
            name="mask", shape=(n,), initializer="ones", trainable=False, dtype="float32"
        )
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype=_backend.step_dtype(),  # int64; int32 under JAX (no int64 without x64)
        )

    def _update_mask(self):
        should_prune, sparsity = self.pruning_schedule(self.pruning_step.value)
        sparsity = ops.cast(sparsity, "float32") * ops.convert_to_tensor(self.scales, "float32")
        keep = _keep_count_ops(
            ops.convert_to_tensor(self.sizes, "float32"), sparsity, self.round_to, self.min_channels
        )
        ranks = ops.convert_to_tensor(self.ranks, "float32")
        new_mask = ops.cast(ops.less(ranks, keep), "float32")
        self.mask.assign(ops.where(should_prune, new_mask, self.mask.value))
        self.pruning_step.assign_add(ops.cast(1, self.pruning_step.dtype))

    def _mask_config(self) -> dict:
        return {
            "ranks": list(self.ranks),
            "sizes": list(self.sizes),
            "scales": list(self.scales),
            "pruning_schedule": keras.saving.serialize_keras_object(self.pruning_schedule),
            "round_to": self.round_to,
            "min_channels": self.min_channels,
        }

    def get_config(self):
        return {**super().get_config(), **self._mask_config()}

    def plain_config(self) -> dict:
        """The config of the equivalent plain Keras layer (the base class), masks dropped."""
        config = self.get_config()
        for key in self._mask_config():
            config.pop(key)
        return config


@keras.saving.register_keras_serializable(package="keras_lean")
class ChannelMask(_GroupMaskMixin, keras.layers.Layer):
    """Multiplies the channels (last axis) of its input by a group mask driven by a schedule.

    Args:
        ranks: per channel, the rank of its unit inside its group (0 = most important).
        sizes: per channel, the number of units of its group.
        scales: per channel, a factor on the schedule's sparsity for its group (1.0 for a
            per-layer ratio; a group's share under global ranking; 0.0 never prunes).
        pruning_schedule: a keras_lean schedule (or anything `keras_lean.sparsity.schedules.
            as_schedule` accepts): `schedule(step) -> (should_prune, sparsity)`.
        round_to: surviving units per group are a multiple of this (capped at the group size).
        min_channels: at least this many units of each group survive.
        **kwargs: base layer arguments (`name`, `dtype`, ...).
    """

    def __init__(
        self, ranks, sizes, scales, pruning_schedule, round_to=1, min_channels=1, **kwargs
    ):
        super().__init__(**kwargs)
        self._init_masks(ranks, sizes, scales, pruning_schedule, round_to, min_channels)

    def build(self, input_shape):
        if input_shape[-1] is not None and int(input_shape[-1]) != len(self.ranks):
            raise ValueError(
                f"ChannelMask {self.name!r} has {len(self.ranks)} channels but its input has "
                f"{input_shape[-1]}."
            )
        self._build_masks()

    def call(self, inputs, training=None):
        if training:
            self._update_mask()
        return inputs * ops.cast(self.mask, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="keras_lean")
class MaskedMultiHeadAttention(_GroupMaskMixin, keras.layers.MultiHeadAttention):
    """A `MultiHeadAttention` whose heads are switched off whole by a schedule-driven mask.

    A masked head's attention output is zeroed before the output projection, which is exactly
    what removing the head (its query/key/value slices and output-projection rows) computes.

    Args:
        ranks: per head, its rank (0 = most important).
        sizes: per head, the number of heads (the group size).
        scales: per head, a factor on the schedule's sparsity.
        pruning_schedule: as for `ChannelMask`.
        round_to: surviving heads are a multiple of this.
        min_channels: at least this many heads survive.
        **kwargs: `MultiHeadAttention` arguments (`num_heads`, `key_dim`, ...).
    """

    def __init__(
        self, ranks, sizes, scales, pruning_schedule, round_to=1, min_channels=1, **kwargs
    ):
        super().__init__(**kwargs)
        self._init_masks(ranks, sizes, scales, pruning_schedule, round_to, min_channels)
        if len(self.ranks) != self.num_heads:
            raise ValueError(
                f"ranks must have one entry per head ({self.num_heads}). Received "
                f"{len(self.ranks)} entries"
            )

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        self._build_masks()

    def call(self, query, value, key=None, training=None, **kwargs):
        if training:
            self._update_mask()
        return super().call(query, value, key=key, training=training, **kwargs)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None, *a, **kw):
        output, scores = super()._compute_attention(
            query, key, value, attention_mask, training, *a, **kw
        )
        # output: [batch, target..., heads, value_dim]
        return output * ops.cast(ops.reshape(self.mask, (-1, 1)), output.dtype), scores


@keras.saving.register_keras_serializable(package="keras_lean")
class MaskedLayerNormalization(_GroupMaskMixin, keras.layers.LayerNormalization):
    """A last-axis `LayerNormalization` whose statistics skip the masked channels.

    LayerNormalization mixes channels through its mean and variance; computing them over the
    surviving channels only is what the shrunk model (which no longer has the masked ones)
    computes, so `shrink` stays exact through it.

    Args:
        ranks, sizes, scales, pruning_schedule, round_to, min_channels: as for `ChannelMask`, per
            input channel.
        **kwargs: `LayerNormalization` arguments (`axis` must be -1).
    """

    def __init__(
        self, ranks, sizes, scales, pruning_schedule, round_to=1, min_channels=1, **kwargs
    ):
        super().__init__(**kwargs)
        self._init_masks(ranks, sizes, scales, pruning_schedule, round_to, min_channels)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_masks()

    def call(self, inputs, training=None):
        if training:
            self._update_mask()
        x = ops.cast(inputs, "float32")
        m = ops.cast(self.mask, "float32")
        n = ops.maximum(ops.sum(m), 1.0)
        if self.rms_scaling:
            var = ops.sum(ops.square(x) * m, axis=-1, keepdims=True) / n
            y = x * ops.rsqrt(var + self.epsilon) * ops.cast(self.gamma, "float32")
        else:
            mean = ops.sum(x * m, axis=-1, keepdims=True) / n
            var = ops.sum(ops.square(x - mean) * m, axis=-1, keepdims=True) / n
            y = (x - mean) * ops.rsqrt(var + self.epsilon)
            if self.scale:
                y = y * ops.cast(self.gamma, "float32")
            if self.center:
                y = y + ops.cast(self.beta, "float32")
        return ops.cast(y, inputs.dtype)
