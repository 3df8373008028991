"""Recipe methods `magnitude` and `movement`: gradual unstructured / N:M / block pruning.

Both wrap the chosen layers with `keras_lean.sparsity.prune_low_magnitude` before fine-tuning
(the masks update inside the compiled train step, so no callback is needed) and strip the
wrappers at deploy. They differ in the criterion that ranks weights: magnitude |w|, or the top-k
of scores learned through a straight-through estimator (movement, Sanh et al., 2020; see
`keras_lean.sparsity.movement`). `soft_movement.py` builds the soft variant on `movement`.

Recipe section (all keys optional)::

    magnitude:
      target_sparsity: 0.8
      schedule: {kind: polynomial, initial_sparsity: 0.0, begin: 0.0, end: 0.7, unit: fraction,
                 frequency: 10, power: 3}
      m_by_n: null          # e.g. [2, 4]: at least 2 zeros in every 4 weights along the input axis
      block_size: [1, 1]
      block_pooling: AVG
      include: ["*"]
      exclude: []
      overrides: {dense1: {target_sparsity: 0.9}}
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
    Choice,
    Float,
    Int,
    Nested,
    NestedMap,
    Optional,
    Pair,
    Patterns,
    RecipeError,
    Section,
    option,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras

_SPARSITY = Float(min=0, lt=1)
_POOLING = Choice("AVG", "MAX", normalize=str.upper)


@dataclasses.dataclass(frozen=True)
class ScheduleOptions(Section):
    """When sparsity grows during fine-tuning.

    Attributes:
        kind: `polynomial` (sparsity rises from `initial_sparsity` to the target between
            `begin` and `end` along a cubic curve, TFMOT's PolynomialDecay) or `constant`
            (the target from `begin` on, TFMOT's ConstantSparsity).
        initial_sparsity: sparsity at `begin` for `polynomial`, in [0, 1).
        begin: when pruning starts: a fraction of the fine-tune steps in [0, 1] (`unit:
            fraction`) or a step number (`unit: steps`).
        end: when the target is reached (after `begin`), same unit. The end step is aligned to
            a pruning step (`begin + k x frequency`) so the target is reached exactly.
        unit: `fraction` or `steps`.
        frequency: steps between mask updates (>= 1).
        power: exponent of the polynomial (> 0).
    """

    kind: str = option("polynomial", Choice("polynomial", "constant"), "polynomial | constant")
    initial_sparsity: float = option(0.0, _SPARSITY, "polynomial: sparsity at begin, in [0, 1)")
    begin: float = option(0.0, Float(min=0), "when pruning starts (a fraction or a step, see unit)")
    end: float = option(0.7, Float(min=0), "when the target is reached (after begin, same unit)")
    unit: str = option("fraction", Choice("fraction", "steps"), "fraction | steps")
    frequency: int = option(10, Int(min=1), "steps between mask updates")
    power: float = option(3.0, Float(gt=0), "polynomial exponent (3: Zhu & Gupta's cubic)")

    def check(self) -> None:
        for name in ("begin", "end"):
            v = getattr(self, name)
            if self.unit == "fraction" and not 0 <= v <= 1:
                raise RecipeError(name, f"must be in [0, 1] with unit: fraction. Received: {v:g}")
            if self.unit == "steps" and not float(v).is_integer():
                raise RecipeError(
                    name, f"must be a step number >= 0 with unit: steps. Received: {v:g}"
                )
        if self.end <= self.begin:
            raise RecipeError(
                "end", f"must be after begin. Received: begin={self.begin:g}, end={self.end:g}"
            )

    def steps(self, total_steps: int) -> tuple[int, int, int]:
        """Returns (begin_step, end_step, frequency) for a fine-tune of `total_steps` steps.

        The end step is moved to the pruning step nearest the requested end (never past the last
        step), so the schedule's final mask update happens and reaches the target.
        """
        last = max(total_steps - 1, 0)
        if self.unit == "fraction":
            begin = int(round(self.begin * last))
            end = int(round(self.end * last))
        else:
            begin, end = int(self.begin), int(self.end)
        begin = min(begin, last)
        freq = self.frequency
        span = max(end - begin, 1)
        k = max(1, round(span / freq))
        while k > 1 and begin + k * freq > last:
            k -= 1
        if begin + k * freq > last:
            # Too short for even one interval of `frequency`: shrink it to fit.
            freq = max(1, last - begin)
            k = 1
        return begin, begin + k * freq, freq

    def build(self, target: float, plan: FinetunePlan, steps: tuple[int, int, int] | None = None):
        """The sparsity schedule (`keras_lean.sparsity.schedules`) reaching `target`."""
        from keras_lean.sparsity.schedules import ConstantSparsity, PolynomialDecay

        begin, end, freq = steps or self.steps(plan.total_steps)
        if self.kind == "constant":
            return ConstantSparsity(target, begin_step=begin, end_step=end, frequency=freq)
        return PolynomialDecay(
            initial_sparsity=min(self.initial_sparsity, target),
            final_sparsity=target,
            begin_step=begin,
            end_step=end,
            power=self.power,
            frequency=freq,
        )


@dataclasses.dataclass(frozen=True)
class LayerOverride(Section):
    """Per-layer settings that replace the section's for layers matching a pattern.

    Attributes:
        target_sparsity: this layer's final sparsity, in [0, 1).
        m_by_n: this layer's N:M pattern, or None.
        block_size: this layer's block size.
        block_pooling: this layer's block pooling.
    """

    target_sparsity: float | None = option(None, Optional(_SPARSITY), "this layer's sparsity")
    m_by_n: tuple[int, int] | None = option(None, Pair(optional=True), "this layer's [m, n]")
    block_size: tuple[int, int] | None = option(None, Pair(optional=True), "this layer's block")
    block_pooling: str | None = option(None, Optional(_POOLING), "this layer's AVG | MAX")

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclasses.dataclass(frozen=True)
class PruningOptions(Section):
    """Options of the `magnitude` and `movement` recipe sections.

    Attributes:
        target_sparsity: final fraction of zero weights in each pruned layer, in [0, 1).
        schedule: see `ScheduleOptions`.
        m_by_n: `[m, n]`: at least m zeros in every n consecutive weights along the input axis
            (e.g. `[2, 4]`), or null.
        block_size: `[rows, cols]` of the weight blocks pruned together (2-D kernels).
        block_pooling: `AVG` or `MAX`: how a block's magnitude is pooled.
        include: layer-name patterns (fnmatch) of the layers to prune; `*` is every prunable
            layer. A pattern without wildcards must name a prunable layer.
        exclude: patterns of layers left dense.
        overrides: `{pattern: {target_sparsity, m_by_n, block_size, block_pooling}}` per-layer
            settings; the first matching pattern wins.
    """

    target_sparsity: float = option(
        0.8, _SPARSITY, "final fraction of zeros in each pruned layer, in [0, 1)"
    )
    schedule: ScheduleOptions = option(
        kind=Nested(ScheduleOptions),
        comment="how sparsity grows over fine-tuning",
        default_factory=ScheduleOptions,
    )
    m_by_n: tuple[int, int] | None = option(
        None,
        Pair(optional=True),
        "null, or [m, n]: m zeros in every n weights along the input axis",
    )
    block_size: tuple[int, int] = option(
        (1, 1), Pair(), "[rows, cols] of weight blocks pruned together"
    )
    block_pooling: str = option("AVG", _POOLING, "AVG | MAX: how a block's magnitude is pooled")
    include: tuple[str, ...] = option(
        ("*",), Patterns(), "layer-name patterns to prune ('*' = every prunable layer)"
    )
    exclude: tuple[str, ...] = option((), Patterns(), "layer-name patterns to leave dense")
    overrides: Mapping[str, LayerOverride] = option(
        kind=NestedMap(LayerOverride),
        comment="{pattern: {target_sparsity, m_by_n, block_size, block_pooling}}",
        default_factory=dict,
    )

    def check(self) -> None:
        if self.m_by_n is not None:
            m, n = self.m_by_n
            if not m < n:
                raise RecipeError(
                    "m_by_n", f"must be [m, n] with 0 < m < n. Received: {list(self.m_by_n)}"
                )
            if tuple(self.block_size) != (1, 1):
                raise RecipeError(
                    "m_by_n",
                    f"cannot be combined with block_size. Received: m_by_n={list(self.m_by_n)}, "
                    f"block_size={list(self.block_size)}",
                )

    def criterion_options(self) -> dict:
        """Extra `prune_low_magnitude` arguments of the criterion (none for magnitude)."""
        return {}


_MOVEMENT_DEFAULT = "null: keras_lean.sparsity.movement.DEFAULTS"


@dataclasses.dataclass(frozen=True)
class MovementOptions(PruningOptions):
    """Options of the `movement` section: `PruningOptions` plus the learned scores'.

    Attributes:
        score_lr_multiplier: the scores learn at this multiple of the fine-tune learning rate
            (> 0); null is the documented default (`keras_lean.sparsity.movement.DEFAULTS`).
        score_init: `magnitude` (scores start at |w| / mean|w|) or `zeros` (the paper's);
            null is the documented default.
    """

    score_lr_multiplier: float | None = option(
        None, Optional(Float(gt=0)), f"scores' lr = this x the fine-tune lr ({_MOVEMENT_DEFAULT})"
    )
    score_init: str | None = option(
        None, Optional(Choice("magnitude", "zeros")), f"magnitude | zeros ({_MOVEMENT_DEFAULT})"
    )

    def criterion_options(self) -> dict:
        names = ("score_lr_multiplier", "score_init")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


#: Why an unstructured pruning method cannot be combined with these (the other side declares
#: nothing: `Method.conflict_with` looks both ways).
_CONFLICTS = {
    "lottery": "lottery ticket search prunes by magnitude itself, in rounds",
}


@register_method
class MagnitudeMethod(Method):
    """Gradual magnitude pruning (Zhu & Gupta, 2017), as TFMOT's `prune_low_magnitude`."""

    name: ClassVar[str] = "magnitude"
    order: ClassVar[int] = 30
    options_class: ClassVar[type] = PruningOptions
    criterion: ClassVar[str] = "magnitude"
    conflicts: ClassVar[Mapping[str, str]] = MappingProxyType(
        {**_CONFLICTS, "movement": "both prune unstructured weights; choose one"}
    )
    guard_stageable: ClassVar[bool] = True
    target_option: ClassVar[str | None] = "target_sparsity"
    target_help: ClassVar[str] = "final fraction of zero weights in each pruned layer, in [0, 1)"
    sweep_targets: ClassVar[tuple[float, ...]] = (0.5, 0.7, 0.8, 0.9)
    state_attributes: ClassVar[tuple[str, ...]] = ("_steps", "_layers", "_final")

    def __init__(self, options: PruningOptions):
        super().__init__(options)
        self._steps: tuple[int, int, int] | None = None
        self._layers: dict[str, dict] = {}
        self._final: dict | None = None

    @classmethod
    def check_guard(cls, options: PruningOptions) -> None:
        if options.m_by_n is not None:
            raise RecipeError(
                f"{cls.name}.m_by_n",
                "cannot be combined with guard.stages (N:M fixes the sparsity at m/n). "
                "Remove one of them.",
            )
        for pattern, override in options.overrides.items():
            if override.target_sparsity is not None:
                raise RecipeError(
                    f"{cls.name}.overrides.{pattern}.target_sparsity",
                    "cannot be combined with guard.stages, which replaces target_sparsity. "
                    "Remove one of them.",
                )

    def stage(self, target: float, previous: float) -> Method:
        """A copy pruning from `previous` to `target`: its schedule starts at `previous`."""
        o = self.options
        initial = min(max(previous, o.schedule.initial_sparsity), target)
        schedule = dataclasses.replace(o.schedule, initial_sparsity=initial)
        return type(self)(dataclasses.replace(o, target_sparsity=target, schedule=schedule))

    def pruning_end_step(self, plan: FinetunePlan) -> int | None:
        """The schedule's end step: the last mask update, which reaches `target_sparsity`."""
        return self.options.schedule.steps(plan.total_steps)[1]

    def _schedule(self, target: float, plan: FinetunePlan):
        return self.options.schedule.build(target, plan, self._steps)

    def layer_settings(self, model: keras.Model, plan: FinetunePlan) -> dict[str, dict]:
        """Returns {layer name: prune_low_magnitude overrides} for the layers this recipe prunes.

        Raises:
            ValueError: a pattern matches no layer, or a pattern without wildcards names a layer
                that cannot be pruned.
        """
        from keras_lean.sparsity import is_prunable

        o = self.options
        layers = list(_walk(model))
        names = [layer.name for layer in layers]
        check_patterns(self.name, names, include=o.include, exclude=o.exclude)
        check_patterns(self.name, names, overrides=tuple(o.overrides))
        chosen: dict[str, dict] = {}
        for layer in layers:
            n = layer.name
            if not any(fnmatch.fnmatchcase(n, p) for p in o.include):
                continue
            if any(fnmatch.fnmatchcase(n, p) for p in o.exclude):
                continue
            if not is_prunable(layer):
                if n in o.include:  # named explicitly, not through a wildcard
                    raise RecipeError(
                        f"{self.name}.include",
                        f"names layer {n!r} of type {type(layer).__name__}, which cannot be "
                        f"pruned.",
                    )
                continue
            settings = {
                "target_sparsity": o.target_sparsity,
                "m_by_n": o.m_by_n,
                "block_size": o.block_size,
                "block_pooling": o.block_pooling,
            }
            for p, override in o.overrides.items():
                if fnmatch.fnmatchcase(n, p):
                    settings.update(
                        {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
                    )
                    break
            chosen[n] = settings
        if not chosen:
            raise RecipeError(
                self.name,
                f"no prunable layer selected by include={list(o.include)}, "
                f"exclude={list(o.exclude)}. Layers: {', '.join(names)}",
            )
        return chosen

    def prepare(self, model: keras.Model, data: Data, plan: FinetunePlan) -> keras.Model:
        from keras_lean.sparsity import prune_low_magnitude

        self._steps = self.options.schedule.steps(plan.total_steps)
        self._layers = self.layer_settings(model, plan)
        schedules = {}

        def filters(layer):
            s = self._layers.get(layer.name)
            if s is None:
                return None
            target = s["target_sparsity"]
            if target not in schedules:
                schedules[target] = self._schedule(target, plan)
            return {
                "pruning_schedule": schedules[target],
                "sparsity_m_by_n": s["m_by_n"],
                "block_size": tuple(s["block_size"]),
                "block_pooling_type": s["block_pooling"],
                "criterion": self.criterion,
                **self.options.criterion_options(),
            }

        return prune_low_magnitude(model, filters=filters)

    def finalize(self, model: keras.Model) -> keras.Model:
        stripped, self._final = strip_and_measure(model)
        return stripped

    def report(self) -> dict:
        out: dict[str, Any] = {
            "criterion": self.criterion,
            "target_sparsity": self.options.target_sparsity,
        }
        if self._steps is not None:
            begin, end, freq = self._steps
            out["schedule"] = {
                "kind": self.options.schedule.kind,
                "begin_step": begin,
                "end_step": end,
                "frequency": freq,
            }
        if self._layers:
            out["pruned_layers"] = {
                n: {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
                for n, s in self._layers.items()
            }
        if self._final is not None:
            out["final"] = self._final
        return out


@register_method
class MovementMethod(MagnitudeMethod):
    """Movement pruning (Sanh et al., 2020): top-k of scores learned straight-through."""

    name: ClassVar[str] = "movement"
    options_class: ClassVar[type] = MovementOptions
    criterion: ClassVar[str] = "movement"
    conflicts: ClassVar[Mapping[str, str]] = MappingProxyType(
        {**_CONFLICTS, "magnitude": "both prune unstructured weights; choose one"}
    )

    def __init__(self, options: PruningOptions):
        if type(options) is PruningOptions:  # callers from before the movement options
            shared = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
            options = self.options_class(**shared)
        super().__init__(options)

    def report(self) -> dict:
        from keras_lean.sparsity.movement import MovementSettings

        settings = MovementSettings.resolve(self.criterion, **self.options.criterion_options())
        return {**super().report(), "movement": dataclasses.asdict(settings)}


def check_patterns(method: str, names: list[str], **patterns: tuple[str, ...]) -> None:
    """Raises RecipeError (`<method>.<key>`) for a layer-name pattern matching none of `names`."""
    for key, values in patterns.items():
        for p in values:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise RecipeError(
                    f"{method}.{key}",
                    f"pattern {p!r} matches no layer of the model. Layers: {', '.join(names)}",
                )


def _walk(model) -> list:
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_walk(layer))
        else:
            out.append(layer)
    return out


def strip_and_measure(model: keras.Model) -> tuple[keras.Model, dict]:
    """Strips the pruning wrappers; returns the plain model and its measured sparsity (total and
    per layer), the `final` entry of a pruning method's report."""
    from keras_lean.sparsity import sparsity_report, strip_pruning

    stripped = strip_pruning(model)
    rep = sparsity_report(stripped)
    return stripped, {
        "sparsity": rep.sparsity,
        "layers": {row.name: row.sparsity for row in rep.layers},
    }
