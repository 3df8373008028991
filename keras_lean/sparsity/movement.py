"""Movement pruning (Sanh, Wolf & Rush, 2020): masks learned from scores, straight-through.

Every pruned weight `W` gets a trainable score `S` of the same shape. The forward pass uses
`W * M(S)`:

- hard movement (`criterion="movement"`): `M = TopK(S)` at the schedule's sparsity, exactly
  `keep_count` weights kept per tensor (also N:M and block masks, ranked by `S`);
- soft movement (`criterion="soft_movement"`): `M = sigmoid(S) > tau`, with an L1 penalty
  `l1_coefficient * mean(sigmoid(S))` per pruned tensor added to the loss. Two ways to set
  `tau` (`MovementSettings.follows_schedule`):
  - `threshold=None` (the default): `tau` is re-set at every pruning step to the value that
    keeps exactly the schedule's `1 - s_t` of each tensor (the `s_t`-quantile of `sigmoid(S)`,
    so the mask is `TopK(S)`: sigmoid is monotonic). Each pruned tensor reaches the schedule's
    final sparsity, as with magnitude and hard movement, so a target (recipe, sweep, guard)
    means the same for all three; the L1 penalty still pulls the scores down, hardest where
    `sigmoid'(S)` is largest (scores near 0, the undecided weights).
  - `threshold=t` (the paper's fixed threshold): `tau` ramps to `t` along the schedule and the
    sparsity is whatever the penalty and the threshold give (the schedule only sets when and
    how fast): it can differ from the schedule's final sparsity in either direction.

The mask is a step function, so it has no gradient. The straight-through estimator (STE) treats
it as the identity in the backward pass: the forward value is written
`W * (M + S - stop_gradient(S))`, which equals `W * M` (the extra term is exactly 0) while
`d/dS = W` and `d/dW = M`. So `dL/dS = W * dL/d(W*M)`, and the optimizer's descent makes `S`
accumulate `-W * dL/dW'` (Sanh et al.'s movement), for kept AND pruned weights, while `W`
gets the published masked gradient `M * dL/d(W*M)`. Pruned weights are never zeroed (no mask
constraint for these criteria): they keep their dense values, their scores keep learning
(`W * dL/dW'` at a pruned position is the first-order gain of restoring it), and they come back
when their score rises into the top k. `strip_pruning` bakes `W * M` into the plain layer.
Only `keras.ops` and `stop_gradient` are used, so it runs in the compiled train step, under XLA
and under a distribution strategy (scores are ordinary trainable, mirrored variables), and on
any Keras backend.

Score learning rate. The paper trains scores with their own learning rate (1e-2 against 3e-5 for
BERT's weights). Keras has one optimizer per model, so the score variable holds `S / c` and the
scores used are `S = c * variable`, with the gradient passed to the variable unscaled
(`c * stop_gradient(v) + v - stop_gradient(v)`): for SGD, momentum and Adam alike, whose steps
are linear in the learning rate, the scores then move with `c` times the optimizer's learning
rate. `c` is `score_lr_multiplier`.

Initial scores and defaults (`DEFAULTS`, per criterion). The paper starts scores at zero. TopK
is invariant to the scale of the scores, so from zero `c` hardly matters for hard movement, and
the first masks are drawn from a few steps of sign noise: on a converged model fine-tuned
briefly (the embedded default: 4 epochs of digits) that lost 2 points at 50 % and 8 points at
80 % against magnitude. Hard movement therefore starts from `score_init="magnitude"`
(`S = |W| / mean|W|` per tensor, so the first masks are magnitude masks) and learns at
`c = 10`: Adam moves a score by at most `c * lr` per step, so over a fine-tune of `T` steps
movement can reorder weights whose normalised magnitudes differ by up to `10 * lr * T` (1.8
for the default 180 steps at 1e-3). `score_init="zeros"` gives the paper's initialisation.
Soft movement following the schedule starts the same way (magnitude init, `c = 10`): it ranks
scores as hard movement does, and under the guard a weight zeroed by an earlier stage then
starts with the lowest score instead of tying with the live weights at 0. With a fixed
`threshold`, soft movement keeps the paper's zero init (`sigmoid(0) = 0.5`) with `c = 100` (the
paper: 1e-2 for scores vs 3e-5 for weights), so that scores can cross the threshold in a short
run (`FIXED_THRESHOLD_DEFAULTS`).

Schedule. Masks are recomputed from the scores at every pruning step of the wrapper's schedule
(`PolynomialDecay` with power 3 is the paper's cubic sparsity warm-up; before `begin_step` every
weight is kept while the scores already learn). For soft movement, the threshold and the L1
weight follow the same curve, `tau_t = threshold * s_t / s_final` (fixed threshold) and
`lambda_t = l1_coefficient * s_t / s_final` (both variants; the paper ramps lambda with tau),
updated at the pruning steps.
"""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

__all__ = [
    "DEFAULTS",
    "FIXED_THRESHOLD_DEFAULTS",
    "MOVEMENT_CRITERIA",
    "SCORE_INITS",
    "MovementSettings",
    "movement_scores",
    "reset_scores",
]

MOVEMENT_CRITERIA = ("movement", "soft_movement")
SCORE_INITS = ("magnitude", "zeros")
# The documented defaults, per criterion (what `None` means for each argument); measured with
# scripts/bench_movement_lottery.py on the embedded default (digits, built-in cnn).
DEFAULTS: dict[str, dict] = {
    # Hard: scores start at |W| / mean|W| and learn at 10x the optimizer's lr; over a short
    # fine-tune that lets movement reorder weights without first discarding what the trained
    # weights know (zero-init TopK starts from sign noise on a converged model).
    "movement": {"score_init": "magnitude", "score_lr_multiplier": 10.0},
    # Soft: threshold None = tau follows the schedule's sparsity (each tensor reaches it), so
    # the scores start and learn as hard movement's; a given threshold switches to the paper's
    # fixed-threshold set-up (FIXED_THRESHOLD_DEFAULTS).
    "soft_movement": {
        "score_init": "magnitude",
        "score_lr_multiplier": 10.0,
        "threshold": None,
        "l1_coefficient": 1.0,
    },
}
# Soft movement with a fixed `threshold` (the paper's set-up): zero init (sigmoid(0) = 0.5),
# scores ~100x faster than the weights (the paper: 1e-2 vs 3e-5); these replace DEFAULTS'
# entries for the arguments left None.
FIXED_THRESHOLD_DEFAULTS: dict = {"score_init": "zeros", "score_lr_multiplier": 100.0}
_APPLIES_TO = {
    "score_init": "criterion='movement' or 'soft_movement'",
    "score_lr_multiplier": "criterion='movement' or 'soft_movement'",
    "threshold": "criterion='soft_movement'",
    "l1_coefficient": "criterion='soft_movement'",
}


def _number(name: str, value, *, low: float, high: float | None = None, open_low: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if open_low else value >= low
        if high is not None:
            ok = ok and value < high
    if not ok:
        bound = f"> {float(low)}" if open_low else f">= {float(low)}"
        if high is not None:
            bound = f"in ({float(low)}, {float(high)})"
        raise ValueError(f"{name} must be a finite number {bound}. Received: {name}={value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class MovementSettings:
    """The movement options of a `PruneLowMagnitude` wrapper, validated, defaults filled in.

    Attributes:
        criterion: "movement" (hard, TopK) or "soft_movement" (sigmoid threshold + L1).
        score_init: "magnitude" (`|W| / mean|W|` per tensor) or "zeros" (the paper's).
        score_lr_multiplier: scores learn at this multiple of the optimizer's learning rate.
        threshold: soft movement only: None (tau follows the schedule: each tensor keeps
            exactly the schedule's `1 - s_t`), or a fixed final threshold on `sigmoid(S)` in
            (0, 1) (the sparsity then comes from it and the L1 penalty).
        l1_coefficient: soft movement only: weight of `mean(sigmoid(S))` in the loss, >= 0.
    """

    criterion: str
    score_init: str
    score_lr_multiplier: float
    threshold: float | None = None
    l1_coefficient: float | None = None

    @classmethod
    def resolve(cls, criterion: str, **given) -> MovementSettings | None:
        """Validates the movement arguments (None: the criterion's default, see `DEFAULTS`).

        Returns:
            The settings, or None for the magnitude criterion.

        Raises:
            ValueError: an argument out of range, or one given for a criterion it does not
                apply to (e.g. `threshold` with `criterion="movement"`).
        """
        defaults = DEFAULTS.get(criterion, {})
        for name, value in given.items():
            if value is not None and name not in defaults:
                raise ValueError(
                    f"{name} applies to {_APPLIES_TO[name]} only. Received: {name}={value!r} "
                    f"with criterion={criterion!r}"
                )
        if criterion not in MOVEMENT_CRITERIA:
            return None
        if criterion == "soft_movement" and given.get("threshold") is not None:
            defaults = {**defaults, **FIXED_THRESHOLD_DEFAULTS}
        values = {k: (v if given.get(k) is None else given[k]) for k, v in defaults.items()}
        if values["score_init"] not in SCORE_INITS:
            raise ValueError(
                f"score_init must be one of {', '.join(map(repr, SCORE_INITS))}. "
                f"Received: score_init={values['score_init']!r}"
            )
        values["score_lr_multiplier"] = _number(
            "score_lr_multiplier", values["score_lr_multiplier"], low=0.0, open_low=True
        )
        if criterion == "soft_movement":
            if values["threshold"] is not None:
                values["threshold"] = _number(
                    "threshold", values["threshold"], low=0.0, high=1.0, open_low=True
                )
            values["l1_coefficient"] = _number(
                "l1_coefficient", values["l1_coefficient"], low=0.0, open_low=False
            )
        return cls(criterion, **values)

    @property
    def soft(self) -> bool:
        return self.criterion == "soft_movement"

    @property
    def follows_schedule(self) -> bool:
        """True when the masks keep exactly the schedule's fraction: hard movement, and soft
        movement without a fixed `threshold`."""
        return not self.soft or self.threshold is None


def soft_final_sparsity(settings, schedule, m_by_n, block_size) -> float | None:
    """Checks a soft-movement wrapper's set-up; returns the sparsity its schedule ends at.

    Returns:
        None unless `settings` is soft movement; 1.0 without a schedule.

    Raises:
        ValueError: soft movement with N:M or blocks (it thresholds single weights), or with a
            schedule without `final_sparsity` / `target_sparsity` (e.g. a TFMOT one).
    """
    if settings is None or not settings.soft:
        return None
    if m_by_n is not None or tuple(block_size) != (1, 1):
        raise ValueError(
            "criterion='soft_movement' thresholds each weight's score; it cannot be combined "
            "with sparsity_m_by_n or block_size. Use criterion='movement'. Received: "
            f"sparsity_m_by_n={m_by_n!r}, block_size={block_size!r}"
        )
    if schedule is None:
        return 1.0
    for attr in ("final_sparsity", "target_sparsity"):
        value = getattr(schedule, attr, None)
        if value is not None:
            return float(value)
    raise ValueError(
        "criterion='soft_movement' ramps its L1 weight (and a fixed threshold) along the "
        "schedule's sparsity curve, so it needs a schedule with a final sparsity (keras_lean "
        "PolynomialDecay or "
        f"ConstantSparsity). Received: {schedule!r}"
    )


def add_score_variables(wrapper, weights) -> tuple[list[keras.Variable], keras.Variable | None]:
    """Creates one trainable score per pruned weight (and soft movement's ramp variable).

    Scores start at zero (`score_init="zeros"`, the paper's constant init) or at
    `|W| / mean(|W|)` per tensor (`"magnitude"`), from the weights the layer has now.

    Returns:
        (scores in `weights` order, the soft-movement ramp variable or None).
    """
    scores = [
        wrapper.add_weight(
            name=f"score_{w.name.replace('/', '_')}",
            shape=w.variable.shape,
            dtype="float32",
            initializer="zeros",
            trainable=True,
        )
        for w in weights
    ]
    if wrapper.movement.score_init == "magnitude":
        for w, v in zip(weights, scores, strict=True):
            magnitude = ops.abs(ops.cast(ops.convert_to_tensor(w.variable.value), "float32"))
            scale = ops.maximum(ops.mean(magnitude), 1e-12)
            v.assign(magnitude / scale / wrapper.movement.score_lr_multiplier)
    ramp = None
    if wrapper.movement.soft:
        ramp = wrapper.add_weight(
            name="movement_ramp",
            shape=(),
            dtype="float32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
    return scores, ramp


def effective_scores(variable, multiplier: float):
    """`S = c * v` in value, with `dS/dv = 1`: the scores learn at c times the optimizer's lr."""
    v = ops.convert_to_tensor(variable)
    frozen = ops.stop_gradient(v)
    return multiplier * frozen + (v - frozen)


def straight_through(weight, mask, score_variable):
    """`W * M` in value; gradient `M * g` to `W` and `W * g` to the score (mask treated as 1).

    `S - stop_gradient(S)` is exactly zero, so the forward value is the masked weight.
    """
    s = ops.cast(ops.convert_to_tensor(score_variable), weight.dtype)
    return weight * (ops.cast(mask, weight.dtype) + (s - ops.stop_gradient(s)))


def ramp_value(schedule_sparsity, final: float):
    """`s_t / s_final` in [0, 1] (1 for a schedule ending at 0 sparsity)."""
    if final <= 0:
        return ops.ones((), "float32")
    return ops.clip(ops.cast(schedule_sparsity, "float32") / final, 0.0, 1.0)


def soft_mask(scores, threshold):
    """`sigmoid(S) > threshold` as a 0/1 float32 tensor (threshold 0 keeps every weight)."""
    return ops.cast(ops.greater(ops.sigmoid(scores), threshold), "float32")


def l1_penalty(wrapper):
    """`lambda_t * sum over pruned tensors of mean(sigmoid(S))` for a soft-movement wrapper."""
    settings = wrapper.movement
    # float32 throughout: under mixed precision the variables read as float16, and the loss
    # Keras sums this into is float32.
    weight = settings.l1_coefficient * ops.cast(wrapper._movement_ramp.value, "float32")
    total = 0.0
    for variable in wrapper._scores:
        scores = ops.cast(effective_scores(variable, settings.score_lr_multiplier), "float32")
        total = total + ops.mean(ops.sigmoid(scores))
    return weight * total


def movement_scores(wrapper) -> list:
    """The scores `S = c * variable` of a movement wrapper, as NumPy arrays in mask order."""
    c = wrapper.movement.score_lr_multiplier
    return [ops.convert_to_numpy(v.value) * c for v in wrapper._scores]


def reset_scores(wrapper) -> None:
    """Zeroes the movement scores of a wrapper (e.g. before a new fine-tuning phase)."""
    for score in wrapper._scores:
        score.assign(ops.zeros_like(score.value))
