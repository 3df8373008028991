"""Recipe method `oneshot`: calibration pruning in one shot (Wanda, SparseGPT or magnitude).

`prepare` prunes the baseline's Dense / EinsumDense projections once, from the first
`calibration_samples` training inputs (`keras_lean.sparsity.prune_oneshot`); the pipeline then
fine-tunes with the zeros held (a callback re-applies the masks after every batch, so the
projections inside keras-hub Transformer blocks, which the pruning wrapper cannot reach, stay
sparse too), or, with `finetune: false`, keeps the one-shot model as it is.

Recipe section (all keys optional)::

    oneshot:
      criterion: wanda       # wanda | sparsegpt | magnitude
      sparsity: 0.5          # fraction of zeros per projection (ignored with m_by_n)
      m_by_n: null           # e.g. [2, 4]: 2 zeros in every 4 weights along the input axis
      calibration_samples: 128
      include: ["*"]
      exclude: []
      finetune: true         # false: no fine-tuning, deploy the one-shot model

Not combinable with `lora` (merging the adapters would refill the zeros) nor with the other
unstructured methods (they prune the same weights).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method
from keras_lean.pipeline.methods.registry import register_method
from keras_lean.pipeline.options import (
    Bool,
    Choice,
    Float,
    Int,
    Pair,
    Patterns,
    RecipeError,
    Section,
    option,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras


@dataclasses.dataclass(frozen=True)
class OneshotOptions(Section):
    """Options of the `oneshot` recipe section.

    Attributes:
        criterion: `wanda` (|W|·||X||, per output), `sparsegpt` (OBS reconstruction with the
            calibration inputs' inverse Hessian) or `magnitude` (|W|, per layer).
        sparsity: fraction of zero weights in each pruned projection, in [0, 1).
        m_by_n: `[m, n]`: m zeros in every n consecutive weights along the input axis, or null.
        calibration_samples: training samples run through the model to calibrate (>= 1).
        include: layer-name patterns (fnmatch on the name, the variable path or a part of it)
            of the projections to prune; `*` is every Dense / EinsumDense.
        exclude: patterns of projections left dense.
        finetune: fine-tune with the zeros held (true) or deploy the one-shot model (false).
    """

    criterion: str = option(
        "wanda", Choice("wanda", "sparsegpt", "magnitude"), "wanda | sparsegpt | magnitude"
    )
    sparsity: float = option(
        0.5, Float(min=0, lt=1), "fraction of zeros per pruned projection, in [0, 1)"
    )
    m_by_n: tuple[int, int] | None = option(
        None, Pair(optional=True), "null, or [m, n]: m zeros in every n weights (input axis)"
    )
    calibration_samples: int = option(
        128, Int(min=1), "training samples run through the model to calibrate"
    )
    include: tuple[str, ...] = option(
        ("*",), Patterns(), "projection-name patterns to prune ('*' = every Dense/EinsumDense)"
    )
    exclude: tuple[str, ...] = option((), Patterns(), "projection-name patterns to leave dense")
    finetune: bool = option(True, Bool(), "fine-tune with the zeros held (false: deploy as is)")

    def check(self) -> None:
        if self.m_by_n is not None and not 0 < self.m_by_n[0] < self.m_by_n[1]:
            raise RecipeError(
                "m_by_n", f"must be [m, n] with 0 < m < n. Received: {list(self.m_by_n)}"
            )


_SAME_WEIGHTS = "both prune unstructured weights; choose one"


@register_method
class OneshotMethod(Method):
    """One-shot calibration pruning (Wanda: Sun et al., 2023; SparseGPT: Frantar & Alistarh,
    2023), then optional fine-tuning with the zeros held."""

    name: ClassVar[str] = "oneshot"
    order: ClassVar[int] = 30
    options_class: ClassVar[type] = OneshotOptions
    conflicts: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "lora": (
                "merging LoRA at deploy adds a dense update to every adapted kernel, which "
                "refills the zeros the one-shot pruning made. Use 'oneshot' alone (its "
                "fine-tune holds the zeros), or run 'lora' first and prune the merged model"
            ),
            "magnitude": _SAME_WEIGHTS,
            "movement": _SAME_WEIGHTS,
            "soft_movement": _SAME_WEIGHTS,
            "lottery": _SAME_WEIGHTS,
        }
    )
    target_option: ClassVar[str | None] = "sparsity"
    target_help: ClassVar[str] = "fraction of zero weights per pruned projection, in [0, 1)"
    sweep_targets: ClassVar[tuple[float, ...]] = (0.5, 0.6, 0.7)
    state_attributes: ClassVar[tuple[str, ...]] = ("_oneshot", "_final")

    def __init__(self, options: OneshotOptions):
        super().__init__(options)
        self._oneshot: dict | None = None  # OneshotReport.to_dict() of the prepare step
        self._final: dict | None = None

    def _filters(self, model: keras.Model):
        """A filters callable for `prune_oneshot`, after checking every pattern matches."""
        import keras

        from keras_lean._keras_internals import flatten_layers

        o = self.options
        projections = [
            layer
            for layer in flatten_layers(model)
            if isinstance(layer, keras.layers.Dense | keras.layers.EinsumDense) and layer.built
        ]
        names = [n for layer in projections for n in _names(layer)]
        for key in ("include", "exclude"):
            for p in getattr(o, key):
                if not any(fnmatch.fnmatchcase(n, p) for n in names):
                    listed = ", ".join(_names(layer)[1] for layer in projections) or "none"
                    raise RecipeError(
                        f"{self.name}.{key}",
                        f"pattern {p!r} matches no Dense or EinsumDense layer. Layers: {listed}",
                    )

        def chosen(layer) -> bool:
            names = _names(layer)
            inc = any(fnmatch.fnmatchcase(n, p) for p in o.include for n in names)
            return inc and not any(fnmatch.fnmatchcase(n, p) for p in o.exclude for n in names)

        return chosen

    def prepare(self, model: keras.Model, data: Data, plan: FinetunePlan) -> keras.Model:
        from keras_lean.sparsity.oneshot import prune_oneshot

        o = self.options
        calibration = _first(data.x_train, o.calibration_samples)
        filters = self._filters(model)
        try:
            pruned, report = prune_oneshot(
                model,
                calibration,
                method=o.criterion,
                sparsity=o.sparsity,
                sparsity_m_by_n=o.m_by_n,
                filters=filters,
                batch_size=max(1, min(plan.batch_size, o.calibration_samples)),
            )
        except ValueError as e:
            raise RecipeError(self.name, str(e)) from None
        self._oneshot = report.to_dict()
        return pruned

    def callbacks(self, plan: FinetunePlan) -> list:
        from keras_lean.sparsity.oneshot import HoldZeros

        if not self.options.finetune or not self._oneshot:
            return []
        return [HoldZeros([layer["name"] for layer in self._oneshot["layers"]])]

    def finetune(self, model, data, plan, fit):
        """No fine-tuning with `finetune: false` (the one-shot model is kept as is)."""
        return None if self.options.finetune else model

    def finalize(self, model: keras.Model) -> keras.Model:
        """The model as it is (no wrapper was added); records its measured sparsity."""
        from keras_lean.sparsity import sparsity_report

        rep = sparsity_report(model)
        self._final = {
            "sparsity": rep.sparsity,
            "layers": {row.name: row.sparsity for row in rep.layers},
        }
        return model

    def report(self) -> dict:
        out: dict[str, Any] = {
            "criterion": self.options.criterion,
            "sparsity": self.options.sparsity,
            "m_by_n": list(self.options.m_by_n) if self.options.m_by_n else None,
            "finetune": self.options.finetune,
        }
        if not self.options.finetune:
            out["epochs_run"] = 0
        if self._oneshot is not None:
            out["oneshot"] = self._oneshot
        if self._final is not None:
            out["final"] = self._final
        return out

    @classmethod
    def report_lines(cls, report: dict) -> list[str]:
        shot = report.get("oneshot") or {}
        if not shot:
            return []
        pattern = report.get("m_by_n")
        target = f"{pattern[0]}:{pattern[1]}" if pattern else f"{report.get('sparsity', 0):.0%}"
        errors = [r["relative_error"] for r in shot.get("layers", []) if r.get("relative_error")]
        line = (
            f"one-shot {report.get('criterion')} {target}: {len(shot.get('layers', []))} "
            f"projections, sparsity {shot.get('sparsity', 0):.1%}"
        )
        if errors:
            line += f", mean reconstruction error {sum(errors) / len(errors):.3f}"
        return [line + ("" if report.get("finetune", True) else " (not fine-tuned)")]


def _names(layer) -> list[str]:
    from keras_lean._keras_internals import layer_kernel

    path = layer_kernel(layer).path
    return [layer.name, path, *path.split("/")]


def _first(x, count: int):
    if isinstance(x, dict):
        return {k: v[:count] for k, v in x.items()}
    return x[:count]
