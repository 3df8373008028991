"""The `PruneLowMagnitude` wrapper layer: masks and pruning step live in the train step.

How pruning works here (and why):

- Each prunable weight of the wrapped layer gets a non-trainable 0/1 mask variable; the wrapper
  owns a non-trainable int64 (int32 under JAX) `pruning_step`, the number of training steps run
  so far.
- `call(..., training=True)` first increments the step (so the first batch runs at step 1,
  exactly as TFMOT's wrapper with its `UpdatePruningStep` callback) and, when the schedule says so
  (`keras.ops.cond`), recomputes the masks. Everything is in-graph, so a plain `model.fit`
  prunes (no callback), also with `jit_compile=True`.
- The forward pass reads `weight * mask` (the inner layer runs in a `keras.StatelessScope` that
  maps each weight to its masked value), so gradients of pruned weights are zero.
- A mask constraint attached to each pruned variable (composed with the user's constraint) is
  applied by the Keras optimizer right after every update, so pruned weights stay exactly zero
  after every step, whatever the optimizer's momentum or weight decay. Movement criteria have
  no constraint: their masks come from learned scores (straight-through estimator, see
  `keras_lean.sparsity.movement`) and pruned weights keep their values so they can regrow.
- Under `tf.distribute.MirroredStrategy` every replica computes the masks from its own (identical,
  mirrored) weights; the step, masks and soft movement's ramp use ONLY_FIRST_REPLICA
  aggregation, and movement scores are ordinary trainable variables (all-reduced gradients), so
  the replicas stay identical and equal to a single-device run.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_lean import _backend
from keras_lean._keras_internals import call_has_training_arg, own_variables
from keras_lean.sparsity import masks as mask_math
from keras_lean.sparsity import movement as movement_lib
from keras_lean.sparsity.registry import (
    PrunableWeight,
    is_prunable,
    prunable_layer_types,
    prunable_weights,
)
from keras_lean.sparsity.schedules import ConstantSparsity, PruningSchedule, as_schedule

__all__ = ["PruneLowMagnitude", "is_prunable", "prunable_weights", "CRITERIA", "POOLING_TYPES"]

CRITERIA = ("magnitude", *movement_lib.MOVEMENT_CRITERIA)
POOLING_TYPES = ("AVG", "MAX")


class _MaskConstraint(keras.constraints.Constraint):
    """`w -> inner(w) * mask`: applied by the Keras optimizer after every update."""

    def __init__(self, mask, inner=None):
        self.mask = mask
        self.inner = inner

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        return w * ops.cast(self.mask, w.dtype)

    def get_config(self):
        # Variable constraints are not serialized; the layer's own constraint config is.
        return {}


def _check_pair(name: str, value, positive: bool = True) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a tuple of two integers. Received: {name}={value!r}")
    if positive and min(pair) <= 0:
        raise ValueError(f"{name} must have positive entries. Received: {name}={value!r}")
    return pair


@keras.saving.register_keras_serializable(package="keras_lean")
class PruneLowMagnitude(keras.layers.Wrapper):
    """Wraps a Keras 3 layer and prunes its weights during training.

    Args:
        layer: the layer to prune (see `prunable_weights` for the supported types).
        pruning_schedule: a keras_lean or TFMOT `PruningSchedule`, or a dict config. None gives
            TFMOT's default, `ConstantSparsity(0.5, begin_step=0, frequency=100)`, unless
            `update_masks=False` (fixed masks, no schedule).
        block_size: (height, width) of the blocks pruned together; not (1, 1) only for layers
            whose pruned weights are 2-D (Dense, Embedding, 2-D EinsumDense).
        block_pooling_type: "AVG" or "MAX", how a block's weights are scored.
        sparsity_m_by_n: (m, n): m zeros in every n consecutive weights along the input axis.
            The mask is recomputed whenever the schedule says to prune; its sparsity is ignored.
        criterion: "magnitude" (|w|), or learned movement scores trained through a
            straight-through estimator (see `keras_lean.sparsity.movement`): "movement" (hard,
            TopK of the scores) or "soft_movement" (`sigmoid(S) > tau`, L1 penalty).
            With movement, pruned weights keep their values and can regrow.
        update_masks: False freezes the masks (set them with `set_masks`); the step still counts.
        score_lr_multiplier: movement criteria: the scores learn at this multiple of the
            optimizer's learning rate.
        threshold: "soft_movement": None (default): each pruned tensor keeps exactly the
            schedule's fraction (tau is the `s_t`-quantile of `sigmoid(S)` at every pruning
            step); a number in (0, 1): the paper's fixed threshold, keep `sigmoid(S) >
            threshold` (ramped along the schedule), and the sparsity is what it and the L1
            penalty give.
        l1_coefficient: "soft_movement": weight of the L1 penalty on `sigmoid(S)`, >= 0.
        score_init: movement criteria: "magnitude" (scores start at `|W| / mean|W|`) or
            "zeros" (the paper's). For these four, None is the criterion's documented
            default (`keras_lean.sparsity.movement.DEFAULTS`).
        **kwargs: base layer arguments (name, ...).

    Example:

    >>> layer = PruneLowMagnitude(keras.layers.Dense(4), ConstantSparsity(0.5, frequency=1))
    """

    def __init__(
        self,
        layer,
        pruning_schedule=None,
        block_size=(1, 1),
        block_pooling_type="AVG",
        sparsity_m_by_n=None,
        criterion="magnitude",
        update_masks=True,
        score_lr_multiplier=None,
        threshold=None,
        l1_coefficient=None,
        score_init=None,
        **kwargs,
    ):
        if isinstance(layer, PruneLowMagnitude):
            raise ValueError(
                f"Layer {layer.name!r} is already wrapped in PruneLowMagnitude; wrap each layer "
                "once (strip_pruning removes wrappers)."
            )
        if not is_prunable(layer):
            raise ValueError(
                f"Layer {layer.name!r} of type {type(layer).__name__} cannot be pruned. "
                f"Prunable types: {', '.join(prunable_layer_types())}, or any layer with a "
                "get_prunable_weights() method (keras_lean.sparsity.PrunableLayer)."
            )
        kwargs.setdefault("name", f"prune_low_magnitude_{layer.name}")
        super().__init__(layer, **kwargs)
        if pruning_schedule is None and update_masks:
            # TFMOT's default schedule.
            pruning_schedule = ConstantSparsity(0.5, begin_step=0, frequency=100)
        self.pruning_schedule: PruningSchedule | None = (
            None if pruning_schedule is None else as_schedule(pruning_schedule)
        )
        self.block_size = _check_pair("block_size", block_size)
        if block_pooling_type not in POOLING_TYPES:
            raise ValueError(
                "block_pooling_type must be one of 'AVG', 'MAX'. "
                f"Received: block_pooling_type={block_pooling_type!r}"
            )
        self.block_pooling_type = block_pooling_type
        self.sparsity_m_by_n = _check_pair("sparsity_m_by_n", sparsity_m_by_n, positive=False)
        if self.sparsity_m_by_n is not None:
            m, n = self.sparsity_m_by_n
            if m <= 0 or n <= 0 or m >= n:
                raise ValueError(
                    "sparsity_m_by_n (m, n) needs 0 < m < n (m zeros in every n weights). "
                    f"Received: sparsity_m_by_n={sparsity_m_by_n!r}"
                )
            if self.block_size != (1, 1):
                raise ValueError(
                    "sparsity_m_by_n and block_size cannot be combined; use one. Received: "
                    f"sparsity_m_by_n={sparsity_m_by_n!r}, block_size={block_size!r}"
                )
        if criterion not in CRITERIA:
            raise ValueError(
                f"criterion must be one of {', '.join(map(repr, CRITERIA))}. "
                f"Received: criterion={criterion!r}"
            )
        self.criterion = criterion
        self.movement = movement_lib.MovementSettings.resolve(
            criterion,
            score_lr_multiplier=score_lr_multiplier,
            threshold=threshold,
            l1_coefficient=l1_coefficient,
            score_init=score_init,
        )
        self._soft_final = movement_lib.soft_final_sparsity(
            self.movement, self.pruning_schedule, self.sparsity_m_by_n, self.block_size
        )
        self.score_lr_multiplier = score_lr_multiplier
        self.threshold = threshold
        self.l1_coefficient = l1_coefficient
        self.score_init = score_init
        self.update_masks = bool(update_masks)
        self._pruned: list[PrunableWeight] = []
        self._masks: list[keras.Variable] = []
        self._scores: list[keras.Variable] = []
        self._movement_ramp: keras.Variable | None = None
        if layer.built:
            self._check_fits(prunable_weights(layer))

    # ----------------------------------------------------------------------------- build
    def _check_fits(self, weights: list[PrunableWeight]) -> None:
        if self.block_size != (1, 1):
            for w in weights:
                shape = tuple(w.variable.shape)
                if len(shape) != 2:
                    raise ValueError(
                        f"block_size {self.block_size} needs 2-D weights, but layer "
                        f"{self.layer.name!r} has {w.name} of shape {shape}. Use "
                        "block_size=(1, 1) for this layer."
                    )
                if self.block_size[0] > shape[0] or self.block_size[1] > shape[1]:
                    raise ValueError(
                        f"block_size {self.block_size} does not fit {w.name} of shape {shape} "
                        f"in layer {self.layer.name!r}: each block dimension must be <= the "
                        "weight's."
                    )

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        weights = prunable_weights(self.layer)
        self._check_fits(weights)
        self._pruned = weights
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            dtype=_backend.step_dtype(),  # int64 (TFMOT's); int32 under JAX
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        self._masks = []
        # Under JAX the optimizer (which applies the mask constraint) sees only trainable
        # variables: masks ride the gradient there (see keras_lean._backend).
        ride = self.movement is None and _backend.masks_ride_gradients()
        for w in weights:
            safe = w.name.replace("/", "_")
            mask = self.add_weight(
                name=f"mask_{safe}",
                shape=w.variable.shape,
                dtype=w.variable.dtype,
                initializer="ones",
                trainable=ride,
                aggregation="only_first_replica",
            )
            if ride:
                mask.overwrite_with_gradient = True
            self._masks.append(mask)
            if self.movement is None:
                # Movement keeps pruned weights' dense values (they can regrow).
                w.variable.constraint = _MaskConstraint(mask, w.variable.constraint)
        if self.movement is not None:
            self._scores, self._movement_ramp = movement_lib.add_score_variables(self, weights)
        self.built = True

    def get_build_config(self):
        return {"built": True} if self.built else None

    def build_from_config(self, config):
        if config and not self.built:
            self.build(None)

    def _file_order(self) -> list:
        """Own variables in the order a .keras file holds them: TensorFlow's (trainable, then
        non-trainable), also under JAX where masks are trainable, so files load across backends."""
        masks = {id(m) for m in self._masks}
        own = [v for v in own_variables(self) if id(v) not in masks]
        trainable = [v for v in own if v.trainable]
        rest = [v for v in own if not v.trainable]  # rest[0] is pruning_step
        if not self._masks or not self._masks[0].trainable:
            return own_variables(self)
        return trainable + rest[:1] + list(self._masks) + rest[1:]

    def save_own_variables(self, store):
        for i, v in enumerate(self._file_order()):
            store[f"{i}"] = v

    def load_own_variables(self, store):
        order = self._file_order()
        if len(store.keys()) != len(order):
            raise ValueError(
                f"Layer {self.name!r} expected {len(order)} variables, but the file holds "
                f"{len(store.keys())}. Expected: {[v.name for v in order]}"
            )
        for i, v in enumerate(order):
            v.assign(store[f"{i}"])

    # ----------------------------------------------------------------------------- masks
    @property
    def pruned_weights(self) -> list[PrunableWeight]:
        """The pruned weights of the inner layer, in mask order."""
        return list(self._pruned)

    @property
    def mask_variables(self) -> list[keras.Variable]:
        return list(self._masks)

    @property
    def score_variables(self) -> list[keras.Variable]:
        """Movement score variables (empty for magnitude); the scores are
        `score_lr_multiplier` times their values (see `movement.movement_scores`)."""
        return list(self._scores)

    def _mask_for(self, index: int, sparsity, threshold=None):
        w = self._pruned[index]
        movement = self.movement is not None
        if movement:
            scores = self._scores[index].value * self.movement.score_lr_multiplier
            if threshold is not None:  # soft movement, fixed threshold
                return movement_lib.soft_mask(scores, threshold)
            # else TopK: hard movement, or soft movement whose tau keeps the schedule's fraction
        else:
            scores = ops.abs(ops.cast(w.variable.value, "float32"))
        if self.sparsity_m_by_n is not None:
            m, n = self.sparsity_m_by_n
            if movement:  # rank within each group; shift so padding (-1) never wins
                scores = scores - ops.min(scores) + 1.0
            return mask_math.m_by_n_mask(scores, m, n, w.input_axis)
        mask_fn = mask_math.topk_mask if movement else mask_math.threshold_mask
        if self.block_size != (1, 1):
            if movement:
                scores = scores - ops.min(scores)
            return mask_math.block_mask(
                scores, sparsity, self.block_size, self.block_pooling_type, mask_fn
            )
        return mask_fn(scores, sparsity)

    def _train_update(self):
        step = self.pruning_step.value + 1
        self.pruning_step.assign(step)
        if not self.update_masks or self.pruning_schedule is None:
            return
        should_prune, sparsity = self.pruning_schedule(step)
        # Soft movement also updates its ramp (threshold and L1 weight) at pruning steps.
        state = self._masks + ([self._movement_ramp] if self._movement_ramp is not None else [])

        def recompute():
            threshold, extra = None, []
            if self._movement_ramp is not None:
                ramp = movement_lib.ramp_value(sparsity, self._soft_final)
                # (the variable's dtype: mixed precision reads it as float16 in `keep`)
                extra = [ops.cast(ramp, self._movement_ramp.dtype)]
                if not self.movement.follows_schedule:  # a fixed threshold, ramped
                    threshold = self.movement.threshold * ramp
            masks = [
                ops.cast(self._mask_for(i, sparsity, threshold), m.dtype)
                for i, m in enumerate(self._masks)
            ]
            return masks + extra

        def keep():
            return [ops.convert_to_tensor(v.value) for v in state]

        # The new values are computed in the cond and assigned outside it: assignments to
        # distributed variables need the replica context, which a cond branch does not give.
        new_values = ops.cond(should_prune, recompute, keep)
        for variable, value in zip(state, new_values, strict=True):
            variable.assign(value)

    # ----------------------------------------------------------------------------- call
    def call(self, inputs, *args, training=None, **kwargs):
        ride = training and self.built and self._masks and self._masks[0].trainable
        before = [m.value for m in self._masks] if ride else None
        if training and self.built:
            self._train_update()
        if self.movement is None:
            masks = [m.value for m in self._masks]
            if ride:  # the new masks reach the optimizer as the masks' gradients
                masks = [_backend.carry_mask(b, m) for b, m in zip(before, masks, strict=True)]
            mapping = [
                (w.variable, w.variable.value * ops.cast(m, w.variable.dtype))
                for w, m in zip(self._pruned, masks, strict=True)
            ]
        else:  # straight-through: the score gets the gradient the mask would have
            mapping = [
                (w.variable, movement_lib.straight_through(w.variable.value, m.value, s.value))
                for w, m, s in zip(self._pruned, self._masks, self._scores, strict=True)
            ]
            if training and self._movement_ramp is not None:
                self.add_loss(movement_lib.l1_penalty(self))
        if call_has_training_arg(self.layer):
            kwargs["training"] = training
        masked = {id(w.variable) for w in self._pruned}
        if _backend.is_jax():
            # JAX's train step is itself a StatelessScope, which this nested one hides: pass
            # on the current values of the inner layer's other variables.
            mapping += [(v, v.value) for v in self.layer.variables if id(v) not in masked]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            given = {id(v): scope.get_current_value(v) for v in self.layer.variables}
            outputs = self.layer(inputs, *args, **kwargs)
        # Carry over what the inner layer updated (e.g. dropout seed state) and its losses.
        for v in self.layer.variables:
            if id(v) in masked:
                continue
            new = scope.get_current_value(v)
            if new is not None and new is not given[id(v)]:
                v.assign(new)
        for loss in scope.losses:
            self.add_loss(loss)
        return outputs

    def compute_output_shape(self, *args, **kwargs):
        return self.layer.compute_output_shape(*args, **kwargs)

    def compute_output_spec(self, *args, **kwargs):
        kwargs.pop("training", None)
        return self.layer.compute_output_spec(*args, **kwargs)

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pruning_schedule": None
                if self.pruning_schedule is None
                else keras.saving.serialize_keras_object(self.pruning_schedule),
                "block_size": self.block_size,
                "block_pooling_type": self.block_pooling_type,
                "sparsity_m_by_n": self.sparsity_m_by_n,
                "criterion": self.criterion,
                "update_masks": self.update_masks,
                "score_lr_multiplier": self.score_lr_multiplier,
                "threshold": self.threshold,
                "l1_coefficient": self.l1_coefficient,
                "score_init": self.score_init,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        schedule = config.get("pruning_schedule")
        if isinstance(schedule, dict):
            config["pruning_schedule"] = keras.saving.deserialize_keras_object(
                schedule, custom_objects=custom_objects
            )
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        return cls(layer, **config)
