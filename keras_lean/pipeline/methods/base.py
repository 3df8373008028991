"""The contract between the pipeline and a technique (one module per method in this folder).

A recipe names one or more methods (`methods: [structured, lora]`). Each method is a `Method`
subclass with a frozen options dataclass that parses the recipe section of the same name. The
pipeline applies the methods in ascending `order`:

    structured (10) -> lowrank (20) -> magnitude | movement (30) -> lottery (35) -> lora (40)

and calls, for each step:

- `prepare(model, data, plan)` before fine-tuning: wrap (magnitude, movement, gradual structured),
  transform (one-shot structured, factorization) or enable adapters (LoRA). Never mutates `model`.
- `callbacks(plan)` extra Keras callbacks for the fine-tune `fit`.
- `finetune(model, data, plan, fit)` only for methods that own the loop (lottery rounds); the
  default returns None and the pipeline runs one `fit` itself.
- `finalize(model)` at deploy: strip wrappers, physically shrink, merge adapters; returns a plain
  Keras model with no keras_lean wrapper layers left that the method itself added.
- `check_combination(names)` (class method) is called at recipe load with every method named, so
  an impossible pairing (e.g. magnitude + lora, if merging would destroy sparsity) fails early.
- `report()` a JSON-able dict of what the method did (rounds, stages, per-layer widths...), merged
  into `report.json` under the method's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

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
    """Base class of a recipe method. Subclasses set `name`, `order` and `options_class`."""

    name: ClassVar[str]
    order: ClassVar[int]
    options_class: ClassVar[type]

    def __init__(self, options: Any):
        self.options = options

    @classmethod
    def check_combination(cls, names: list[str]) -> None:
        """Raises ValueError (naming both methods and why) if `names` cannot be combined."""

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

    def report(self) -> dict:
        return {}


def classification_loss(model: keras.Model):
    """Sparse cross-entropy matching the model's last activation (logits or probabilities)."""
    import keras

    last = model.layers[-1]
    act = getattr(getattr(last, "activation", None), "__name__", "linear")
    return keras.losses.SparseCategoricalCrossentropy(from_logits=act != "softmax")
