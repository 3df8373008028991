"""Recipe method `soft_movement`: soft movement pruning (Sanh et al., 2020).

Like `movement` (same section plus two keys), but a weight is kept while
`sigmoid(score) > threshold`, and an L1 penalty on `sigmoid(scores)` pulls the scores down; so the
sparsity comes from `threshold` and `l1_coefficient`, not from `target_sparsity` (which only
shapes the ramp of the threshold and the penalty). See `keras_lean.sparsity.movement`.

The sweep and `--target-sparsity` set `threshold` (higher: sparser); it is not in the default
sweep, and `recipe.guard` does not stage it (no target to raise in stages).

Recipe section (all keys optional; null means the documented default)::

    soft_movement:
      threshold: null        # keep sigmoid(score) > threshold, in (0, 1)
      l1_coefficient: null   # L1 penalty weight, >= 0: higher is sparser
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
        threshold: keep a weight while `sigmoid(score) > threshold`, in (0, 1); higher is
            sparser. Null is the documented default.
        l1_coefficient: weight of the L1 penalty on `sigmoid(scores)` (>= 0); higher is
            sparser. Null is the documented default.
    """

    threshold: float | None = option(
        None, Optional(Float(gt=0, lt=1)), f"keep sigmoid(score) > this ({_MOVEMENT_DEFAULT})"
    )
    l1_coefficient: float | None = option(
        None,
        Optional(Float(min=0)),
        f"L1 on sigmoid(scores), higher: sparser ({_MOVEMENT_DEFAULT})",
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
    guard_stageable: ClassVar[bool] = False
    guard_note: ClassVar[str] = (
        "its sparsity comes from threshold and l1_coefficient, not from a target the guard "
        "could raise in stages; use movement"
    )
    target_option: ClassVar[str | None] = "threshold"
    target_help: ClassVar[str] = (
        "soft movement's sigmoid-score threshold in (0, 1), higher: sparser"
    )
    sweep_targets: ClassVar[tuple[float, ...]] = ()
