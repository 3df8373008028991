"""Recipe method `lottery`: lottery-ticket search by iterative magnitude pruning with rewinding.

The method owns the fine-tune loop (`Method.finetune`): it runs
`keras_lean.sparsity.find_lottery_ticket` from the baseline. Round 0 trains the dense model
(recording its weights at `rewind_step`); every later round removes `rate` of the surviving
weights by magnitude, rewinds the survivors to their `rewind_step` values and retrains with a
fresh optimizer. The result is the sparse model trained from the rewound weights; deploy strips
the wrappers (zeros in place). Each round's sparsity, validation accuracy and energy go into the
method's report.

Recipe section (all keys optional)::

    lottery:
      rounds: 2             # pruning rounds; final sparsity 1 - (1 - rate) ** rounds
      rate: 0.5             # fraction of the surviving weights removed per round, in (0, 1)
      rewind_step: 0        # optimizer step of round 0 the survivors rewind to (0: the baseline)
      epochs_per_round: 2   # training epochs of every round (replaces finetune.epochs)
      scope: layerwise      # layerwise | global ranking of the weights
      include: ["*"]
      exclude: []
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from typing import TYPE_CHECKING, Any, ClassVar

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method, classification_loss
from keras_lean.pipeline.methods.magnitude import _patterns, _walk, strip_and_measure
from keras_lean.pipeline.recipe import _number, check_keys

if TYPE_CHECKING:  # pragma: no cover
    import keras

_SCOPES = ("layerwise", "global")
# Methods that would prune the same weights again, or undo the sparsity at deploy.
_CONFLICTS = {
    "magnitude": "lottery ticket search prunes by magnitude itself, in rounds",
    "movement": "lottery ticket search prunes by magnitude itself, in rounds",
    "lora": "merging LoRA adapters adds a dense update that destroys the sparsity",
}


@dataclasses.dataclass(frozen=True)
class LotteryOptions:
    """Options of the `lottery` recipe method.

    Attributes:
        version: format version of this section (1).
        rounds: pruning rounds after the dense round (>= 1); the final sparsity of the pruned
            layers is `1 - (1 - rate) ** rounds`.
        rate: fraction of the surviving weights removed in each round, in (0, 1).
        rewind_step: optimizer step of round 0 whose weights the survivors are rewound to, in
            [0, epochs_per_round x steps per epoch]; 0 rewinds to the model the fine-tune starts
            from (the baseline).
        epochs_per_round: training epochs of every round (>= 1); `finetune.epochs` is not used.
        scope: `layerwise` (every layer loses `rate` of its survivors) or `global` (all
            surviving weights ranked together).
        include: layer-name patterns (fnmatch) of the layers to prune; `*` is every prunable
            layer.
        exclude: layer-name patterns of layers left dense.
    """

    FIELD_COMMENTS: ClassVar[dict[str, str]] = {
        "version": "format version of this section",
        "rounds": "pruning rounds; final sparsity 1 - (1 - rate) ** rounds",
        "rate": "fraction of surviving weights removed per round, in (0, 1)",
        "rewind_step": "step of round 0 the survivors rewind to (0: the baseline's weights)",
        "epochs_per_round": "training epochs per round (replaces finetune.epochs)",
        "scope": "layerwise | global",
        "include": "layer-name patterns to prune ('*' = every prunable layer)",
        "exclude": "layer-name patterns to leave dense",
    }

    version: int = 1
    rounds: int = 2
    rate: float = 0.5
    rewind_step: int = 0
    epochs_per_round: int = 2
    scope: str = "layerwise"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        p = "recipe.lottery"
        if self.version != 1:
            raise ValueError(f"{p}.version must be 1. Received: version={self.version!r}")
        for name in ("rounds", "epochs_per_round"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{p}.{name} must be an integer >= 1. Received: {name}={v!r}")
        if (
            isinstance(self.rate, bool)
            or not isinstance(self.rate, (int, float))
            or not 0 < self.rate < 1
        ):
            raise ValueError(f"{p}.rate must be in (0, 1). Received: rate={self.rate!r}")
        if (
            isinstance(self.rewind_step, bool)
            or not isinstance(self.rewind_step, int)
            or self.rewind_step < 0
        ):
            raise ValueError(
                f"{p}.rewind_step must be an integer >= 0. "
                f"Received: rewind_step={self.rewind_step!r}"
            )
        if self.scope not in _SCOPES:
            raise ValueError(
                f"{p}.scope must be one of {', '.join(_SCOPES)}. Received: scope={self.scope!r}"
            )
        object.__setattr__(self, "include", _patterns(self.include, f"{p}.include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, f"{p}.exclude"))

    @property
    def final_sparsity(self) -> float:
        """Sparsity of the pruned layers after the last round."""
        return 1.0 - (1.0 - self.rate) ** self.rounds

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["include"] = list(self.include)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "recipe.lottery") -> LotteryOptions:
        """Parses the recipe section; unknown keys are errors naming `recipe.lottery.<key>`."""
        if d is None:
            return cls()
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        for name in ("version", "rounds", "rewind_step", "epochs_per_round"):
            if name in d:
                kw[name] = _number(d[name], f"{path}.{name}", kind=int)
        if "rate" in d:
            kw["rate"] = _number(d["rate"], f"{path}.rate")
        if "scope" in d:
            kw["scope"] = str(d["scope"])
        for name in ("include", "exclude"):
            if name in d:
                kw[name] = _patterns(d[name] if d[name] is not None else [], f"{path}.{name}")
        return cls(**kw)


class LotteryMethod(Method):
    """Lottery tickets (Frankle & Carbin, 2019; rewinding: Frankle et al., 2020)."""

    name: ClassVar[str] = "lottery"
    order: ClassVar[int] = 35
    options_class: ClassVar[type] = LotteryOptions

    def __init__(self, options: LotteryOptions):
        if not isinstance(options, LotteryOptions):
            raise TypeError(
                f"lottery options must be LotteryOptions. Received: {type(options).__name__}"
            )
        super().__init__(options)
        self._result: dict | None = None
        self._final: dict | None = None

    @classmethod
    def check_combination(cls, names: list[str]) -> None:
        for other, why in _CONFLICTS.items():
            if other in names:
                raise ValueError(
                    f"recipe.methods: {cls.name!r} cannot be combined with {other!r}: {why}."
                )

    def _filters(self, model: keras.Model):
        """The layers to prune, as a `prune_low_magnitude` filters callable.

        Raises:
            ValueError: a pattern matches no layer, a layer named without wildcards cannot be
                pruned, or nothing is selected.
        """
        from keras_lean.sparsity import is_prunable

        o = self.options
        names = [layer.name for layer in _walk(model)]
        for key, patterns in (("include", o.include), ("exclude", o.exclude)):
            for p in patterns:
                if not any(fnmatch.fnmatchcase(n, p) for n in names):
                    raise ValueError(
                        f"recipe.lottery.{key}: pattern {p!r} matches no layer of the model. "
                        f"Layers: {', '.join(names)}"
                    )

        def chosen(layer) -> bool:
            return (
                any(fnmatch.fnmatchcase(layer.name, p) for p in o.include)
                and not any(fnmatch.fnmatchcase(layer.name, p) for p in o.exclude)
                and is_prunable(layer)
            )

        for layer in _walk(model):
            if layer.name in o.include and not is_prunable(layer):
                raise ValueError(
                    f"recipe.lottery.include names layer {layer.name!r} of type "
                    f"{type(layer).__name__}, which cannot be pruned."
                )
        if not any(chosen(layer) for layer in _walk(model)):
            raise ValueError(
                f"recipe.lottery: no prunable layer selected by include={list(o.include)}, "
                f"exclude={list(o.exclude)}. Layers: {', '.join(names)}"
            )
        return chosen

    def check_plan(self, plan: FinetunePlan) -> None:
        """Raises ValueError naming `recipe.lottery.rewind_step` if it is past round 0's end."""
        total = self.options.epochs_per_round * plan.steps_per_epoch
        if self.options.rewind_step > total:
            raise ValueError(
                f"recipe.lottery.rewind_step must be within round 0's training: at most {total} "
                f"(epochs_per_round {self.options.epochs_per_round} x {plan.steps_per_epoch} "
                f"steps per epoch). Received: rewind_step={self.options.rewind_step}"
            )

    def prepare(self, model: keras.Model, data: Data, plan: FinetunePlan) -> keras.Model:
        # Fail before any training on a bad rewind step or layer pattern.
        self.check_plan(plan)
        self._filters(model)
        return model

    def finetune(
        self, model: keras.Model, data: Data, plan: FinetunePlan, fit: Any
    ) -> keras.Model | None:
        """Runs the rounds; returns the sparse (still wrapped) model of the last round.

        `fit` is the pipeline's fit; this method trains through `find_lottery_ticket`, which
        compiles every round itself, so it reads the pipeline's training settings from `fit`
        where it has them (`optimizer()`, `loss`, `jit_compile`, `scope()`, `energy_window`,
        `verbose`) and falls back to Adam(1e-3) and a cross-entropy matching the model's output.
        """
        import keras

        from keras_lean.sparsity.lottery import find_lottery_ticket

        o = self.options
        self.check_plan(plan)
        filters = self._filters(model)
        optimizer = getattr(fit, "optimizer", None) or (lambda: keras.optimizers.Adam(1e-3))
        loss = getattr(fit, "loss", None) or classification_loss(model)
        compile_kwargs = {}
        if getattr(fit, "jit_compile", None) is not None:
            compile_kwargs["jit_compile"] = bool(fit.jit_compile)
        energy_window = getattr(fit, "energy_window", None)
        scope = getattr(fit, "scope", None) or contextlib.nullcontext
        energy: dict[int, float | None] = {}

        @contextlib.contextmanager
        def round_context(index: int, info: dict):
            if energy_window is None:
                energy[index] = None
                yield
                return
            with energy_window(f"lottery_round_{index}") as window:
                yield
            energy[index] = window.record.energy_j if window.record is not None else None

        with scope():
            result = find_lottery_ticket(
                model,
                (data.x_train, data.y_train, data.x_val, data.y_val),
                rounds=o.rounds,
                rate=o.rate,
                rewind_step=o.rewind_step,
                epochs_per_round=o.epochs_per_round,
                batch_size=plan.batch_size,
                optimizer=optimizer,
                loss=loss,
                compile_kwargs=compile_kwargs,
                round_context=round_context,
                scope=o.scope,
                filters=filters,
                verbose=int(getattr(fit, "verbose", 0) or 0),
            )
        rounds = []
        for r in result.rounds:
            row = dataclasses.asdict(r)
            row["energy_j"] = energy.get(r.index)
            rounds.append(row)
        self._result = {
            "rounds": rounds,
            "rewind_step": result.rewind_step,
            "scope": result.scope,
            "final_sparsity": result.final_sparsity,
            "dense_accuracy": result.dense_accuracy,
            "epochs_run": sum(r.epochs for r in result.rounds),
        }
        return result.model

    def finalize(self, model: keras.Model) -> keras.Model:
        stripped, self._final = strip_and_measure(model)
        return stripped

    def report(self) -> dict:
        out: dict[str, Any] = {
            "options": self.options.to_dict(),
            "target_sparsity": self.options.final_sparsity,
        }
        if self._result is not None:
            out.update(self._result)
        if self._final is not None:
            out["final"] = self._final
        return out
