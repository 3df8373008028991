"""The recipe: what `finetune`, `validate` and `deploy` do, as a versioned YAML file.

A recipe names the methods to apply and has one section per method (that method's
`options_class`), plus the pipeline's own sections (`finetune`, `export`, `guard`) and the
validation gate `max_metric_drop` (`accuracy` for classifiers, alias `max_accuracy_drop`;
`perplexity` for causal LMs). The full reference is in `docs/recipe.md`. Example::

    version: 1
    methods: [magnitude]
    magnitude:
      target_sparsity: 0.8
    finetune:
      epochs: 4
    max_accuracy_drop: 0.01

Every section is parsed by the one metadata-driven parser of `keras_lean.pipeline.options`.
Unknown keys and bad values raise `RecipeError(path, message)` (a `ValueError`) naming the key
path as the recipe writes it (`finetune.epohcs`, `structured.ratio`, `guard.stages[2]`), the value
received and what is allowed. This module knows the methods only through their registry.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from keras_lean._choices import KERAS_QUANTIZATIONS
from keras_lean.pipeline.methods import get_method_class, method_classes, method_names
from keras_lean.pipeline.options import (
    Bool,
    Choice,
    Float,
    Int,
    List,
    Nested,
    OneOf,
    Optional,
    RecipeError,
    Section,
    Str,
    option,
    parse_section,
    unknown_key,
)

RECIPE_VERSION = 1

JIT_CHOICES = ("on", "off", "auto")
QUANTIZATION_CHOICES = ("none", "dynamic", "float16", "int8")
# Keras' own Model.quantize modes for the .keras artifact (keras_lean.export.KERAS_QUANTIZATIONS).
KERAS_QUANTIZATION_CHOICES = KERAS_QUANTIZATIONS
SPARSE_TFLITE_CHOICES = ("auto", "on", "off")
FORMAT_CHOICES = ("saved_model", "tflite")
_MAX_DROP = Float(min=0, max=1)
_MAX_RISE = Float(min=0)
#: The validation metrics a recipe budgets (`max_metric_drop`), by the task that uses each.
GATE_METRICS = ("accuracy", "perplexity")


@dataclasses.dataclass(frozen=True)
class EarlyStoppingOptions(Section):
    """Early stopping on validation accuracy (`finetune.early_stopping`).

    Attributes:
        enabled: stop when validation accuracy has not improved for `patience` epochs.
        patience: epochs without improvement before stopping (>= 0).
        min_delta: the smallest change counted as an improvement (>= 0).
        after_pruning: only start watching once every method's gradual pruning has reached its
            target (`Method.pruning_end_step`), so stopping can never leave the model short of
            its target sparsity or channel ratio.
    """

    root: ClassVar[str | None] = "finetune.early_stopping"

    enabled: bool = option(False, Bool(), "on | off")
    patience: int = option(2, Int(min=0), "epochs without improvement of val accuracy")
    min_delta: float = option(0.0, Float(min=0), "smallest change counted as an improvement")
    after_pruning: bool = option(
        True, Bool(), "only watch once gradual pruning has reached its target"
    )


@dataclasses.dataclass(frozen=True)
class FinetuneOptions(Section):
    """Fine-tuning settings (`finetune`).

    Attributes:
        epochs: fine-tune epochs (>= 1).
        batch_size: global batch size (>= 1).
        learning_rate: Adam learning rate (> 0).
        jit_compile: `on`, `off`, or `auto` (time a few steps with and without XLA on this
            machine and keep the faster; the decision is cached in the run folder).
        mixed_precision: `on` computes in float16 with float32 variables (`mixed_float16`);
            the output layer stays float32.
        early_stopping: see `EarlyStoppingOptions`.
        seed: random seed for shuffling and initialization.
    """

    root: ClassVar[str | None] = "finetune"

    epochs: int = option(4, Int(min=1), "fine-tune epochs; the sparsity schedule spans them")
    batch_size: int = option(
        32, Int(min=1), "global batch size (split across replicas under a strategy)"
    )
    learning_rate: float = option(1e-3, Float(gt=0), "Adam learning rate")
    jit_compile: str = option(
        "auto",
        Choice(*JIT_CHOICES, aliases={True: "on", False: "off"}, normalize=str.lower),
        "on | off | auto (auto times both on this machine, keeps the faster)",
    )
    mixed_precision: bool = option(
        False, Bool(), "on | off (mixed_float16; output layer stays float32)"
    )
    early_stopping: EarlyStoppingOptions = option(
        kind=Nested(EarlyStoppingOptions),
        comment="stop on validation accuracy",
        default_factory=EarlyStoppingOptions,
    )
    seed: int = option(0, Int(), "random seed")


@dataclasses.dataclass(frozen=True)
class ExportOptions(Section):
    """Deployment settings (`export`).

    Attributes:
        formats: any of `saved_model`, `tflite`.
        quantization: TFLite quantization: `none` (float32), `dynamic` (int8 weights),
            `float16` (float16 weights) or `int8` (int8 weights and activations, calibrated on
            training samples; float input and output).
        calibration_samples: training samples used to calibrate `int8` (>= 1).
        latency_batch_size: batch size of the Keras vs TFLite latency measurement (>= 1).
        latency_runs: timed batches per runtime (>= 1; the median is reported).
        compare_baseline: also export the baseline to TFLite with the same settings, so the
            report can give the size ratio.
        fold_batchnorm: fold inference-mode BatchNormalization into the Conv/Dense before it
            (`keras_lean.export.fold_batchnorm`) before exporting: the same function with fewer
            layers, faster in Keras and SavedModel (TFLite folds by itself).
        keras_quantization: also save `model_<mode>.keras`, quantized by Keras' own
            `Model.quantize`: `none`, `int8`, `int4` (Dense / EinsumDense / Embedding layers;
            convolutions stay float), `float8` (FP8 matmul state; the file does not shrink), or
            `gptq` / `awq` (4-bit weights calibrated on `calibration_samples` training samples;
            keras-hub causal LMs only). Its size and accuracy go to `deploy.json`.
        sparse_tflite: store mostly-zero weight tensors in TFLite's sparse format
            (`EXPERIMENTAL_SPARSITY`; with `int8`, sparsity-preserving quantization), checked
            against a dense-format export of the same model: `auto` does it when at least
            `SPARSE_TFLITE_AUTO` of the deployable model's weights are zero (unstructured and
            N:M pruning) and `quantization` is not `dynamic` (the TFLite runtime cannot run
            sparse hybrid weights), `on` always, `off` never.
        strip_tflite_names: remove the tensor names from every `.tflite` written (the model's,
            its dense twin and the baselines', so ratios stay like for like) before the checks
            (`keras_lean.export.strip_tflite_names`): not needed at run time; signature defs
            and metadata are kept; a few hundred bytes raw and gzip.
    """

    root: ClassVar[str | None] = "export"

    formats: tuple[str, ...] = option(
        ("saved_model", "tflite"),
        List(Choice(*FORMAT_CHOICES), scalar=str),
        "saved_model and/or tflite",
    )
    quantization: str = option(
        "none",
        Choice(*QUANTIZATION_CHOICES, aliases={None: "none", False: "none"}),
        "TFLite: none | dynamic | float16 | int8 (int8 calibrated on train data)",
    )
    calibration_samples: int = option(100, Int(min=1), "training samples for int8 calibration")
    latency_batch_size: int = option(
        32, Int(min=1), "batch size of the Keras vs TFLite latency measurement"
    )
    latency_runs: int = option(20, Int(min=1), "timed batches per runtime (median reported)")
    compare_baseline: bool = option(
        True, Bool(), "also export the baseline to TFLite for the size ratio"
    )
    fold_batchnorm: bool = option(
        True, Bool(), "fold BatchNormalization into the Conv/Dense before it (inference)"
    )
    keras_quantization: str = option(
        "none",
        Choice(*KERAS_QUANTIZATION_CHOICES, aliases={None: "none", False: "none"}),
        "Keras Model.quantize of the .keras artifact: none | int8 | int4 | float8 | gptq | awq "
        "(gptq, awq: keras-hub causal LMs, calibrated on training samples)",
    )
    sparse_tflite: str = option(
        "auto",
        Choice(*SPARSE_TFLITE_CHOICES, aliases={True: "on", False: "off"}, normalize=str.lower),
        "TFLite sparse storage: auto (when >= 30 % of the weights are zero) | on | off",
    )
    strip_tflite_names: bool = option(
        False, Bool(), "remove tensor names from the .tflite files (not needed at run time)"
    )


@dataclasses.dataclass(frozen=True)
class GuardOptions(Section):
    """Accuracy-guarded gradual pruning (`guard`).

    With `stages`, fine-tuning prunes in steps: it fine-tunes to each stage's target in turn,
    validates after each against the baseline's accuracy, and keeps the last stage whose drop is
    within the recipe's `max_accuracy_drop`; a stage that breaks the budget stops the run and
    the model rolls back to the kept stage (to the baseline if no stage is within budget). Only
    methods with `Method.guard_stageable` can be staged.

    Attributes:
        stages: targets of the stages (the method's target option), strictly increasing, each
            in (0, 1). They replace the method's own target. Empty (the default) turns the
            guard off.
        epochs_per_stage: fine-tune epochs of each stage (>= 1); the sparsity schedule spans
            each stage from the previous stage's sparsity to this one's. `finetune.epochs` is
            not used when the guard is on.
    """

    root: ClassVar[str | None] = "guard"

    stages: tuple[float, ...] = option(
        (),
        List(
            Float(gt=0, lt=1),
            increasing=True,
            what="a list of sparsities in (0, 1), e.g. [0.3, 0.5, 0.7]",
        ),
        "[] = off; e.g. [0.3, 0.5, 0.7]: prune in stages, keep the last within max_accuracy_drop",
    )
    epochs_per_stage: int = option(
        1, Int(min=1), "fine-tune epochs per stage (replaces finetune.epochs)"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.stages)


#: `export.sparse_tflite: auto` stores sparse when at least this share of the weights is zero.
SPARSE_TFLITE_AUTO = 0.3


def _check_teacher(value: str) -> str | None:
    if value in ("none", "baseline") or value.endswith(".keras"):
        return None
    return f"must be none, baseline or the path of a .keras teacher model. Received: {value!r}"


@dataclasses.dataclass(frozen=True)
class DistillTransferOptions(Section):
    """The distillation's transfer set (`distill.transfer`): perturbed copies of the training
    inputs, drawn anew each step; the student learns the teacher's outputs on them (the teacher
    runs on the same perturbed batch). The fields are `keras_lean.distill.TransferConfig`'s,
    documented there; all off by default.
    """

    root: ClassVar[str | None] = "distill.transfer"

    shift: int = option(0, Int(min=0), "images: random shift of up to N pixels, zero-filled")
    noise: float = option(0.0, Float(min=0), "float inputs: std of added Gaussian noise")
    mixup: float = option(0.0, Float(min=0), "float inputs: Beta(a, a) mixup within the batch")
    token_mask: float = option(
        0.0, Float(min=0, lt=1), "token inputs: share of real tokens set to mask_token_id"
    )
    mask_token_id: int | None = option(
        None, Optional(Int(min=0)), "the tokenizer's mask (or pad) id; needed with token_mask"
    )
    keep_token_ids: tuple[int, ...] = option(
        (), List(Int(min=0), scalar=int), "token ids never masked (e.g. [CLS], [SEP])"
    )

    def check(self) -> None:
        if self.token_mask > 0 and self.mask_token_id is None:
            raise RecipeError(
                "mask_token_id",
                f"is needed with token_mask {self.token_mask} (the tokenizer's mask or pad id). "
                "Received: null",
            )

    @property
    def enabled(self) -> bool:
        return bool(self.shift or self.noise or self.mixup or self.token_mask)


@dataclasses.dataclass(frozen=True)
class DistillOptions(Section):
    """Knowledge distillation during fine-tuning (`distill`).

    With a teacher, every fine-tune fit (each guard stage and progressive segment too) trains
    the model on `(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || student at T)` through
    Keras' `keras.distillation.Distiller` (`keras_lean.distill`); the teacher's forward passes
    run inside the fit, so the stage's energy counts them, and its FLOPs are added to the
    stage's. A method that runs its own training loop (lottery) is not distilled.

    Attributes:
        teacher: `none` (off), `baseline` (the run's `baseline.keras`) or the path of a
            `.keras` model with the same inputs and outputs.
        alpha: weight of the distillation term, in [0, 1].
        temperature: softmax temperature (> 0); 1 by default: with a teacher that is ~100 %
            right on its training split, higher values mostly pass its fit noise (measured in
            `keras_lean.distill`).
        transfer: see `DistillTransferOptions` (off by default).
        hidden: weight of the intermediate-layer (hidden-state) term inside the distillation
            share; 0 (default) distils the logits only (`keras_lean.distill_features`).
        hidden_layers: the layers whose outputs are distilled; empty (default): every keras-hub
            transformer block, else every weighted layer but the output one.
    """

    root: ClassVar[str | None] = "distill"

    teacher: str = option(
        "none",
        OneOf(Choice("none", "baseline", aliases={None: "none", False: "none"}), Str()),
        "none | baseline | path of a .keras teacher",
        check=_check_teacher,
    )
    alpha: float = option(0.5, Float(min=0, max=1), "weight of the teacher's soft targets")
    temperature: float = option(
        1.0, Float(gt=0), "softmax temperature of both models (1: see keras_lean.distill)"
    )
    transfer: DistillTransferOptions = option(
        kind=Nested(DistillTransferOptions),
        comment="transfer set: perturbed training inputs (off by default)",
        default_factory=DistillTransferOptions,
    )
    hidden: float = option(
        0.0, Float(min=0), "weight of the hidden-state term (0: logits only; keras_lean.distill)"
    )
    hidden_layers: tuple[str, ...] = option(
        (), List(Str(), scalar=str), "layers to distil (empty: transformer blocks, else all)"
    )

    def check(self) -> None:
        if self.transfer.enabled and self.teacher == "none":
            raise RecipeError(
                "transfer",
                "perturbs the inputs of a distillation, and distill.teacher is none. Set "
                "distill.teacher (e.g. baseline) or remove distill.transfer.",
            )
        if self.hidden > 0 and self.teacher != "none" and self.alpha == 0:
            raise RecipeError(
                "hidden",
                f"is {self.hidden:g}, and alpha is 0, which switches the whole distillation "
                "share off. Set alpha above 0 or hidden to 0.",
            )

    @property
    def enabled(self) -> bool:
        return self.teacher != "none"


#: The pipeline's own recipe sections: key -> `Section` class (defaults for every field).
#: Adding a section is one entry here.
SECTIONS: dict[str, type] = {
    "finetune": FinetuneOptions,
    "export": ExportOptions,
    "guard": GuardOptions,
    "distill": DistillOptions,
}


def method_class(name: Any, *, path: str = "methods") -> type:
    """Returns the registered `Method` class for `name`.

    Raises:
        RecipeError: (at `path`) `name` is not a registered method, or its module is not in
            this install.
    """
    if not isinstance(name, str) or name not in method_names():
        raise RecipeError(
            path, f"unknown method {name!r}. Allowed: {', '.join(sorted(method_names()))}."
        )
    try:
        return get_method_class(name)
    except ValueError as e:
        raise RecipeError(path, str(e)) from e


def _check_distill(methods: tuple[str, ...], options: Mapping[str, Any], sections: Mapping) -> None:
    """Refuses `distill` with a method whose own training loop it cannot reach."""
    if not getattr(sections.get("distill"), "enabled", False):
        return
    for name in methods:
        own = getattr(method_class(name), "own_training_loop", None)
        why = own(options[name]) if own is not None else None
        if why:
            raise RecipeError(
                "distill.teacher",
                f"cannot be combined with method {name!r}: {why}, which the distillation "
                "does not reach. Set distill.teacher: none or use another method.",
            )


def _or_list(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 2 else names)


def _check_guard(methods: tuple[str, ...], options: Mapping[str, Any], sections: Mapping) -> None:
    """Refuses a `guard` the methods cannot run in stages, naming the fields involved."""
    stages = tuple(getattr(sections.get("guard"), "stages", ()) or ())
    if not stages:
        return
    stageable = [c.name for c in method_classes() if c.guard_stageable]
    for name in methods:
        cls = method_class(name)
        if not cls.guard_stageable:
            raise RecipeError(
                "guard",
                f"cannot be combined with method {name!r}: {cls.guard_note}. The guard runs "
                f"{_or_list(stageable)} alone; remove guard.stages or {name!r}.",
            )
        cls.check_guard(options[name])
    es = getattr(sections.get("finetune"), "early_stopping", None)
    if getattr(es, "enabled", False):
        raise RecipeError(
            "finetune.early_stopping.enabled",
            "cannot be combined with guard.stages (each stage trains guard.epochs_per_stage "
            "epochs). Turn one of them off.",
        )


def _methods_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise RecipeError("methods", f"must be a list of method names. Received: {value!r}")
    for i, m in enumerate(value):
        if not isinstance(m, str):
            raise RecipeError(f"methods[{i}]", f"must be a method name. Received: {m!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe.

    Attributes:
        version: recipe format version (only 1 exists).
        methods: names of the methods to apply, from the registry in
            `keras_lean.pipeline.methods`; applied in ascending `Method.order`.
        method_options: name -> that method's options (its `options_class`).
        max_accuracy_drop: the validation gate of classifiers (`max_metric_drop.accuracy`; the
            top-level `max_accuracy_drop` is its alias): fine-tuned accuracy may be at most this
            much (absolute, 0.01 = one point) below the baseline's, in [0, 1].
        max_perplexity_rise: the validation gate of causal LMs (`max_metric_drop.perplexity`):
            fine-tuned perplexity may be at most this much above the baseline's, relative
            (`(ppl_finetuned - ppl_baseline) / ppl_baseline`; 0.1 = 10 % higher), >= 0.
        sections: the pipeline sections (`finetune`, `export`, ...) by key; see `SECTIONS`.
    """

    methods: tuple[str, ...] = ("magnitude",)
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_accuracy_drop: float = 0.01
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_perplexity_rise: float = 0.1
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if isinstance(self.version, bool) or self.version != RECIPE_VERSION:
            raise RecipeError("version", f"must be {RECIPE_VERSION}. Received: {self.version!r}")
        methods = _methods_list(self.methods)
        if not methods:
            raise RecipeError("methods", "must name at least one method. Received: []")
        if len(set(methods)) != len(methods):
            raise RecipeError("methods", f"names a method twice. Received: {list(methods)}")
        classes = {name: method_class(name) for name in methods}
        options = dict(self.method_options)
        for name, cls in classes.items():
            if name not in options:
                options[name] = cls.options_class()
            elif not isinstance(options[name], cls.options_class):
                raise TypeError(
                    f"recipe section {name} must be a {cls.options_class.__name__}. "
                    f"Received: {type(options[name]).__name__}"
                )
        extra = sorted(set(options) - set(methods))
        if extra:
            raise RecipeError(
                extra[0],
                f"is given but {extra[0]!r} is not in methods ({list(methods)}); add it to "
                f"methods or remove the section.",
            )
        for name, cls in classes.items():
            cls.check_combination(list(methods))
            check_recipe = getattr(cls, "check_recipe", None)  # options-dependent refusals
            if check_recipe is not None:
                check_recipe(options[name], list(methods))
        try:
            max_drop = _MAX_DROP.parse(self.max_accuracy_drop)
        except RecipeError as e:
            raise e.under("max_accuracy_drop") from None
        try:
            max_rise = _MAX_RISE.parse(self.max_perplexity_rise)
        except RecipeError as e:
            raise e.under("max_metric_drop.perplexity") from None
        object.__setattr__(self, "max_perplexity_rise", max_rise)
        sections = dict(self.sections)
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise RecipeError(
                unknown[0], f"unknown recipe section. Allowed: {', '.join(sorted(SECTIONS))}."
            )
        for key, cls in SECTIONS.items():
            sections.setdefault(key, cls())
        _check_guard(methods, options, sections)
        _check_distill(methods, options, sections)
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "method_options", MappingProxyType(options))
        object.__setattr__(self, "max_accuracy_drop", max_drop)
        object.__setattr__(self, "sections", MappingProxyType(sections))

    @property
    def finetune(self) -> FinetuneOptions:
        return self.sections["finetune"]

    @property
    def export(self) -> ExportOptions:
        return self.sections["export"]

    @property
    def guard(self) -> GuardOptions:
        return self.sections["guard"]

    @property
    def distill(self) -> DistillOptions:
        return self.sections["distill"]

    def ordered_methods(self) -> list:
        """Returns one `Method` instance per recipe method, in ascending `order`."""
        instances = [method_class(n)(self.method_options[n]) for n in self.methods]
        return sorted(instances, key=lambda m: m.order)

    def replace(self, **changes: Any) -> Recipe:
        """Returns a copy with top-level fields or sections replaced (validated again).

        Keys may be `methods`, `max_accuracy_drop`, a method name (its options object) or a
        section key (its options object).
        """
        methods = changes.pop("methods", self.methods)
        max_drop = changes.pop("max_accuracy_drop", self.max_accuracy_drop)
        max_rise = changes.pop("max_perplexity_rise", self.max_perplexity_rise)
        options = {k: v for k, v in self.method_options.items() if k in methods}
        sections = dict(self.sections)
        for key, value in changes.items():
            if key in SECTIONS:
                sections[key] = value
            else:
                options[key] = value
        return Recipe(
            methods=tuple(methods),
            method_options=options,
            max_accuracy_drop=max_drop,
            sections=sections,
            max_perplexity_rise=max_rise,
        )

    def metric_budget(self, metric: str) -> float:
        """The validate gate for `metric` (one of `GATE_METRICS`)."""
        if metric == "accuracy":
            return self.max_accuracy_drop
        if metric == "perplexity":
            return self.max_perplexity_rise
        raise ValueError(f"metric must be one of {GATE_METRICS}. Received: metric={metric!r}")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"version": self.version, "methods": list(self.methods)}
        for name in self.methods:
            d[name] = self.method_options[name].to_dict()
        for key in SECTIONS:
            d[key] = self.sections[key].to_dict()
        d["max_accuracy_drop"] = self.max_accuracy_drop
        d["max_metric_drop"] = {
            "accuracy": self.max_accuracy_drop,
            "perplexity": self.max_perplexity_rise,
        }
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None) -> Recipe:
        """Parses a recipe mapping (as read from YAML).

        Args:
            d: the mapping.
            source: where it came from (a file name), named in errors.

        Raises:
            RecipeError: unknown keys, a missing or wrong `version`, bad values, methods that
                are not available or cannot be combined.
        """
        try:
            return cls._parse(d)
        except RecipeError as e:
            raise (e.from_file(source) if source else e) from None

    @classmethod
    def _parse(cls, d: Any) -> Recipe:
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise RecipeError(
                "recipe", f"must be a mapping of sections. Received: {type(d).__name__}"
            )
        if "version" not in d:
            raise RecipeError(
                "version", f"is missing; write `version: {RECIPE_VERSION}` at the top."
            )
        methods = _methods_list(d.get("methods", ["magnitude"]))
        names = method_names()
        allowed = ["version", "methods", "max_accuracy_drop", "max_metric_drop", *SECTIONS, *names]
        unknown = [k for k in d if k not in allowed]
        if unknown:
            raise unknown_key(unknown, allowed)
        options = {
            name: parse_section(method_class(name).options_class, d.get(name), name)
            for name in dict.fromkeys(methods)
        }
        for name in names:
            if name in d and name not in methods:
                raise RecipeError(
                    name,
                    f"is given but {name!r} is not in methods ({list(methods)}); add it to "
                    f"methods or remove the section.",
                )
        sections = {key: parse_section(sec, d.get(key), key) for key, sec in SECTIONS.items()}
        max_drop, max_rise = _metric_budgets(d)
        return cls(
            version=d["version"],
            methods=methods,
            method_options=options,
            max_accuracy_drop=max_drop,
            sections=sections,
            max_perplexity_rise=max_rise,
        )


def _metric_budgets(d: Mapping) -> tuple[Any, Any]:
    """(accuracy drop, perplexity rise) budgets from `max_metric_drop` and its alias
    `max_accuracy_drop` (both may be given when they agree)."""
    budgets = d.get("max_metric_drop", {})
    if budgets is None:
        budgets = {}
    if not isinstance(budgets, Mapping):
        raise RecipeError(
            "max_metric_drop",
            f"must be a mapping {{metric: budget}} with metrics {list(GATE_METRICS)}. "
            f"Received: {budgets!r}",
        )
    unknown = [k for k in budgets if k not in GATE_METRICS]
    if unknown:
        raise unknown_key(unknown, list(GATE_METRICS)).under("max_metric_drop")
    max_drop = budgets.get("accuracy", d.get("max_accuracy_drop", 0.01))
    if "accuracy" in budgets and "max_accuracy_drop" in d and d["max_accuracy_drop"] != max_drop:
        raise RecipeError(
            "max_metric_drop.accuracy",
            f"is {max_drop!r} but its alias max_accuracy_drop is {d['max_accuracy_drop']!r}; "
            "give one of them.",
        )
    if "accuracy" in budgets:
        try:
            _MAX_DROP.parse(max_drop)
        except RecipeError as e:
            raise e.under("max_metric_drop.accuracy") from None
    return max_drop, budgets.get("perplexity", 0.1)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Reads and validates a recipe YAML file.

    Args:
        path: the `recipe.yaml` file.

    Returns:
        The `Recipe`.

    Raises:
        FileNotFoundError: the file does not exist.
        RecipeError: the file is not UTF-8 text, not valid YAML or not a valid recipe (the
            message names the file and the key path).
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError("recipe", f"not a UTF-8 text file: {e}", source=str(path)) from e
    except OSError as e:
        raise RecipeError("recipe", f"cannot be read: {e}", source=str(path)) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError("recipe", f"not valid YAML: {e}", source=str(path)) from e
    except (ValueError, TypeError, RecursionError) as e:  # PyYAML on some malformed scalars
        raise RecipeError("recipe", f"not valid YAML: {e}", source=str(path)) from e
    return Recipe.from_dict(data, source=str(path))


# --------------------------------------------------------------------------------------------
# The commented YAML `configure` writes


def recipe_to_yaml(recipe: Recipe, *, header: str = "", layers: list[str] | None = None) -> str:
    """`recipe` as the commented YAML `configure` writes (`keras_lean.pipeline.recipe_yaml`)."""
    from keras_lean.pipeline.recipe_yaml import render_recipe

    return render_recipe(recipe, header=header, layers=layers)


__all__ = [
    "FORMAT_CHOICES",
    "JIT_CHOICES",
    "KERAS_QUANTIZATION_CHOICES",
    "QUANTIZATION_CHOICES",
    "RECIPE_VERSION",
    "SECTIONS",
    "SPARSE_TFLITE_AUTO",
    "DistillOptions",
    "EarlyStoppingOptions",
    "ExportOptions",
    "FinetuneOptions",
    "GuardOptions",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "method_class",
    "recipe_to_yaml",
]
