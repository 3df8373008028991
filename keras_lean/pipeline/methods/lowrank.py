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
from typing import Any

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method


def _check_keys(section: str, data: Any, allowed: list[str]) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"`{section}` must be a mapping of options. Received: {section}={data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown key {section}.{unknown[0]}"
            + (f" (and {', '.join(f'{section}.{k}' for k in unknown[1:])})" if unknown[1:] else "")
            + f". Allowed: {', '.join(allowed)}."
        )
    return dict(data)


def _patterns(section: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"`{section}.{key}` must be a list of regex strings. Received: {key}={value!r}"
        )
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class LowRankOptions:
    """Options of the `lowrank` recipe method.

    Attributes:
        version: format version of this section (1).
        rank: fixed rank for every factorized layer, or None to pick each layer's rank from
            `energy`.
        energy: share of the squared singular values kept when `rank` is None, in (0, 1].
        filters: regexes searched in layer paths choosing the candidate layers; empty: all
            Dense (and Dense-like EinsumDense) layers.
    """

    version: int = 1
    rank: int | None = None
    energy: float = 0.9
    filters: tuple[str, ...] = ()

    def __post_init__(self):
        if self.version != 1:
            raise ValueError(f"`lowrank.version` must be 1. Received: version={self.version!r}")
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0
        ):
            raise ValueError(
                f"`lowrank.rank` must be a positive integer or null. Received: rank={self.rank!r}"
            )
        if (
            isinstance(self.energy, bool)
            or not isinstance(self.energy, int | float)
            or not 0 < self.energy <= 1
        ):
            raise ValueError(
                f"`lowrank.energy` must be in (0, 1]. Received: energy={self.energy!r}"
            )
        object.__setattr__(self, "filters", _patterns("lowrank", "filters", self.filters))

    @classmethod
    def from_dict(cls, data: dict | None) -> LowRankOptions:
        """Parses the recipe section; unknown keys raise ValueError naming `lowrank.<key>`."""
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**_check_keys("lowrank", data, fields))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["filters"] = list(self.filters)
        return data


class LowRankMethod(Method):
    """Replaces Dense kernels by their truncated SVD before fine-tuning (`factorize`)."""

    name = "lowrank"
    order = 20
    options_class = LowRankOptions

    def __init__(self, options: LowRankOptions):
        super().__init__(options)
        self._report = None

    def prepare(self, model, data: Data, plan: FinetunePlan):
        from keras_lean.lowrank import factorize

        new, self._report = factorize(
            model,
            rank=self.options.rank,
            energy=self.options.energy,
            filters=list(self.options.filters) or None,
        )
        return new

    def report(self) -> dict:
        result = {"options": self.options.to_dict()}
        if self._report is not None:
            result.update(self._report.to_dict())
        return result
