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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method, classification_loss
from keras_lean.pipeline.methods.magnitude import _walk, check_patterns, strip_and_measure
from keras_lean.pipeline.methods.registry import register_method
from keras_lean.pipeline.options import (
    Choice,
    Float,
    Int,
    Patterns,
    RecipeError,
    Section,
    option,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras


@dataclasses.dataclass(frozen=True)
class LotteryOptions(Section):
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

    root: ClassVar[str | None] = "lottery"

    version: int = option(1, Choice(1), "format version of this section")
    rounds: int = option(2, Int(min=1), "pruning rounds; final sparsity 1 - (1 - rate) ** rounds")
    rate: float = option(
        0.5, Float(gt=0, lt=1), "fraction of surviving weights removed per round, in (0, 1)"
    )
    rewind_step: int = option(
        0, Int(min=0), "step of round 0 the survivors rewind to (0: the baseline's weights)"
    )
    epochs_per_round: int = option(
        2, Int(min=1), "training epochs per round (replaces finetune.epochs)"
    )
    scope: str = option("layerwise", Choice("layerwise", "global"), "layerwise | global")
    include: tuple[str, ...] = option(
        ("*",), Patterns(), "layer-name patterns to prune ('*' = every prunable layer)"
    )
    exclude: tuple[str, ...] = option((), Patterns(), "layer-name patterns to leave dense")

    @property
    def final_sparsity(self) -> float:
        """Sparsity of the pruned layers after the last round."""
        return 1.0 - (1.0 - self.rate) ** self.rounds


@register_method
class LotteryMethod(Method):
    """Lottery tickets (Frankle & Carbin, 2019; rewinding: Frankle et al., 2020)."""

    name: ClassVar[str] = "lottery"
    order: ClassVar[int] = 35
    options_class: ClassVar[type] = LotteryOptions
    guard_note: ClassVar[str] = "lottery runs its own pruning rounds (see lottery.rounds)"
    target_option: ClassVar[str | None] = "final_sparsity"
    target_help: ClassVar[str] = (
        "final sparsity 1 - (1 - rate) ** rounds; sets rate for the recipe's rounds"
    )
    sweep_targets: ClassVar[tuple[float, ...]] = (0.5, 0.8, 0.9)
    state_attributes: ClassVar[tuple[str, ...]] = ("_result", "_final")

    @classmethod
    def own_training_loop(cls, options: Any) -> str | None:
        return "lottery trains, rewinds and retrains in its own loop"

    def __init__(self, options: LotteryOptions):
        super().__init__(options)
        self._result: dict | None = None
        self._final: dict | None = None

    @classmethod
    def with_target(cls, options: LotteryOptions, target: float) -> LotteryOptions:
        """Sets `rate` so that `rounds` rounds reach final sparsity `target`, in (0, 1)."""
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1:
            raise RecipeError(
                f"{cls.name}.final_sparsity", f"must be in (0, 1). Received: {target!r}"
            )
        rate = 1.0 - (1.0 - target) ** (1.0 / options.rounds)
        try:
            return dataclasses.replace(options, rate=rate)
        except RecipeError as e:
            raise e.under(cls.name) from None

    def pruning_end_step(self, plan: FinetunePlan) -> int | None:
        """None: lottery prunes between its own rounds (each with a fresh optimizer), in a loop
        the pipeline's fit callbacks (early stopping included) do not run in."""
        return None

    def _filters(self, model: keras.Model):
        """The layers to prune, as a `prune_low_magnitude` filters callable.

        Raises:
            ValueError: a pattern matches no layer, a layer named without wildcards cannot be
                pruned, or nothing is selected.
        """
        from keras_lean.sparsity import is_prunable

        o = self.options
        names = [layer.name for layer in _walk(model)]
        check_patterns(self.name, names, include=o.include, exclude=o.exclude)

        def chosen(layer) -> bool:
            return (
                any(fnmatch.fnmatchcase(layer.name, p) for p in o.include)
                and not any(fnmatch.fnmatchcase(layer.name, p) for p in o.exclude)
                and is_prunable(layer)
            )

        for layer in _walk(model):
            if layer.name in o.include and not is_prunable(layer):
                raise RecipeError(
                    "lottery.include",
                    f"names layer {layer.name!r} of type {type(layer).__name__}, which cannot "
                    f"be pruned.",
                )
        if not any(chosen(layer) for layer in _walk(model)):
            raise RecipeError(
                "lottery",
                f"no prunable layer selected by include={list(o.include)}, "
                f"exclude={list(o.exclude)}. Layers: {', '.join(names)}",
            )
        return chosen

    def check_plan(self, plan: FinetunePlan) -> None:
        """Raises RecipeError naming `lottery.rewind_step` if it is past round 0's end."""
        total = self.options.epochs_per_round * plan.steps_per_epoch
        if self.options.rewind_step > total:
            raise RecipeError(
                "lottery.rewind_step",
                f"must be within round 0's training: at most {total} (epochs_per_round "
                f"{self.options.epochs_per_round} x {plan.steps_per_epoch} steps per epoch). "
                f"Received: {self.options.rewind_step}",
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

    @classmethod
    def report_lines(cls, report: dict) -> list[str]:
        """The rounds: sparsity, validation accuracy, energy and time of each."""
        rounds = report.get("rounds") if isinstance(report, Mapping) else None
        if not isinstance(rounds, list) or not rounds:
            return []
        from keras_lean.pipeline.steps.report import fmt, text_table

        rows = [
            (
                str(r.get("index")),
                fmt(r.get("sparsity"), "{:.1%}"),
                fmt(r.get("val_accuracy"), "{:.4f}"),
                fmt(r.get("energy_j"), "{:.1f}"),
                fmt(r.get("duration_s"), "{:.1f}"),
            )
            for r in rounds
            if isinstance(r, Mapping)
        ]
        return [
            f"lottery rounds (rewind_step {report.get('rewind_step')}, "
            f"scope {report.get('scope')}):",
            *text_table(("round", "sparsity", "val acc", "energy J", "time s"), rows, indent="  "),
        ]
