"""The recipe: what `finetune`, `validate` and `deploy` do, as a versioned YAML file.

A recipe names the methods to apply and has one section per method (parsed by that method's
`options_class.from_dict`), plus the pipeline's own sections (`finetune`, `export`, `guard`) and
the validation gate `max_accuracy_drop`. The full reference is in `docs/recipe.md`. Example::

    version: 1
    methods: [magnitude]
    magnitude:
      target_sparsity: 0.8
    finetune:
      epochs: 4
    max_accuracy_drop: 0.01

Unknown keys and bad values raise `ValueError` naming the key path (`recipe.finetune.epohcs`),
the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

RECIPE_VERSION = 1

_JIT_CHOICES = ("on", "off", "auto")
_QUANTIZATION_CHOICES = ("none", "dynamic", "float16", "int8")
_FORMAT_CHOICES = ("saved_model", "tflite")


def check_keys(d: Any, allowed: set[str] | frozenset[str], path: str) -> None:
    """Raises ValueError if `d` is not a mapping or has a key outside `allowed`.

    Args:
        d: the parsed YAML mapping.
        allowed: the keys allowed at this level.
        path: the key path of `d` for the message, e.g. `"recipe.finetune"`.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{path} must be a mapping. Received: {d!r}")
    unknown = sorted(set(map(str, d)) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown key {path}.{unknown[0]}. "
            f"Allowed keys in {path}: {', '.join(sorted(allowed))}."
        )


def _on_off(value: Any, path: str, *, extra: tuple[str, ...] = ()) -> bool | str:
    # YAML 1.1 (PyYAML) reads on/off/yes/no as booleans; accept both spellings.
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("on", "true", "yes"):
            return True
        if v in ("off", "false", "no"):
            return False
        if v in extra:
            return v
    allowed = ", ".join(("on", "off", *extra))
    raise ValueError(f"{path} must be one of {allowed}. Received: {path.split('.')[-1]}={value!r}")


def _number(value: Any, path: str, *, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{path} must be a {kind.__name__}. Received: {path.split('.')[-1]}={value!r}"
        )
    if kind is int and not float(value).is_integer():
        raise ValueError(f"{path} must be an int. Received: {path.split('.')[-1]}={value!r}")
    return kind(value)


@dataclasses.dataclass(frozen=True)
class EarlyStoppingOptions:
    """Early stopping on validation accuracy.

    Attributes:
        enabled: stop when validation accuracy has not improved for `patience` epochs.
        patience: epochs without improvement before stopping (>= 0).
        min_delta: the smallest change counted as an improvement (>= 0).
        after_pruning: only start watching once the sparsity schedule has ended (so stopping can
            never leave the model short of its target sparsity).
    """

    enabled: bool = False
    patience: int = 2
    min_delta: float = 0.0
    after_pruning: bool = True

    def __post_init__(self):
        if self.patience < 0:
            raise ValueError(
                f"recipe.finetune.early_stopping.patience must be >= 0. "
                f"Received: patience={self.patience}"
            )
        if self.min_delta < 0:
            raise ValueError(
                f"recipe.finetune.early_stopping.min_delta must be >= 0. "
                f"Received: min_delta={self.min_delta}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls, d: Any, path: str = "recipe.finetune.early_stopping"
    ) -> EarlyStoppingOptions:
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        if "enabled" in d:
            kw["enabled"] = _on_off(d["enabled"], f"{path}.enabled")
        if "patience" in d:
            kw["patience"] = _number(d["patience"], f"{path}.patience", kind=int)
        if "min_delta" in d:
            kw["min_delta"] = _number(d["min_delta"], f"{path}.min_delta")
        if "after_pruning" in d:
            kw["after_pruning"] = _on_off(d["after_pruning"], f"{path}.after_pruning")
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Fine-tuning settings (`recipe.finetune`).

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

    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    jit_compile: str = "auto"
    mixed_precision: bool = False
    early_stopping: EarlyStoppingOptions = dataclasses.field(default_factory=EarlyStoppingOptions)
    seed: int = 0

    def __post_init__(self):
        p = "recipe.finetune"
        if self.epochs < 1:
            raise ValueError(f"{p}.epochs must be >= 1. Received: epochs={self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"{p}.batch_size must be >= 1. Received: batch_size={self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(
                f"{p}.learning_rate must be > 0. Received: learning_rate={self.learning_rate}"
            )
        if self.jit_compile not in _JIT_CHOICES:
            raise ValueError(
                f"{p}.jit_compile must be one of {', '.join(_JIT_CHOICES)}. "
                f"Received: jit_compile={self.jit_compile!r}"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["early_stopping"] = self.early_stopping.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "recipe.finetune") -> FinetuneOptions:
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        for name in ("epochs", "batch_size", "seed"):
            if name in d:
                kw[name] = _number(d[name], f"{path}.{name}", kind=int)
        if "learning_rate" in d:
            lr = d["learning_rate"]
            if isinstance(lr, str):  # PyYAML reads `1e-3` (no dot) as a string
                try:
                    lr = float(lr)
                except ValueError:
                    pass
            kw["learning_rate"] = _number(lr, f"{path}.learning_rate")
        if "jit_compile" in d:
            v = _on_off(d["jit_compile"], f"{path}.jit_compile", extra=("auto",))
            kw["jit_compile"] = v if isinstance(v, str) else ("on" if v else "off")
        if "mixed_precision" in d:
            kw["mixed_precision"] = _on_off(d["mixed_precision"], f"{path}.mixed_precision")
        if "early_stopping" in d:
            kw["early_stopping"] = EarlyStoppingOptions.from_dict(
                d["early_stopping"], f"{path}.early_stopping"
            )
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Deployment settings (`recipe.export`).

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
    """

    formats: tuple[str, ...] = ("saved_model", "tflite")
    quantization: str = "none"
    calibration_samples: int = 100
    latency_batch_size: int = 32
    latency_runs: int = 20
    compare_baseline: bool = True
    fold_batchnorm: bool = True

    def __post_init__(self):
        p = "recipe.export"
        object.__setattr__(self, "formats", tuple(self.formats))
        for f in self.formats:
            if f not in _FORMAT_CHOICES:
                raise ValueError(
                    f"{p}.formats entries must be one of {', '.join(_FORMAT_CHOICES)}. "
                    f"Received: {f!r}"
                )
        if self.quantization not in _QUANTIZATION_CHOICES:
            raise ValueError(
                f"{p}.quantization must be one of {', '.join(_QUANTIZATION_CHOICES)}. "
                f"Received: quantization={self.quantization!r}"
            )
        for name in ("calibration_samples", "latency_batch_size", "latency_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{p}.{name} must be >= 1. Received: {name}={getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["formats"] = list(self.formats)
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "recipe.export") -> ExportOptions:
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        if "formats" in d:
            formats = d["formats"]
            if isinstance(formats, str):
                formats = [formats]
            if not isinstance(formats, (list, tuple)):
                raise ValueError(f"{path}.formats must be a list. Received: formats={formats!r}")
            kw["formats"] = tuple(formats)
        if "quantization" in d:
            q = d["quantization"]
            kw["quantization"] = "none" if q is None or q is False else str(q)
        for name in ("calibration_samples", "latency_batch_size", "latency_runs"):
            if name in d:
                kw[name] = _number(d[name], f"{path}.{name}", kind=int)
        for name in ("compare_baseline", "fold_batchnorm"):
            if name in d:
                kw[name] = _on_off(d[name], f"{path}.{name}")
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class GuardOptions:
    """Accuracy-guarded gradual pruning (`recipe.guard`).

    With `stages`, fine-tuning prunes in steps: it fine-tunes to each stage's sparsity in turn,
    validates after each against the baseline's accuracy, and keeps the last stage whose drop is
    within the recipe's `max_accuracy_drop`; a stage that breaks the budget stops the run and
    the model rolls back to the kept stage (to the baseline if no stage is within budget).

    Attributes:
        stages: target sparsities of the stages, strictly increasing, each in (0, 1). They
            replace the pruning method's `target_sparsity`. Empty (the default) turns the
            guard off.
        epochs_per_stage: fine-tune epochs of each stage (>= 1); the sparsity schedule spans
            each stage from the previous stage's sparsity to this one's. `finetune.epochs` is
            not used when the guard is on.
    """

    stages: tuple[float, ...] = ()
    epochs_per_stage: int = 1

    def __post_init__(self):
        p = "recipe.guard"
        stages = self.stages
        if not isinstance(stages, (list, tuple)) or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) for s in stages
        ):
            raise ValueError(
                f"{p}.stages must be a list of sparsities in (0, 1). Received: stages={stages!r}"
            )
        stages = tuple(float(s) for s in stages)
        for s in stages:
            if not 0 < s < 1:
                raise ValueError(
                    f"{p}.stages entries must be in (0, 1). Received: stages={list(stages)}"
                )
        for a, b in zip(stages, stages[1:], strict=False):
            if not b > a:
                raise ValueError(
                    f"{p}.stages must be strictly increasing. Received: stages={list(stages)}"
                )
        if (
            isinstance(self.epochs_per_stage, bool)
            or not isinstance(self.epochs_per_stage, int)
            or self.epochs_per_stage < 1
        ):
            raise ValueError(
                f"{p}.epochs_per_stage must be an int >= 1. "
                f"Received: epochs_per_stage={self.epochs_per_stage!r}"
            )
        object.__setattr__(self, "stages", stages)

    @property
    def enabled(self) -> bool:
        return bool(self.stages)

    def to_dict(self) -> dict:
        return {"stages": list(self.stages), "epochs_per_stage": self.epochs_per_stage}

    @classmethod
    def from_dict(cls, d: Any, path: str = "recipe.guard") -> GuardOptions:
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, path)
        kw: dict[str, Any] = {}
        if "stages" in d:
            stages = d["stages"] if d["stages"] is not None else []
            if not isinstance(stages, (list, tuple)):
                raise ValueError(
                    f"{path}.stages must be a list of sparsities in (0, 1). "
                    f"Received: stages={stages!r}"
                )
            kw["stages"] = tuple(_number(s, f"{path}.stages") for s in stages)
        if "epochs_per_stage" in d:
            kw["epochs_per_stage"] = _number(
                d["epochs_per_stage"], f"{path}.epochs_per_stage", kind=int
            )
        return cls(**kw)


#: Methods whose pruning `recipe.guard` can run in stages, and those it cannot.
GUARDED_METHODS = ("magnitude", "movement")
_UNGUARDABLE = {
    "structured": "it removes channels by rebuilding the model, so stage ratios would compound "
    "on an already smaller model",
    "lottery": "lottery runs its own pruning rounds (see recipe.lottery.rounds)",
}
_UNGUARDABLE_DEFAULT = (
    "a guarded run may roll back to the baseline weights, which this method's deploy step "
    "does not expect"
)


#: The pipeline's own recipe sections: key -> options class (with `from_dict(d, path)`,
#: `to_dict()` and defaults for every field). Adding a section (e.g. `guard`) is one entry here.
SECTIONS: dict[str, type] = {
    "finetune": FinetuneOptions,
    "export": ExportOptions,
    "guard": GuardOptions,
}


def _check_guard(methods: tuple[str, ...], options: Mapping[str, Any], sections: Mapping) -> None:
    """Refuses a `guard` the methods cannot run in stages, naming the fields involved."""
    guard = sections.get("guard")
    stages = tuple(getattr(guard, "stages", ()) or ())
    if not stages:
        return
    for name in methods:
        if name not in GUARDED_METHODS:
            why = _UNGUARDABLE.get(name, _UNGUARDABLE_DEFAULT)
            raise ValueError(
                f"recipe.guard cannot be combined with method {name!r}: {why}. The guard runs "
                f"{' or '.join(GUARDED_METHODS)} alone; remove recipe.guard.stages or {name!r}."
            )
    pruning = [m for m in methods if m in GUARDED_METHODS]
    if not pruning:
        raise ValueError(
            f"recipe.guard.stages needs a pruning method ({' or '.join(GUARDED_METHODS)}) in "
            f"recipe.methods. Received: methods={list(methods)}"
        )
    opts = options[pruning[0]]
    if getattr(opts, "m_by_n", None) is not None:
        raise ValueError(
            f"recipe.guard.stages cannot be combined with recipe.{pruning[0]}.m_by_n "
            f"(N:M fixes the sparsity at m/n). Remove one of them."
        )
    for pattern, override in (getattr(opts, "overrides", None) or {}).items():
        if getattr(override, "target_sparsity", None) is not None:
            raise ValueError(
                f"recipe.guard.stages replaces target_sparsity, so "
                f"recipe.{pruning[0]}.overrides.{pattern}.target_sparsity cannot be used with "
                f"it. Remove one of them."
            )
    finetune = sections.get("finetune")
    es = getattr(finetune, "early_stopping", None)
    if getattr(es, "enabled", False):
        raise ValueError(
            "recipe.guard.stages cannot be combined with recipe.finetune.early_stopping.enabled "
            "(each stage trains recipe.guard.epochs_per_stage epochs). Turn one of them off."
        )


def method_class(name: str, *, path: str = "recipe.methods") -> type:
    """Returns the registered `Method` class for `name`, with a clear error when it is missing.

    Raises:
        ValueError: `name` is not a registered method, or its module is not in this install.
    """
    from keras_lean.pipeline.methods import METHODS, get_method_class

    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"{path}: unknown method {name!r}. Allowed: {', '.join(sorted(METHODS))}.")
    try:
        return get_method_class(name)
    except ImportError as e:
        raise ValueError(
            f"method {name!r} is not available in this install: {e}. "
            f"Available methods need their module in keras_lean/pipeline/methods/."
        ) from e
    except AttributeError as e:
        raise ValueError(f"method {name!r} is not available in this install: {e}.") from e


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe.

    Attributes:
        version: recipe format version (only 1 exists).
        methods: names of the methods to apply, from the registry in
            `keras_lean.pipeline.methods`; applied in ascending `Method.order`.
        method_options: name -> that method's options (its `options_class`).
        max_accuracy_drop: the validation gate: fine-tuned accuracy may be at most this much
            (absolute, 0.01 = one point) below the baseline's, in [0, 1].
        sections: the pipeline sections (`finetune`, `export`, ...) by key; see `SECTIONS`.
    """

    methods: tuple[str, ...] = ("magnitude",)
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_accuracy_drop: float = 0.01
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    version: int = RECIPE_VERSION

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            raise ValueError(
                f"recipe.version must be {RECIPE_VERSION}. Received: version={self.version!r}"
            )
        methods = tuple(self.methods)
        if not methods:
            raise ValueError("recipe.methods must name at least one method. Received: []")
        if len(set(methods)) != len(methods):
            raise ValueError(f"recipe.methods names a method twice. Received: {list(methods)}")
        classes = {name: method_class(name) for name in methods}
        options = dict(self.method_options)
        for name, cls in classes.items():
            if name not in options:
                options[name] = cls.options_class()
            elif not isinstance(options[name], cls.options_class):
                raise TypeError(
                    f"recipe.{name} must be a {cls.options_class.__name__}. "
                    f"Received: {type(options[name]).__name__}"
                )
        extra = sorted(set(options) - set(methods))
        if extra:
            raise ValueError(
                f"recipe.{extra[0]} is given but {extra[0]!r} is not in recipe.methods "
                f"({list(methods)}); add it to methods or remove the section."
            )
        for cls in classes.values():
            cls.check_combination(list(methods))
        if not (
            isinstance(self.max_accuracy_drop, (int, float))
            and not isinstance(self.max_accuracy_drop, bool)
            and 0 <= self.max_accuracy_drop <= 1
        ):
            raise ValueError(
                f"recipe.max_accuracy_drop must be in [0, 1]. "
                f"Received: max_accuracy_drop={self.max_accuracy_drop!r}"
            )
        sections = dict(self.sections)
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise ValueError(
                f"Unknown recipe section {unknown[0]!r}. Allowed: {', '.join(sorted(SECTIONS))}."
            )
        for key, cls in SECTIONS.items():
            sections.setdefault(key, cls())
        _check_guard(methods, options, sections)
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "method_options", MappingProxyType(options))
        object.__setattr__(self, "max_accuracy_drop", float(self.max_accuracy_drop))
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

    def section(self, key: str) -> Any:
        """Returns the options of pipeline section `key` (see `SECTIONS`)."""
        return self.sections[key]

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
        )

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"version": self.version, "methods": list(self.methods)}
        for name in self.methods:
            d[name] = self.method_options[name].to_dict()
        for key in SECTIONS:
            d[key] = self.sections[key].to_dict()
        d["max_accuracy_drop"] = self.max_accuracy_drop
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "recipe") -> Recipe:
        """Parses a recipe mapping (as read from YAML).

        Args:
            d: the mapping.
            source: where it came from (a file name) for error messages.

        Raises:
            ValueError: unknown keys, a missing or wrong `version`, bad values, methods that are
                not available or cannot be combined.
        """
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: a recipe must be a mapping. Received: {type(d).__name__}")
        if "version" not in d:
            raise ValueError(
                f"{source}: recipe.version is missing; write `version: {RECIPE_VERSION}` "
                f"at the top."
            )
        methods = d.get("methods", ["magnitude"])
        if isinstance(methods, str):
            methods = [methods]
        if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
            raise ValueError(
                f"recipe.methods must be a list of method names. Received: methods={methods!r}"
            )
        from keras_lean.pipeline.methods import METHODS

        allowed = {"version", "methods", "max_accuracy_drop", *SECTIONS, *METHODS}
        check_keys(d, allowed, "recipe")
        options: dict[str, Any] = {}
        for name in methods:
            cls_ = method_class(name)
            section = d.get(name) or {}
            try:
                options[name] = _parse_options(cls_.options_class, section, f"recipe.{name}")
            except (ValueError, TypeError) as e:
                msg = str(e)
                if f"recipe.{name}" not in msg:
                    msg = f"recipe.{name}: {msg}"
                raise type(e)(msg) from e
        for name in METHODS:
            if name in d and name not in methods:
                raise ValueError(
                    f"recipe.{name} is given but {name!r} is not in recipe.methods "
                    f"({list(methods)}); add it to methods or remove the section."
                )
        sections = {
            key: sec_cls.from_dict(d.get(key) or {}, f"recipe.{key}")
            for key, sec_cls in SECTIONS.items()
        }
        max_drop = d.get("max_accuracy_drop", 0.01)
        return cls(
            version=d["version"],
            methods=tuple(methods),
            method_options=options,
            max_accuracy_drop=max_drop,
            sections=sections,
        )


def _parse_options(options_class: type, section: Any, path: str) -> Any:
    # Methods may accept the key path for their messages (`from_dict(d, path=...)`).
    import inspect

    params = inspect.signature(options_class.from_dict).parameters
    if "path" in params:
        return options_class.from_dict(section, path=path)
    return options_class.from_dict(section)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Reads and validates a recipe YAML file.

    Args:
        path: the `recipe.yaml` file.

    Returns:
        The `Recipe`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid YAML or not a valid recipe (the message names the file
            and the key path).
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file: {e}") from e
    try:
        return Recipe.from_dict(data, source=str(path))
    except (ValueError, TypeError) as e:
        msg = str(e)
        if str(path) not in msg:
            msg = f"{path}: {msg}"
        raise type(e)(msg) from e


_FIELD_COMMENTS = {
    "finetune": {
        "epochs": "fine-tune epochs; the sparsity schedule spans them",
        "batch_size": "global batch size (split across replicas under a strategy)",
        "learning_rate": "Adam learning rate",
        "jit_compile": "on | off | auto (auto times both on this machine, keeps the faster)",
        "mixed_precision": "on | off (mixed_float16; output layer stays float32)",
        "early_stopping": "stop on validation accuracy",
        "seed": "random seed",
    },
    "guard": {
        "stages": "[] = off; e.g. [0.3, 0.5, 0.7]: prune in stages, keep the last within "
        "max_accuracy_drop",
        "epochs_per_stage": "fine-tune epochs per stage (replaces finetune.epochs)",
    },
    "export": {
        "formats": "saved_model and/or tflite",
        "quantization": "TFLite: none | dynamic | float16 | int8 (int8 calibrated on train data)",
        "calibration_samples": "training samples for int8 calibration",
        "latency_batch_size": "batch size of the Keras vs TFLite latency measurement",
        "latency_runs": "timed batches per runtime (median reported)",
        "compare_baseline": "also export the baseline to TFLite for the size ratio",
        "fold_batchnorm": "fold BatchNormalization into the Conv/Dense before it (inference)",
    },
}


def _yaml_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _render_mapping(d: Mapping, comments: Mapping, indent: int) -> list[str]:
    lines = []
    pad = "  " * indent
    for key, value in d.items():
        comment = comments.get(key)
        if isinstance(value, Mapping) and value:
            lines.append(f"{pad}{key}:" + (f"  # {comment}" if comment else ""))
            sub = comments.get(f"{key}.", {}) if isinstance(comments, Mapping) else {}
            lines.extend(_render_mapping(value, sub, indent + 1))
        else:
            line = f"{pad}{key}: {_yaml_value(value)}"
            lines.append(line + (f"  # {comment}" if comment else ""))
    return lines


def recipe_to_yaml(recipe: Recipe, *, header: str = "", layers: list[str] | None = None) -> str:
    """Renders `recipe` as a commented YAML document that `load_recipe` reads back equal.

    Args:
        recipe: the recipe.
        header: comment lines put at the top (without `#`).
        layers: the model's prunable layer names, listed as a comment for include/exclude.

    Returns:
        The YAML text.
    """
    out = []
    for line in header.strip().splitlines():
        out.append(f"# {line}".rstrip())
    if layers is not None:
        out.append("#")
        out.append("# Prunable layers of this model (use these names in include / exclude /")
        out.append("# overrides; fnmatch patterns such as 'conv*' work too):")
        for name in layers:
            out.append(f"#   - {name}")
    out.append("")
    out.append(f"version: {recipe.version}  # recipe format version")
    out.append(
        f"methods: {_yaml_value(list(recipe.methods))}  # applied in this pipeline order: "
        "structured, lowrank, magnitude|movement, lottery, lora"
    )
    for name in recipe.methods:
        opts = recipe.method_options[name]
        out.append("")
        out.append(f"{name}:")
        comments = getattr(type(opts), "FIELD_COMMENTS", {})
        out.extend(_render_mapping(opts.to_dict(), comments, 1))
    for key in SECTIONS:
        out.append("")
        out.append(f"{key}:")
        comments = dict(_FIELD_COMMENTS.get(key, {}))
        out.extend(_render_mapping(recipe.sections[key].to_dict(), comments, 1))
    out.append("")
    out.append(
        f"max_accuracy_drop: {_yaml_value(recipe.max_accuracy_drop)}  "
        "# validate fails (exit 1) if accuracy drops more than this (0.01 = 1 point)"
    )
    return "\n".join(out) + "\n"
