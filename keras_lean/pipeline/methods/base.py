"""The contract between the pipeline and a technique (one module per method in this folder).

A recipe names one or more methods (`methods: [structured, lora]`). Each method is a `Method`
subclass, registered with `keras_lean.pipeline.methods.register_method`, with a frozen options
`Section` that parses the recipe section of the same name. The pipeline applies the methods in
ascending `order`:

    structured (10) -> lowrank (20) -> magnitude | movement (30) -> lottery (35) -> lora (40)

At recipe load, `check_combination(names)` refuses impossible pairings (from `conflicts`),
`check_guard(options)` what `recipe.guard` cannot stage. Then, for each step:

- `prepare(model, data, plan)` before fine-tuning: wrap (magnitude, movement, gradual structured),
  transform (one-shot structured, factorization) or enable adapters (LoRA). Never mutates `model`.
- `callbacks(plan)` extra Keras callbacks for the fine-tune `fit`;
  `pruning_end_step(plan)` the step where gradual pruning ends (early stopping waits for it).
- `finetune(model, data, plan, fit)` only for methods that own the loop (lottery rounds); the
  default returns None and the pipeline runs one `fit` itself.
- `save_state(dir)` after fine-tuning, `load_state(dir)` at deploy: what the method learned
  (schedules, widths, rounds) in `dir/<name>.json`.
- `finalize(model)` at deploy: strip wrappers, physically shrink, merge adapters; returns a plain
  Keras model with no keras_lean wrapper layers left that the method itself added.
- `report()` a JSON-able dict of what the method did, merged into `report.json` under the
  method's name; `report_lines(report)` the lines `keras-lean report` prints from it.

Adding a method is one module in this folder (it registers itself when the package is imported)
plus its tests; see docs/extending.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from keras_lean.pipeline.options import RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import numpy as np


@dataclasses.dataclass(frozen=True)
class FinetunePlan:
    """How long fine-tuning runs, so schedules can span it.

    Attributes:
        epochs: fine-tune epochs.
        steps_per_epoch: optimizer steps per epoch (ceil(train samples / batch size)).
        batch_size: global batch size.
    """

    epochs: int
    steps_per_epoch: int
    batch_size: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclasses.dataclass(frozen=True)
class Data:
    """Train and validation arrays, already checked (no NaNs, labels in range)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int


# fit(model, epochs=None, callbacks=(), initial_epoch=0) -> keras.callbacks.History; compiles the
# model with the recipe's optimizer/loss/jit settings and the run's strategy, and trains on `data`.
# The pipeline passes a `steps.PipelineFit`: a method that runs its own loop (lottery) also reads
# `fit.optimizer()`, `fit.loss`, `fit.jit_compile`, `fit.scope()` and `fit.energy_window(name)`.
FitFn = Callable[..., Any]


class Method:
    """Base class of a recipe method: everything the pipeline needs to know about one technique.

    A subclass sets `name`, `order` and `options_class` (a `Section` of
    `keras_lean.pipeline.options`) and registers itself with `register_method`; the class
    attributes below tell the recipe, the guard, the sweep and the CLI what it supports, so
    none of them names a method.

    Attributes:
        name: the recipe name (`methods: [name]`, section `name:`).
        order: the pipeline applies methods in ascending order.
        options_class: the frozen options dataclass of its recipe section.
        conflicts: `{other method: why they cannot be combined}`. A conflict is declared once,
            on either side; `check_combination` looks both ways.
        guard_stageable: `recipe.guard` may run this method in stages of rising target.
        guard_note: why the guard cannot stage it (shown when a recipe asks for it).
        target_option: the options field `--target-sparsity` and the sweep set (None: none).
        target_help: what that value means, one phrase for `--help`.
        sweep_targets: the targets a sweep runs when none are given (empty: not swept by
            default).
        can_shrink_progressively: structured only: supports `mode: progressive`.
        state_attributes: instance attributes `save_state` writes and `load_state` reads
            back: what the method learned at finetune that deploy and the report need.
    """

    name: ClassVar[str]
    order: ClassVar[int]
    options_class: ClassVar[type]
    conflicts: ClassVar[Mapping[str, str]] = {}
    guard_stageable: ClassVar[bool] = False
    guard_note: ClassVar[str] = (
        "a guarded run may roll back to the baseline weights, which this method's deploy step "
        "does not expect"
    )
    target_option: ClassVar[str | None] = None
    target_help: ClassVar[str] = ""
    sweep_targets: ClassVar[tuple[float, ...]] = ()
    can_shrink_progressively: ClassVar[bool] = False
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any):
        if not isinstance(options, self.options_class):
            raise TypeError(
                f"{self.name} options must be {self.options_class.__name__}. "
                f"Received: {type(options).__name__}"
            )
        self.options = options

    # -- recipe-time knowledge (class methods: no instance, no model) ---------------------

    @classmethod
    def conflict_with(cls, other: str) -> str | None:
        """Why this method cannot be combined with method `other`, or None if it can."""
        why = cls.conflicts.get(other)
        if why is None:
            from keras_lean.pipeline.methods.registry import registered_class

            other_cls = registered_class(other)
            why = None if other_cls is None else other_cls.conflicts.get(cls.name)
        return why

    @classmethod
    def check_combination(cls, names: Sequence[str]) -> None:
        """Raises RecipeError (path `methods`, naming both methods and why) if this method
        cannot be combined with one of `names` (the recipe's methods, this one among them)."""
        names = list(names)
        if cls.name not in names:
            return
        for other in names:
            if other == cls.name:
                continue
            why = cls.conflict_with(other)
            if why:
                first, second = (cls.name, other)
                if names.index(other) < names.index(cls.name):
                    first, second = other, cls.name
                raise RecipeError(
                    "methods", f"{first!r} cannot be combined with {second!r}: {why}."
                )

    @classmethod
    def with_target(cls, options: Any, target: float) -> Any:
        """`options` with the target option set to `target` (`--target-sparsity`, the sweep).

        Raises:
            RecipeError: the method has no target option, or `target` is not allowed (the path
                names the option, e.g. `structured.ratio`).
        """
        if cls.target_option is None:
            raise RecipeError(cls.name, "has no target option to set")
        try:
            return dataclasses.replace(options, **{cls.target_option: target})
        except RecipeError as e:
            raise e.under(cls.name) from None

    @classmethod
    def check_guard(cls, options: Any) -> None:
        """Raises RecipeError if `options` cannot be staged by `recipe.guard` (only called for
        `guard_stageable` methods)."""

    @classmethod
    def own_training_loop(cls, options: Any) -> str | None:
        """Why, with `options`, the method trains in its own loop instead of the pipeline's
        `fit` (so recipe `distill` cannot reach it), or None when it uses the pipeline's fit."""
        return None

    # -- run-time steps --------------------------------------------------------------------

    def prepare(self, model: keras.Model, data: Data, plan: FinetunePlan) -> keras.Model:
        return model

    def callbacks(self, plan: FinetunePlan) -> list:
        return []

    def finetune(
        self, model: keras.Model, data: Data, plan: FinetunePlan, fit: FitFn
    ) -> keras.Model | None:
        return None

    def finalize(self, model: keras.Model) -> keras.Model:
        return model

    def stage(self, target: float, previous: float) -> Method:
        """A fresh copy that prunes from `previous` to `target` (a `recipe.guard` stage)."""
        return type(self)(self.with_target(self.options, target))

    def pruning_end_step(self, plan: FinetunePlan) -> int | None:
        """The optimizer step of the pipeline's fit at which the gradual pruning reaches its
        final target (early stopping waits for it); None when nothing is pruned during fit."""
        return None

    def report(self) -> dict:
        return {}

    @classmethod
    def report_lines(cls, report: dict) -> list[str]:
        """Lines `keras-lean report` prints for this method, from the dict `report()` gave
        (as read back from report.json, so every key may be missing)."""
        return []

    # -- state deploy needs ------------------------------------------------------------------

    def state_path(self, directory: str | os.PathLike) -> Path:
        return Path(directory) / f"{self.name}.json"

    def save_state(self, directory: str | os.PathLike) -> None:
        """Writes what this method learned (`state_attributes`) to `directory/<name>.json`."""
        from keras_lean.pipeline.rundir import atomic_write_text

        state = {a: getattr(self, a, None) for a in self.state_attributes}
        doc = {"method": self.name, "version": 1, "state": state}
        path = self.state_path(directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(doc, indent=2, default=_json_default)
        atomic_write_text(path, text + "\n")

    def load_state(self, directory: str | os.PathLike) -> None:
        """Reads back what `save_state` wrote; a missing file leaves the method as it is (a run
        folder from before method state was saved).

        Raises:
            ValueError: the file is not this method's state.
        """
        path = self.state_path(directory)
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable method state file: {e}") from e
        if not isinstance(doc, dict) or doc.get("method") != self.name:
            raise ValueError(f"{path}: not the state of method {self.name!r}.")
        state = doc.get("state") or {}
        for a in self.state_attributes:
            if a in state:
                setattr(self, a, state[a])


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    return str(o)


def classification_loss(model: keras.Model):
    """Sparse cross-entropy matching the model's last activation (logits or probabilities)."""
    import keras

    last = model.layers[-1]
    act = getattr(getattr(last, "activation", None), "__name__", "linear")
    return keras.losses.SparseCategoricalCrossentropy(from_logits=act != "softmax")
