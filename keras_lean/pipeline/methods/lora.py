"""Recipe method `lora`: fine-tune LoRA adapters on a frozen model, merge them at deploy.

Recipe section (all optional):

```yaml
lora:
  rank: 8               # adapter rank
  alpha: null           # update scale numerator (alpha / rank); null: rank
  targets: []           # regexes searched in layer paths; empty: attention query/value, else Dense
  keep_trainable: []    # regexes of layers left fully trainable (e.g. a new classifier head)
```

Combinations: `structured` (pruned first, then LoRA recovers, merge, shrink) and `lowrank` are
fine. Unstructured sparsity methods (`magnitude`, `movement`, `lottery`) are refused: the merged
update `(alpha / rank) * A @ B` is a dense matrix, so folding it into a pruned kernel at deploy
would refill the pruned zeros and destroy the sparsity, and re-masking after the merge would cut
the trained update and change the model's outputs unpredictably.
"""

from __future__ import annotations

import dataclasses

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method
from keras_lean.pipeline.methods.lowrank import _check_keys, _patterns

_SPARSITY_METHODS = ("magnitude", "movement", "lottery")


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """Options of the `lora` recipe method.

    Attributes:
        version: format version of this section (1).
        rank: LoRA rank, a positive integer no larger than min(in, out) of any targeted kernel.
        alpha: scale numerator, the update is scaled by alpha / rank; None means rank.
        targets: regexes searched in layer paths choosing the adapted layers; empty: the query
            and value projections of attention layers, or every Dense layer when there is none.
        keep_trainable: regexes of layers left fully trainable (e.g. a fresh classifier head).
    """

    version: int = 1
    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = ()
    keep_trainable: tuple[str, ...] = ()

    def __post_init__(self):
        if self.version != 1:
            raise ValueError(f"`lora.version` must be 1. Received: version={self.version!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(
                f"`lora.rank` must be a positive integer. Received: rank={self.rank!r}"
            )
        if self.alpha is not None and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not self.alpha > 0
        ):
            raise ValueError(
                f"`lora.alpha` must be a positive number or null. Received: alpha={self.alpha!r}"
            )
        object.__setattr__(self, "targets", _patterns("lora", "targets", self.targets))
        object.__setattr__(
            self, "keep_trainable", _patterns("lora", "keep_trainable", self.keep_trainable)
        )

    @classmethod
    def from_dict(cls, data: dict | None) -> LoraOptions:
        """Parses the recipe section; unknown keys raise ValueError naming `lora.<key>`."""
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**_check_keys("lora", data, fields))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        data["keep_trainable"] = list(self.keep_trainable)
        return data


class LoraMethod(Method):
    """Freezes the model and trains Keras LoRA adapters (`apply_lora`); deploy merges them."""

    name = "lora"
    order = 40
    options_class = LoraOptions

    def __init__(self, options: LoraOptions):
        super().__init__(options)
        self._before: dict | None = None
        self._adapted: dict | None = None
        self._merged_layers: int | None = None

    @classmethod
    def check_combination(cls, names: list[str]) -> None:
        """Refuses LoRA together with unstructured sparsity (magnitude, movement, lottery).

        Raises:
            ValueError: naming both methods and why.
        """
        if cls.name not in names:
            return
        clash = [n for n in names if n in _SPARSITY_METHODS]
        if clash:
            raise ValueError(
                f"Methods {clash[0]!r} and 'lora' cannot be combined: merging LoRA at deploy adds "
                "the dense update (alpha / rank) * A @ B to every adapted kernel, which refills "
                f"the zeros {clash[0]!r} pruned and destroys the sparsity (re-masking after the "
                "merge would instead cut the trained update and change the outputs). Use "
                "'structured' with 'lora', or run 'lora' first and prune the merged model in a "
                "second run."
            )

    def prepare(self, model, data: Data, plan: FinetunePlan):
        from keras_lean.lowrank import apply_lora, lora_summary

        self._before = lora_summary(model)
        new = apply_lora(
            model,
            rank=self.options.rank,
            alpha=self.options.alpha,
            targets=list(self.options.targets) or None,
            keep_trainable=list(self.options.keep_trainable) or None,
        )
        self._adapted = lora_summary(new)
        return new

    def finalize(self, model):
        from keras_lean.lowrank import lora_layers, merge_lora

        self._merged_layers = len(lora_layers(model))
        return merge_lora(model)

    def report(self) -> dict:
        result: dict = {"options": self.options.to_dict()}
        if self._before is not None:
            result["trainable_params_before"] = self._before["trainable_params"]
        if self._adapted is not None:
            result["trainable_params"] = self._adapted["trainable_params"]
            result["total_params"] = self._adapted["total_params"]
            result["trainable_fraction"] = self._adapted["trainable_fraction"]
            result["adapter_params"] = self._adapted["adapter_params"]
            result["layers"] = self._adapted["layers"]
        if self._merged_layers is not None:
            result["merged_layers"] = self._merged_layers
        return result
