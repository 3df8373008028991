"""Recipe method `soft_movement`: soft movement pruning (Sanh et al., 2020).

Like `movement` (same section plus two keys), but a weight is kept while
`sigmoid(score) > tau`, and an L1 penalty on `sigmoid(scores)` pulls the scores down. With
`threshold: null` (the default) `tau` is re-set at every pruning step so each pruned layer
keeps exactly the schedule's fraction: the layers reach `target_sparsity`, and
`--target-sparsity`, the sweep and `recipe.guard` set it as for `magnitude` and `movement`.
With a fixed `threshold` (the paper's variant) the sparsity comes from `threshold` and
`l1_coefficient` (`target_sparsity` only shapes the ramp), so there is no target to set: the
guard and a target refuse it, and the report says what sparsity was reached. See
`keras_lean.sparsity.movement`. Not in the default sweep (`keras-lean sweep --methods
soft_movement --targets ...`).

Recipe section (all keys optional; null means the documented default)::

    soft_movement:
      target_sparsity: 0.8   # reached by every pruned layer with threshold: null
      threshold: null        # null: tau follows the schedule; or a fixed tau in (0, 1)
      l1_coefficient: null   # L1 penalty weight, >= 0
      score_lr_multiplier: null
      score_init: null       # magnitude | zeros
      # plus every `magnitude` key except m_by_n and block_size
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from keras_lean.pipeline.methods.magnitude import (
    _CONFLICTS,
    _MOVEMENT_DEFAULT,
    MovementMethod,
    MovementOptions,
)
from keras_lean.pipeline.methods.registry import register_method
from keras_lean.pipeline.options import Float, Optional, RecipeError, option


@dataclasses.dataclass(frozen=True)
class SoftMovementOptions(MovementOptions):
    """Options of the `soft_movement` section: `MovementOptions` plus threshold and L1.

    Attributes:
        threshold: null: every pruned layer keeps exactly the schedule's fraction (reaches
            `target_sparsity`); a number in (0, 1): the paper's fixed threshold, keep
            `sigmoid(score) > threshold`, higher is sparser, and the sparsity is what it and
            `l1_coefficient` give.
        l1_coefficient: weight of the L1 penalty on `sigmoid(scores)` (>= 0); with a fixed
            threshold, higher is sparser. Null is the documented default.
    """

    threshold: float | None = option(
        None,
        Optional(Float(gt=0, lt=1)),
        "null: reach target_sparsity; or a fixed tau in (0, 1): keep sigmoid(score) > tau",
    )
    l1_coefficient: float | None = option(
        None, Optional(Float(min=0)), f"L1 on sigmoid(scores) ({_MOVEMENT_DEFAULT})"
    )

    def check(self) -> None:
        super().check()
        if self.m_by_n is not None or tuple(self.block_size) != (1, 1):
            raise RecipeError(
                "m_by_n" if self.m_by_n is not None else "block_size",
                "cannot be used with soft_movement, which thresholds single weights; use "
                "movement for N:M or block sparsity.",
            )

    def criterion_options(self) -> dict:
        out = super().criterion_options()
        for n in ("threshold", "l1_coefficient"):
            if getattr(self, n) is not None:
                out[n] = getattr(self, n)
        return out


@register_method
class SoftMovementMethod(MovementMethod):
    """Soft movement pruning (Sanh et al., 2020): `sigmoid(score) > threshold`, L1 penalty."""

    name: ClassVar[str] = "soft_movement"
    options_class: ClassVar[type] = SoftMovementOptions
    criterion: ClassVar[str] = "soft_movement"
    conflicts: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            **_CONFLICTS,
            "magnitude": "both prune unstructured weights; choose one",
            "movement": "both prune unstructured weights; choose one",
        }
    )
    sweep_targets: ClassVar[tuple[float, ...]] = ()

    @classmethod
    def _refuse_fixed_threshold(cls, options: SoftMovementOptions, what: str) -> None:
        if options.threshold is not None:
            raise RecipeError(
                f"{cls.name}.threshold",
                f"is set ({options.threshold:g}), so the sparsity comes from threshold and "
                f"l1_coefficient, not from target_sparsity: {what}. Set threshold: null to "
                "let every pruned layer reach target_sparsity.",
            )

    @classmethod
    def with_target(cls, options: SoftMovementOptions, target: float) -> SoftMovementOptions:
        """`options` with `target_sparsity` set (refused with a fixed threshold)."""
        cls._refuse_fixed_threshold(options, "a target sparsity cannot be set")
        return super().with_target(options, target)

    @classmethod
    def check_guard(cls, options: SoftMovementOptions) -> None:
        cls._refuse_fixed_threshold(options, "recipe.guard cannot stage it")
        super().check_guard(options)

    @classmethod
    def report_lines(cls, report: dict) -> list[str]:
        """With a fixed threshold, the sparsity reached beside the (unused) target."""
        settings = report.get("movement") or {}
        final = (report.get("final") or {}).get("sparsity")
        if settings.get("threshold") is None or final is None:
            return []
        return [
            f"soft movement, fixed threshold {settings['threshold']:g}: reached sparsity "
            f"{final:.1%} (target_sparsity {report.get('target_sparsity', 0):.0%} only shaped "
            "the ramp)"
        ]
