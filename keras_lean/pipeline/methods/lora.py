"""Recipe method `lora`: fine-tune LoRA adapters on a frozen model, merge them at deploy.

Recipe section (all optional):

```yaml
lora:
  rank: 8               # adapter rank
  alpha: null           # update scale numerator (alpha / rank); null: rank
  targets: []           # regexes searched in layer paths; empty: see below
  keep_trainable: []    # regexes of layers left fully trainable (e.g. a new classifier head)
```

Default targets follow PEFT's convention, so they work on any model: the query and value
projections of attention layers, or else every hidden Dense layer; the model's output layers (the
task head, e.g. a `Dense(2)` classifier) are trained fully instead of adapted, and hidden layers
narrower than the rank are left frozen. `targets` / `keep_trainable` choose exactly instead.

Combinations: `structured` (pruned first, then LoRA recovers, merge, shrink) and `lowrank` are
fine. Unstructured sparsity methods (`magnitude`, `movement`, `lottery`) are refused: the merged
update `(alpha / rank) * A @ B` is a dense matrix, so folding it into a pruned kernel at deploy
would refill the pruned zeros and destroy the sparsity, and re-masking after the merge would cut
the trained update and change the model's outputs unpredictably.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
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

_MERGE_DESTROYS_SPARSITY = (
    "merging LoRA at deploy adds the dense update (alpha / rank) * A @ B to every adapted "
    "kernel, which refills the zeros the pruning made and destroys the sparsity (re-masking "
    "after the merge would instead cut the trained update and change the outputs). Use "
    "'structured' with 'lora', or run 'lora' first and prune the merged model in a second run"
)


@dataclasses.dataclass(frozen=True)
class LoraOptions(Section):
    """Options of the `lora` recipe method.

    Attributes:
        version: format version of this section (1).
        rank: LoRA rank, a positive integer no larger than min(in, out) of any targeted kernel.
        alpha: scale numerator, the update is scaled by alpha / rank; None means rank.
        targets: regexes searched in layer paths choosing the adapted layers. Empty: the query
            and value projections of attention layers, or else every hidden Dense layer; the
            model's output layers (the task head) are trained fully instead (PEFT's convention)
            and hidden layers narrower than `rank` are left frozen; the report lists both.
        keep_trainable: regexes of layers left fully trainable (e.g. a fresh classifier head).
            Empty with default targets: the output layers.
    """

    root: ClassVar[str | None] = "lora"

    version: int = option(1, Choice(1), "format version of this section")
    rank: int = option(8, Int(min=1), "adapter rank")
    alpha: float | None = option(
        None, Optional(Float(gt=0)), "update scale numerator (alpha / rank); null: rank"
    )
    targets: tuple[str, ...] = option(
        (),
        Patterns("regexes"),
        "regexes of layer paths; empty: attention query/value, else the hidden Dense layers",
    )
    keep_trainable: tuple[str, ...] = option(
        (),
        Patterns("regexes"),
        "regexes of layers trained fully; empty with default targets: the output layers",
    )


@register_method
class LoraMethod(Method):
    """Freezes the model and trains Keras LoRA adapters (`apply_lora`); deploy merges them."""

    name: ClassVar[str] = "lora"
    order: ClassVar[int] = 40
    options_class: ClassVar[type] = LoraOptions
    conflicts: ClassVar[Mapping[str, str]] = MappingProxyType(
        {m: _MERGE_DESTROYS_SPARSITY for m in ("magnitude", "movement", "soft_movement", "lottery")}
    )
    # structured.mode progressive slices the adapters with their layers at every shrink.
    can_shrink_progressively: ClassVar[bool] = True
    state_attributes: ClassVar[tuple[str, ...]] = (
        "_before",
        "_adapted",
        "_merged_layers",
        "_defaults",
    )

    def __init__(self, options: LoraOptions):
        super().__init__(options)
        self._before: dict | None = None
        self._adapted: dict | None = None
        self._merged_layers: int | None = None
        self._defaults: dict | None = None

    def prepare(self, model, data: Data, plan: FinetunePlan):
        from keras_lean.lowrank import apply_lora, lora_summary

        o = self.options
        targets, keep = list(o.targets) or None, list(o.keep_trainable) or None
        if targets is None:
            chosen, heads, narrow = default_targets(model, o.rank)
            self._defaults = {"targets": chosen, "heads": heads, "too_narrow": narrow}
            targets = [_exact(p) for p in chosen]
            if keep is None and heads:
                keep = [_exact(p) for p in heads]
        self._before = lora_summary(model)
        new = apply_lora(model, rank=o.rank, alpha=o.alpha, targets=targets, keep_trainable=keep)
        self._adapted = lora_summary(new)
        return new

    def finalize(self, model):
        from keras_lean.lowrank import lora_layers, merge_lora

        self._merged_layers = len(lora_layers(model))
        return merge_lora(model)

    def report(self) -> dict:
        result: dict = {"options": self.options.to_dict()}
        if self._defaults is not None:
            result["default_targets"] = self._defaults
        if self._before is not None:
            result["trainable_params_before"] = self._before["trainable_params"]
        if self._adapted is not None:
            for key in (
                "trainable_params",
                "total_params",
                "trainable_fraction",
                "adapter_params",
                "layers",
            ):
                result[key] = self._adapted[key]
        if self._merged_layers is not None:
            result["merged_layers"] = self._merged_layers
        return result

    @classmethod
    def report_lines(cls, report: dict) -> list[str]:
        """What was adapted, what was trained fully, and what default targeting left out."""
        out = []
        if isinstance(report.get("trainable_params"), int | float) and report.get("total_params"):
            out.append(
                f"lora: {report['trainable_params']:,} of {report['total_params']:,} parameters "
                f"trained ({report['trainable_params'] / report['total_params']:.1%})"
            )
        defaults = report.get("default_targets")
        if isinstance(defaults, Mapping):
            heads, narrow = defaults.get("heads") or [], defaults.get("too_narrow") or {}
            if heads:
                out.append(f"lora: output layers trained fully: {', '.join(heads)}")
            if narrow:
                out.append(
                    "lora: left frozen (narrower than the rank): "
                    + ", ".join(f"{p} ({w})" for p, w in narrow.items())
                )
        return out


def _exact(path: str) -> str:
    return f"^{re.escape(path)}$"


def default_targets(model, rank: int) -> tuple[list[str], list[str], dict[str, str]]:
    """The layers LoRA adapts when `lora.targets` is empty, PEFT-style.

    Returns `(targets, heads, too_narrow)` as layer paths: the library's default targets
    (`keras_lean.lowrank.default_lora_targets`) minus the model's output layers (`heads`, a
    task head is trained fully) and minus the layers whose kernel is narrower than `rank`
    (`{path: why}`).

    Raises:
        RecipeError: (`lora.targets`) no layer is left to adapt.
    """
    from keras_lean.lowrank import default_lora_targets
    from keras_lean.lowrank._model import named_layers

    paths = {id(layer): path for path, layer in named_layers(model)}
    heads = [paths[id(h)] for h in _output_layers(model) if id(h) in paths]
    targets, narrow = [], {}
    for layer in default_lora_targets(model):
        path = paths.get(id(layer))
        if path is None or path in heads:
            continue
        bound = _rank_bound(layer)
        if bound is not None and rank > bound:
            narrow[path] = f"min(inputs, outputs) = {bound} < rank {rank}"
            continue
        targets.append(path)
    if not targets:
        candidates = [p for p, layer in named_layers(model) if hasattr(layer, "enable_lora")]
        raise RecipeError(
            "lora.targets",
            f"the default targets leave no layer to adapt: output layers {heads} are trained "
            f"fully and {sorted(narrow) or 'no layer'} are narrower than rank {rank}. Lower "
            f"lora.rank or name the layers in lora.targets. Layers that support LoRA: "
            f"{candidates}",
        )
    return targets, heads, narrow


def _output_layers(model) -> list:
    """The layers whose outputs are the model's outputs (descending into nested models)."""
    import keras

    if isinstance(model, keras.Sequential):
        last = [model.layers[-1]] if model.layers else []
    else:
        names = list(getattr(model, "output_names", None) or [])
        last = []
        for name in names:
            try:
                last.append(model.get_layer(name))
            except ValueError:
                continue
    out = []
    for layer in last:
        out.extend(_output_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return out


def _rank_bound(layer) -> int | None:
    """min(inputs, outputs) of the kernel LoRA adapts, seen as a matrix (None if unknown)."""
    weight = getattr(layer, "kernel", None)
    if weight is None:
        weight = getattr(layer, "embeddings", None)
    shape = tuple(getattr(weight, "shape", ()) or ())
    if len(shape) < 2:
        return None
    return int(min(math.prod(shape[:-1]), shape[-1]))


__all__ = ["LoraMethod", "LoraOptions", "default_targets"]
