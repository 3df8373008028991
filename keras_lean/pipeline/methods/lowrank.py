"""Recipe method `lowrank`: factorize Dense kernels by truncated SVD, then fine-tune.

Recipe section (all optional):

```yaml
lowrank:
  rank: null        # fixed rank for every factorized layer, or null to pick it from `energy`
  energy: 0.9       # share of spectral energy kept when rank is null, in (0, 1]
  filters: []       # regexes searched in layer paths; empty: every Dense layer
```

The factorized layers (`LowRankDense`) are the deployment form, so `finalize` keeps them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method
from keras_lean.pipeline.methods.registry import register_method
from keras_lean.pipeline.options import (
    Choice,
    Float,
    Int,
    Optional,
    Patterns,
    RecipeError,
    Section,
    option,
)


@dataclasses.dataclass(frozen=True)
class LowRankOptions(Section):
    """Options of the `lowrank` recipe method.

    Attributes:
        version: format version of this section (1).
        rank: fixed rank for every factorized layer, or None to pick each layer's rank from
            `energy`.
        energy: share of the squared singular values kept when `rank` is None, in (0, 1].
        filters: regexes searched in layer paths choosing the candidate layers; empty: all
            Dense (and Dense-like EinsumDense) layers.
    """

    root: ClassVar[str | None] = "lowrank"

    version: int = option(1, Choice(1), "format version of this section")
    rank: int | None = option(
        None, Optional(Int(min=1)), "fixed rank of every factorized layer, or null: use energy"
    )
    energy: float = option(
        0.9, Float(gt=0, max=1), "share of spectral energy kept when rank is null, in (0, 1]"
    )
    filters: tuple[str, ...] = option(
        (), Patterns("regexes"), "regexes searched in layer paths; empty: every Dense layer"
    )


@register_method
class LowRankMethod(Method):
    """Replaces Dense kernels by their truncated SVD before fine-tuning (`factorize`)."""

    name: ClassVar[str] = "lowrank"
    order: ClassVar[int] = 20
    options_class: ClassVar[type] = LowRankOptions
    target_option: ClassVar[str | None] = "energy"
    target_help: ClassVar[str] = (
        "a number in (0, 1) sets energy (share of spectral energy kept, the rank picked per "
        "layer); an integer >= 1 sets a fixed rank"
    )
    state_attributes: ClassVar[tuple[str, ...]] = ("_report",)

    def __init__(self, options: LowRankOptions):
        super().__init__(options)
        self._report: dict | None = None

    @classmethod
    def with_target(cls, options: LowRankOptions, target: float) -> LowRankOptions:
        """A number in (0, 1) is the energy kept (with `rank: null`); an integral number >= 1
        (`8` or `8.0`, as the CLI's float option passes it) is a fixed rank."""
        is_number = isinstance(target, int | float) and not isinstance(target, bool)
        if is_number and 0 < target < 1:
            return dataclasses.replace(options, energy=target, rank=None)
        if is_number and float(target).is_integer() and target >= 1:
            return dataclasses.replace(options, rank=int(target))
        raise RecipeError(
            f"{cls.name}.{cls.target_option}",
            f"the target must be an energy in (0, 1) or an integer rank >= 1. Received: {target!r}",
        )

    def prepare(self, model, data: Data, plan: FinetunePlan):
        from keras_lean.lowrank import factorize

        new, report = factorize(
            model,
            rank=self.options.rank,
            energy=self.options.energy,
            filters=list(self.options.filters) or None,
        )
        self._report = report.to_dict()
        return new

    def report(self) -> dict:
        result = {"options": self.options.to_dict()}
        if self._report is not None:
            result.update(self._report)
        return result
