"""The `PruneLowMagnitude` wrapper layer: masks and pruning step live in the train step.

How pruning works here (and why):

- Each prunable weight of the wrapped layer gets a non-trainable 0/1 mask variable; the wrapper
  owns a non-trainable int64 `pruning_step`, the number of training steps run so far.
- `call(..., training=True)` first increments the step (so the first batch runs at step 1,
  exactly as TFMOT's wrapper with its `UpdatePruningStep` callback) and, when the schedule says so
  (`keras.ops.cond`), recomputes the masks. Everything is in-graph, so a plain `model.fit`
  prunes (no callback), also with `jit_compile=True`.
- The forward pass reads `weight * mask` (the inner layer runs in a `keras.StatelessScope` that
  maps each weight to its masked value), so gradients of pruned weights are zero.
- A mask constraint attached to each pruned variable (composed with the user's constraint) is
  applied by the Keras optimizer right after every update, so pruned weights stay exactly zero
  after every step, whatever the optimizer's momentum or weight decay.
- Under `tf.distribute.MirroredStrategy` every replica computes the masks from its own (identical,
  mirrored) weights; the step, masks and movement state use ONLY_FIRST_REPLICA aggregation, so
  the replicas stay identical and equal to a single-device run.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import ops

from keras_lean.sparsity import masks as mask_math
from keras_lean.sparsity.schedules import ConstantSparsity, PruningSchedule, as_schedule

__all__ = ["PruneLowMagnitude", "is_prunable", "prunable_weights", "CRITERIA", "POOLING_TYPES"]

CRITERIA = ("magnitude", "movement")
POOLING_TYPES = ("AVG", "MAX")
_TRANSPOSE_CONVS = tuple(
    getattr(keras.layers, n)
    for n in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
    if hasattr(keras.layers, n)
)


@dataclass(frozen=True)
class PrunableWeight:
    """One weight of a layer that can be pruned.

    Attributes:
        name: stable key inside the layer ("kernel", "query/kernel", ...).
        variable: the Keras variable.
        input_axis: the weight's input (reduction) axis, along which N:M groups run.
    """

    name: str
    variable: keras.Variable
    input_axis: int


def _einsum_input_axis(equation: str, kernel_rank: int) -> int:
    try:
        lhs, out = equation.split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return 0
    contracted = [i for i, c in enumerate(ker) if c in inp and c not in out]
    if not contracted or len(ker) != kernel_rank:
        return 0
    return contracted[-1]


def _kernel_var(layer, attr="kernel"):
    # Dense/EinsumDense/Embedding expose `kernel` as a property (LoRA adds to it); prune the
    # underlying variable.
    var = getattr(layer, f"_{attr}", None)
    return var if var is not None else getattr(layer, attr)


def prunable_weights(layer) -> list[PrunableWeight] | None:
    """The weights keras_lean prunes in `layer`, or None if the layer type is not prunable.

    Dense, EinsumDense: kernel. Conv1D/2D/3D: kernel. DepthwiseConv1D/2D: depthwise kernel.
    SeparableConv1D/2D: both the depthwise and the pointwise kernel. Embedding: embeddings.
    MultiHeadAttention: the query, key, value and output projection kernels. The layer must be
    built (None is returned for an unbuilt layer of a prunable type only via `is_prunable`).
    """
    L = keras.layers
    if isinstance(layer, L.MultiHeadAttention):
        out = []
        for part in ("query", "key", "value", "output"):
            sub = getattr(layer, f"_{part}_dense")
            out.append(
                PrunableWeight(
                    f"{part}/kernel",
                    _kernel_var(sub),
                    _einsum_input_axis(sub.equation, len(sub.kernel.shape)),
                )
            )
        return out
    if isinstance(layer, L.EinsumDense):
        k = _kernel_var(layer)
        return [PrunableWeight("kernel", k, _einsum_input_axis(layer.equation, len(k.shape)))]
    if isinstance(layer, L.Dense):
        return [PrunableWeight("kernel", _kernel_var(layer), 0)]
    if isinstance(layer, L.Embedding):
        return [PrunableWeight("embeddings", _kernel_var(layer, "embeddings"), 1)]
    if isinstance(layer, _TRANSPOSE_CONVS):
        return None
    sep = tuple(getattr(L, n) for n in ("SeparableConv1D", "SeparableConv2D") if hasattr(L, n))
    if isinstance(layer, sep):
        return [
            PrunableWeight("depthwise_kernel", layer.depthwise_kernel, -2),
            PrunableWeight("pointwise_kernel", layer.pointwise_kernel, -2),
        ]
    dw = tuple(getattr(L, n) for n in ("DepthwiseConv1D", "DepthwiseConv2D") if hasattr(L, n))
    if isinstance(layer, dw):
        return [PrunableWeight("depthwise_kernel", layer.kernel, -2)]
    if isinstance(layer, L.Conv1D | L.Conv2D | L.Conv3D):
        return [PrunableWeight("kernel", layer.kernel, -2)]
    return None


_PRUNABLE_TYPES = (
    "Dense",
    "EinsumDense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "Embedding",
    "MultiHeadAttention",
)


def is_prunable(layer) -> bool:
    """True if keras_lean can prune `layer` (see `prunable_weights`)."""
    if isinstance(layer, _TRANSPOSE_CONVS) or isinstance(layer, PruneLowMagnitude):
        return False
    types = tuple(getattr(keras.layers, n) for n in _PRUNABLE_TYPES if hasattr(keras.layers, n))
    return isinstance(layer, types)


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
        criterion: "magnitude" (|w|) or "movement" (accumulated `-w * grad`, see
            `keras_lean.sparsity.movement`).
        update_masks: False freezes the masks (set them with `set_masks`); the step still counts.
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
                f"Prunable types: {', '.join(_PRUNABLE_TYPES)}."
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
        self.update_masks = bool(update_masks)
        self._pruned: list[PrunableWeight] = []
        self._masks: list[keras.Variable] = []
        self._scores: list[keras.Variable] = []
        self._previous: list[keras.Variable] = []
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
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        self._masks, self._scores, self._previous = [], [], []
        for w in weights:
            safe = w.name.replace("/", "_")
            mask = self.add_weight(
                name=f"mask_{safe}",
                shape=w.variable.shape,
                dtype=w.variable.dtype,
                initializer="ones",
                trainable=False,
                aggregation="only_first_replica",
            )
            self._masks.append(mask)
            w.variable.constraint = _MaskConstraint(mask, w.variable.constraint)
            if self.criterion == "movement":
                self._scores.append(
                    self.add_weight(
                        name=f"score_{safe}",
                        shape=w.variable.shape,
                        dtype="float32",
                        initializer="zeros",
                        trainable=False,
                        aggregation="only_first_replica",
                    )
                )
                self._previous.append(
                    self.add_weight(
                        name=f"previous_{safe}",
                        shape=w.variable.shape,
                        dtype="float32",
                        initializer="zeros",
                        trainable=False,
                        aggregation="only_first_replica",
                    )
                )
        self.built = True

    def get_build_config(self):
        return {"built": True} if self.built else None

    def build_from_config(self, config):
        if config and not self.built:
            self.build(None)

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
        """Movement scores (empty for the magnitude criterion)."""
        return list(self._scores)

    def _mask_for(self, index: int, sparsity):
        w = self._pruned[index]
        value = ops.cast(w.variable.value, "float32")
        movement = self.criterion == "movement"
        scores = self._scores[index].value if movement else ops.abs(value)
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
        if self.criterion == "movement":
            from keras_lean.sparsity.movement import accumulate_scores

            accumulate_scores(self, step)
        if not self.update_masks or self.pruning_schedule is None:
            return
        should_prune, sparsity = self.pruning_schedule(step)

        def recompute():
            return [
                ops.cast(self._mask_for(i, sparsity), m.dtype) for i, m in enumerate(self._masks)
            ]

        def keep():
            return [ops.convert_to_tensor(m.value) for m in self._masks]

        # The new values are computed in the cond and assigned outside it: assignments to
        # distributed variables need the replica context, which a cond branch does not give.
        new_masks = ops.cond(should_prune, recompute, keep)
        for mask, value in zip(self._masks, new_masks, strict=True):
            mask.assign(value)

    # ----------------------------------------------------------------------------- call
    def call(self, inputs, *args, training=None, **kwargs):
        if training and self.built:
            self._train_update()
        mapping = [
            (w.variable, w.variable.value * ops.cast(m.value, w.variable.dtype))
            for w, m in zip(self._pruned, self._masks, strict=True)
        ]
        if getattr(self.layer, "_call_has_training_arg", False):
            kwargs["training"] = training
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            outputs = self.layer(inputs, *args, **kwargs)
        # Carry over what the inner layer updated (e.g. dropout seed state) and its losses.
        masked = {id(w.variable) for w in self._pruned}
        for v in self.layer.variables:
            if id(v) in masked:
                continue
            new = scope.get_current_value(v)
            if new is not None:
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
