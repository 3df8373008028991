"""Recipe methods `magnitude` and `movement`: gradual unstructured / N:M / block pruning.

Both wrap the chosen layers with `keras_lean.sparsity.prune_low_magnitude` before fine-tuning
(the masks update inside the compiled train step, so no callback is needed) and strip the
wrappers at deploy. They differ only in the criterion that ranks weights: magnitude |w|, or
movement (Sanh et al., 2020: scores accumulate -w x dL/dw during fine-tuning).

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
from keras_lean.pipeline.recipe import _number, check_keys

if TYPE_CHECKING:  # pragma: no cover
    import keras

_SCHEDULE_KINDS = ("polynomial", "constant")
_UNITS = ("fraction", "steps")
_POOLING = ("AVG", "MAX")
_PRUNING_METHODS = ("magnitude", "movement")
# Methods whose final step would undo or redo what this one does.
_CONFLICTS = {
    "lora": "merging LoRA adapters adds a dense update that destroys the sparsity",
    "lottery": "lottery ticket search prunes by magnitude itself, in rounds",
}


def _pair(value: Any, path: str, *, allow_none: bool) -> tuple[int, int] | None:
    if value is None and allow_none:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(
            f"{path} must be a pair of ints [a, b]{' or null' if allow_none else ''}. "
            f"Received: {path.split('.')[-1]}={value!r}"
        )
    return (int(value[0]), int(value[1]))


def _sparsity(value: float, path: str) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"{path} must be in [0, 1). Received: {path.split('.')[-1]}={value!r}")
    return value


def _patterns(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(
            f"{path} must be a list of layer-name patterns. Received: "
            f"{path.split('.')[-1]}={value!r}"
        )
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class ScheduleOptions:
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

    kind: str = "polynomial"
    initial_sparsity: float = 0.0
    begin: float = 0.0
    end: float = 0.7
    unit: str = "fraction"
    frequency: int = 10
    power: float = 3.0

    def __post_init__(self):
        p = "schedule"
        if self.kind not in _SCHEDULE_KINDS:
            raise ValueError(
                f"{p}.kind must be one of {', '.join(_SCHEDULE_KINDS)}. "
                f"Received: kind={self.kind!r}"
            )
        if self.unit not in _UNITS:
            raise ValueError(
                f"{p}.unit must be one of {', '.join(_UNITS)}. Received: unit={self.unit!r}"
            )
        _sparsity(self.initial_sparsity, f"{p}.initial_sparsity")
        if self.frequency < 1:
            raise ValueError(f"{p}.frequency must be >= 1. Received: frequency={self.frequency}")
        if not self.power > 0:
            raise ValueError(f"{p}.power must be > 0. Received: power={self.power}")
        if self.unit == "fraction":
            for name in ("begin", "end"):
                v = getattr(self, name)
                if not 0 <= v <= 1:
                    raise ValueError(
                        f"{p}.{name} must be in [0, 1] with unit: fraction. Received: {name}={v}"
                    )
        else:
            for name in ("begin", "end"):
                v = getattr(self, name)
                if v < 0 or not float(v).is_integer():
                    raise ValueError(
                        f"{p}.{name} must be a step number >= 0 with unit: steps. "
                        f"Received: {name}={v}"
                    )
        if self.end <= self.begin:
            raise ValueError(
                f"{p}.end must be after {p}.begin. Received: begin={self.begin}, end={self.end}"
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, path: str = "schedule") -> ScheduleOptions:
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        for name in ("kind", "unit"):
            if name in d:
                kw[name] = str(d[name])
        for name in ("initial_sparsity", "begin", "end", "power"):
            if name in d:
                kw[name] = _number(d[name], f"{path}.{name}")
        if "frequency" in d:
            kw["frequency"] = _number(d["frequency"], f"{path}.frequency", kind=int)
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(str(e).replace("schedule.", f"{path}.", 1)) from e


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Per-layer settings that replace the section's for layers matching a pattern.

    Attributes:
        target_sparsity: this layer's final sparsity, in [0, 1).
        m_by_n: this layer's N:M pattern, or None.
        block_size: this layer's block size.
        block_pooling: this layer's block pooling.
    """

    target_sparsity: float | None = None
    m_by_n: tuple[int, int] | None = None
    block_size: tuple[int, int] | None = None
    block_pooling: str | None = None

    def to_dict(self) -> dict:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
            if v is not None
        }

    @classmethod
    def from_dict(cls, d: Any, path: str) -> LayerOverride:
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        if "target_sparsity" in d:
            kw["target_sparsity"] = _sparsity(
                _number(d["target_sparsity"], f"{path}.target_sparsity"), f"{path}.target_sparsity"
            )
        if "m_by_n" in d:
            kw["m_by_n"] = _pair(d["m_by_n"], f"{path}.m_by_n", allow_none=True)
        if "block_size" in d:
            kw["block_size"] = _pair(d["block_size"], f"{path}.block_size", allow_none=False)
        if "block_pooling" in d:
            kw["block_pooling"] = _pooling(d["block_pooling"], f"{path}.block_pooling")
        return cls(**kw)


def _pooling(value: Any, path: str) -> str:
    v = str(value).upper()
    if v not in _POOLING:
        raise ValueError(
            f"{path} must be one of {', '.join(_POOLING)}. Received: block_pooling={value!r}"
        )
    return v


@dataclasses.dataclass(frozen=True)
class PruningOptions:
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

    FIELD_COMMENTS: ClassVar[dict[str, str]] = {
        "target_sparsity": "final fraction of zeros in each pruned layer, in [0, 1)",
        "schedule": "how sparsity grows over fine-tuning",
        "m_by_n": "null, or [m, n]: m zeros in every n weights along the input axis",
        "block_size": "[rows, cols] of weight blocks pruned together",
        "block_pooling": "AVG | MAX",
        "include": "layer-name patterns to prune ('*' = every prunable layer)",
        "exclude": "layer-name patterns to leave dense",
        "overrides": "{pattern: {target_sparsity, m_by_n, block_size, block_pooling}}",
    }

    target_sparsity: float = 0.8
    schedule: ScheduleOptions = dataclasses.field(default_factory=ScheduleOptions)
    m_by_n: tuple[int, int] | None = None
    block_size: tuple[int, int] = (1, 1)
    block_pooling: str = "AVG"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, LayerOverride] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _sparsity(self.target_sparsity, "target_sparsity")
        if self.m_by_n is not None:
            m, n = self.m_by_n
            if not (0 < m < n):
                raise ValueError(
                    f"m_by_n must be [m, n] with 0 < m < n. Received: m_by_n={list(self.m_by_n)}"
                )
        if min(self.block_size) < 1:
            raise ValueError(
                f"block_size entries must be >= 1. Received: block_size={list(self.block_size)}"
            )
        if self.m_by_n is not None and tuple(self.block_size) != (1, 1):
            raise ValueError(
                "m_by_n and block_size cannot be combined. Received: "
                f"m_by_n={list(self.m_by_n)}, block_size={list(self.block_size)}"
            )
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def to_dict(self) -> dict:
        return {
            "target_sparsity": self.target_sparsity,
            "schedule": self.schedule.to_dict(),
            "m_by_n": None if self.m_by_n is None else list(self.m_by_n),
            "block_size": list(self.block_size),
            "block_pooling": self.block_pooling,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "recipe.magnitude") -> PruningOptions:
        """Parses a recipe section; errors name the key path under `path`."""
        if d is None:
            d = {}
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        if "target_sparsity" in d:
            kw["target_sparsity"] = _sparsity(
                _number(d["target_sparsity"], f"{path}.target_sparsity"), f"{path}.target_sparsity"
            )
        if "schedule" in d:
            kw["schedule"] = ScheduleOptions.from_dict(d["schedule"] or {}, f"{path}.schedule")
        if "m_by_n" in d:
            kw["m_by_n"] = _pair(d["m_by_n"], f"{path}.m_by_n", allow_none=True)
        if "block_size" in d:
            kw["block_size"] = _pair(d["block_size"], f"{path}.block_size", allow_none=False)
        if "block_pooling" in d:
            kw["block_pooling"] = _pooling(d["block_pooling"], f"{path}.block_pooling")
        for name in ("include", "exclude"):
            if name in d:
                kw[name] = _patterns(d[name] if d[name] is not None else [], f"{path}.{name}")
        if "overrides" in d:
            ov = d["overrides"] or {}
            if not isinstance(ov, Mapping):
                raise ValueError(
                    f"{path}.overrides must be a mapping {{pattern: {{...}}}}. Received: {ov!r}"
                )
            kw["overrides"] = {
                str(k): LayerOverride.from_dict(v or {}, f"{path}.overrides.{k}")
                for k, v in ov.items()
            }
        try:
            return cls(**kw)
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(path) else f"{path}.{msg}") from e


class MagnitudeMethod(Method):
    """Gradual magnitude pruning (Zhu & Gupta, 2017), as TFMOT's `prune_low_magnitude`."""

    name: ClassVar[str] = "magnitude"
    order: ClassVar[int] = 30
    options_class: ClassVar[type] = PruningOptions
    criterion: ClassVar[str] = "magnitude"

    def __init__(self, options: PruningOptions):
        if not isinstance(options, PruningOptions):
            raise TypeError(
                f"{self.name} options must be PruningOptions. Received: {type(options).__name__}"
            )
        super().__init__(options)
        self._steps: tuple[int, int, int] | None = None
        self._layers: dict[str, dict] = {}
        self._final: dict | None = None

    @classmethod
    def check_combination(cls, names: list[str]) -> None:
        others = [n for n in _PRUNING_METHODS if n != cls.name and n in names]
        if others:
            raise ValueError(
                f"recipe.methods: {cls.name!r} and {others[0]!r} both prune unstructured "
                f"weights; choose one."
            )
        for other, why in _CONFLICTS.items():
            if other in names:
                raise ValueError(
                    f"recipe.methods: {cls.name!r} cannot be combined with {other!r}: {why}."
                )

    def _schedule(self, target: float, plan: FinetunePlan):
        from keras_lean.sparsity.schedules import ConstantSparsity, PolynomialDecay

        begin, end, freq = self._steps or self.options.schedule.steps(plan.total_steps)
        s = self.options.schedule
        if s.kind == "constant":
            return ConstantSparsity(target, begin_step=begin, end_step=end, frequency=freq)
        initial = min(s.initial_sparsity, target)
        return PolynomialDecay(
            initial_sparsity=initial,
            final_sparsity=target,
            begin_step=begin,
            end_step=end,
            power=s.power,
            frequency=freq,
        )

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
        path = f"recipe.{self.name}"
        for key, patterns in (("include", o.include), ("exclude", o.exclude)):
            for p in patterns:
                if not any(fnmatch.fnmatchcase(n, p) for n in names):
                    raise ValueError(
                        f"{path}.{key}: pattern {p!r} matches no layer of the model. "
                        f"Layers: {', '.join(names)}"
                    )
        for p in o.overrides:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(
                    f"{path}.overrides: pattern {p!r} matches no layer of the model. "
                    f"Layers: {', '.join(names)}"
                )
        chosen: dict[str, dict] = {}
        for layer in layers:
            n = layer.name
            if not any(fnmatch.fnmatchcase(n, p) for p in o.include):
                continue
            if any(fnmatch.fnmatchcase(n, p) for p in o.exclude):
                continue
            if not is_prunable(layer):
                if n in o.include:  # named explicitly, not through a wildcard
                    raise ValueError(
                        f"{path}.include names layer {n!r} of type {type(layer).__name__}, "
                        f"which cannot be pruned."
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
            raise ValueError(
                f"{path}: no prunable layer selected by include={list(o.include)}, "
                f"exclude={list(o.exclude)}. Layers: {', '.join(names)}"
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


class MovementMethod(MagnitudeMethod):
    """Movement pruning (Sanh et al., 2020): keep the weights moving away from zero."""

    name: ClassVar[str] = "movement"
    criterion: ClassVar[str] = "movement"


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
