"""Recipe method `structured`: remove whole channels, neurons and heads; deploy a smaller model.

Recipe section (all keys optional)::

    structured:
      ratio: 0.5            # fraction of every channel group removed, in [0, 1)
      importance: l1        # l1 | l2 | bn_gamma | taylor
      mode: gradual         # gradual (masks during fine-tuning, shrink at deploy) | oneshot
      schedule: {kind: polynomial, begin: 0.0, end: 0.7, unit: fraction, frequency: 10, power: 3}
      round_to: 1           # surviving widths are multiples of this (e.g. 8), or auto
      min_channels: 1       # minimum surviving width per group
      exclude: []           # layer-name patterns (fnmatch) whose widths are kept
      global_ranking: false # rank channels of all layers together
      taylor_batches: 4     # batches of training data for importance: taylor

The schedule has the same format as `magnitude`'s (`initial_sparsity` is the fraction removed at
`begin`). In `oneshot` mode the model is rebuilt smaller in `prepare` and fine-tuned as is; in
`gradual` mode `prepare` adds schedule-driven group masks and `finalize` shrinks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

# Imported for its registrations: a fine-tuned model holding the gradual mask layers must load
# (`keras.models.load_model`, no custom_objects) wherever this method is resolved, e.g. at deploy.
import keras_lean.structured.masks  # noqa: F401
from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method, classification_loss
from keras_lean.pipeline.methods.magnitude import ScheduleOptions
from keras_lean.pipeline.recipe import _number, check_keys

if TYPE_CHECKING:  # pragma: no cover
    import keras

_MODES = ("gradual", "oneshot")
_IMPORTANCE = ("l1", "l2", "bn_gamma", "taylor")


@dataclasses.dataclass(frozen=True)
class StructuredOptions:
    """Options of the `structured` recipe method.

    Attributes:
        version: format version of this section (1).
        ratio: fraction of the channels of every group removed (of all channels with
            `global_ranking`), in [0, 1).
        importance: `l1`, `l2`, `bn_gamma` or `taylor` (Taylor uses `taylor_batches` batches of
            the training data and the loss `sparse_categorical_crossentropy` on logits or
            probabilities, as the pipeline's models output).
        mode: `gradual` (masks during fine-tuning, physical removal at deploy) or `oneshot`
            (rebuild smaller before fine-tuning).
        schedule: how the removed fraction grows during a gradual fine-tune (`ScheduleOptions`).
        round_to: surviving widths are multiples of this (>= 1), or `"auto"`: the float32
            vector lanes of the CPU that prunes (16 with AVX-512; `structured.simd_lanes`),
            resolved when the model is pruned and recorded in the report.
        min_channels: minimum surviving width of a group (>= 1).
        exclude: layer-name patterns (fnmatch) whose widths are kept.
        global_ranking: rank channels of all groups together.
        taylor_batches: batches averaged by `importance: taylor` (>= 1).
    """

    version: int = 1
    ratio: float = 0.5
    importance: str = "l1"
    mode: str = "gradual"
    schedule: ScheduleOptions = dataclasses.field(default_factory=ScheduleOptions)
    round_to: int | str = 1
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    global_ranking: bool = False
    taylor_batches: int = 4

    def __post_init__(self):
        p = "structured"
        if self.version != 1:
            raise ValueError(f"{p}.version must be 1. Received: version={self.version!r}")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"{p}.ratio must be in [0, 1). Received: ratio={self.ratio!r}")
        if self.importance not in _IMPORTANCE:
            raise ValueError(
                f"{p}.importance must be one of {', '.join(_IMPORTANCE)}. "
                f"Received: importance={self.importance!r}"
            )
        if self.mode not in _MODES:
            raise ValueError(
                f"{p}.mode must be one of {', '.join(_MODES)}. Received: mode={self.mode!r}"
            )
        for name in ("round_to", "min_channels", "taylor_batches"):
            v = getattr(self, name)
            if name == "round_to" and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                also = ' or "auto"' if name == "round_to" else ""
                raise ValueError(
                    f"{p}.{name} must be an integer >= 1{also}. Received: {name}={v!r}"
                )
        if not isinstance(self.global_ranking, bool):
            raise ValueError(
                f"{p}.global_ranking must be true or false. "
                f"Received: global_ranking={self.global_ranking!r}"
            )
        exclude = self.exclude
        if isinstance(exclude, str):
            exclude = (exclude,)
        if not isinstance(exclude, list | tuple) or not all(isinstance(e, str) for e in exclude):
            raise ValueError(
                f"{p}.exclude must be a list of layer-name patterns. Received: exclude={exclude!r}"
            )
        object.__setattr__(self, "exclude", tuple(exclude))

    @classmethod
    def from_dict(cls, d: Any, path: str = "structured") -> StructuredOptions:
        """Parses the recipe section; unknown keys raise ValueError naming `structured.<key>`."""
        if d is None:
            return cls()
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        for name in ("importance", "mode"):
            if name in d:
                kw[name] = str(d[name])
        if "ratio" in d:
            kw["ratio"] = _number(d["ratio"], f"{path}.ratio")
        for name in ("version", "round_to", "min_channels", "taylor_batches"):
            if name in d:
                if name == "round_to" and isinstance(d[name], str):  # "auto", else an error
                    kw[name] = d[name].strip().lower()
                else:
                    kw[name] = _number(d[name], f"{path}.{name}", kind=int)
        if "global_ranking" in d:
            kw["global_ranking"] = d["global_ranking"]
        if "exclude" in d:
            kw["exclude"] = d["exclude"] if d["exclude"] is not None else ()
        if "schedule" in d:
            kw["schedule"] = ScheduleOptions.from_dict(d["schedule"] or {}, f"{path}.schedule")
        return cls(**kw)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["schedule"] = self.schedule.to_dict()
        data["exclude"] = list(self.exclude)
        return data


class StructuredMethod(Method):
    """Structured pruning: gradual group masks then `shrink`, or a one-shot rebuild."""

    name = "structured"
    order = 10
    options_class = StructuredOptions

    def __init__(self, options: StructuredOptions):
        super().__init__(options)
        self._original = None
        self._steps: tuple[int, int, int] | None = None
        self._report: dict | None = None
        self._round_to: int | None = None

    def _schedule(self, plan: FinetunePlan):
        from keras_lean.sparsity.schedules import ConstantSparsity, PolynomialDecay

        s = self.options.schedule
        begin, end, freq = self._steps = s.steps(plan.total_steps)
        if s.kind == "constant":
            return ConstantSparsity(
                self.options.ratio, begin_step=begin, end_step=end, frequency=freq
            )
        return PolynomialDecay(
            initial_sparsity=min(s.initial_sparsity, self.options.ratio),
            final_sparsity=self.options.ratio,
            begin_step=begin,
            end_step=end,
            power=s.power,
            frequency=freq,
        )

    def prepare(self, model: keras.Model, data: Data, plan: FinetunePlan) -> keras.Model:
        from keras_lean.structured import (
            prune_structured,
            prune_structured_gradually,
            resolve_round_to,
        )

        o = self.options
        self._original = model
        self._round_to = resolve_round_to(o.round_to)
        kwargs: dict[str, Any] = dict(
            round_to=self._round_to,
            min_channels=o.min_channels,
            exclude=o.exclude,
            global_ranking=o.global_ranking,
            taylor_batches=o.taylor_batches,
            batch_size=plan.batch_size,
        )
        if o.importance == "taylor":
            kwargs["data"] = (data.x_train, data.y_train)
            kwargs["loss"] = classification_loss(model)
        if o.mode == "oneshot":
            return prune_structured(model, o.ratio, o.importance, **kwargs)
        return prune_structured_gradually(model, self._schedule(plan), o.importance, **kwargs)

    def finalize(self, model: keras.Model) -> keras.Model:
        from keras_lean.structured import shrink, structure_report

        small = shrink(model)
        if self._original is not None:
            report = structure_report(self._original, small, exclude=self.options.exclude)
            self._report = report.to_dict()
        return small

    def report(self) -> dict:
        out: dict[str, Any] = {"options": self.options.to_dict()}
        if self._round_to is not None:
            out["round_to"] = self._round_to  # resolved: "auto" becomes this CPU's lanes
        if self._steps is not None:
            begin, end, freq = self._steps
            out["schedule_steps"] = {"begin_step": begin, "end_step": end, "frequency": freq}
        if self._report is not None:
            out["structure"] = self._report
        return out
