"""`RecipeOverrides`: the recipe fields a caller (the CLI, `run`, `configure`) sets over a recipe.

One object carries every override, so the CLI, `configure` and `run` spell them once:

    >>> from keras_lean.pipeline import Recipe, RecipeOverrides
    >>> rec = RecipeOverrides(methods=("structured",), target_sparsity=0.5).apply(Recipe())
    >>> rec.method_options["structured"].ratio      # structured's target option
    0.5
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from keras_lean.pipeline.recipe import Recipe

#: Override fields that set a field of the recipe's `finetune` section of the same name.
_FINETUNE_FIELDS = ("epochs", "batch_size", "learning_rate", "jit_compile", "mixed_precision")


@dataclasses.dataclass(frozen=True)
class RecipeOverrides:
    """Recipe fields to set over a recipe file or the defaults; None leaves a field as it is.

    Attributes:
        methods: method names (replaces the recipe's list; empty or None keeps it).
        target_sparsity: the value of every chosen method's target option (each method names
            its own: `magnitude.target_sparsity`, `structured.ratio`, ...; see
            `Method.target_option`).
        epochs: `finetune.epochs`.
        batch_size: `finetune.batch_size`.
        learning_rate: `finetune.learning_rate`.
        jit_compile: `finetune.jit_compile` (`on`, `off`, `auto`).
        mixed_precision: `finetune.mixed_precision`.
        quantization: `export.quantization`.
        keras_quantization: `export.keras_quantization` (Keras' `Model.quantize` of the
            `.keras` artifact: `none`, `int8`, `int4`, `float8`, `gptq`, `awq`).
        max_accuracy_drop: the validation gate.
        settings: `KEY=VALUE` strings, each setting one recipe field by its dotted path
            (`structured.mode=progressive`, `guard.stages=[0.3, 0.5]`); the value is read as
            YAML. Applied after the fields above, then the recipe is validated again.
    """

    methods: tuple[str, ...] | None = None
    target_sparsity: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    jit_compile: str | None = None
    mixed_precision: bool | None = None
    quantization: str | None = None
    keras_quantization: str | None = None
    max_accuracy_drop: float | None = None
    settings: tuple[str, ...] | None = None

    def __post_init__(self):
        methods = self.methods
        if isinstance(methods, str):
            methods = (methods,)
        if methods is not None and not isinstance(methods, Sequence):
            raise ValueError(
                f"methods must be a list of method names. Received: methods={methods!r}"
            )
        object.__setattr__(self, "methods", tuple(methods) if methods else None)
        settings = (self.settings,) if isinstance(self.settings, str) else self.settings
        for item in settings or ():
            key = item.partition("=")[0].strip() if isinstance(item, str) else ""
            if "=" not in str(item) or not key:
                raise ValueError(
                    f"a recipe setting must be KEY=VALUE with a dotted recipe path as KEY, e.g. "
                    f"structured.mode=progressive. Received: {item!r}"
                )
        object.__setattr__(self, "settings", tuple(settings) if settings else None)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> RecipeOverrides:
        """Builds the overrides from keyword arguments, naming an unknown one in the error.

        Raises:
            TypeError: a keyword that is not an override.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"Unknown recipe override {unknown[0]!r}. Allowed: {', '.join(sorted(known))}."
            )
        return cls(**kwargs)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def apply(self, recipe: Recipe) -> Recipe:
        """Returns `recipe` with these fields set (validated again, as a recipe file would be).

        Raises:
            ValueError: an invalid value (naming the recipe field), or a `target_sparsity` that
                none of the methods can take.
        """
        changes: dict[str, Any] = {}
        methods = self.methods or recipe.methods
        if self.methods:
            changes["methods"] = methods
        if self.max_accuracy_drop is not None:
            changes["max_accuracy_drop"] = self.max_accuracy_drop
        if self.target_sparsity is not None:
            changes.update(_targets(recipe, methods, self.target_sparsity))
        ft = {k: getattr(self, k) for k in _FINETUNE_FIELDS if getattr(self, k) is not None}
        if ft:
            changes["finetune"] = dataclasses.replace(recipe.finetune, **ft)
        export = {
            k: getattr(self, k)
            for k in ("quantization", "keras_quantization")
            if getattr(self, k) is not None
        }
        if export:
            changes["export"] = dataclasses.replace(recipe.export, **export)
        recipe = recipe.replace(**changes) if changes else recipe
        return _settings(recipe, self.settings) if self.settings else recipe


#: Recipe paths that name one field (`Recipe.to_dict` writes both): setting one sets the other.
_ALIASES = (("max_accuracy_drop",), ("max_metric_drop", "accuracy"))


def _settings(recipe: Recipe, settings: Sequence[str]) -> Recipe:
    """`recipe` with each `KEY=VALUE` set by its dotted path, parsed again as a recipe file is."""
    import yaml

    d = recipe.to_dict()
    for item in settings:
        key, _, text = item.partition("=")
        path = tuple(part.strip() for part in key.strip().split("."))
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item}: the value is not valid YAML: {e}") from None
        for target in _ALIASES if path in _ALIASES else (path,):
            _set_path(d, target, value, item)
    return Recipe.from_dict(d, source="--set")


def _set_path(d: dict, path: Sequence[str], value: Any, item: str) -> None:
    node = d
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {item}: {'.'.join(path[: i + 1])} is a value, not a section.")
        node = child
    node[path[-1]] = value


def _targets(recipe: Recipe, methods: Sequence[str], value: float) -> dict[str, Any]:
    from keras_lean.pipeline.methods import get_method_class

    changes = {}
    for name in methods:
        cls = get_method_class(name)
        if cls.target_option is None:
            continue
        opts = recipe.method_options.get(name) or cls.options_class()
        changes[name] = cls.with_target(opts, value)
    if not changes:
        raise ValueError(
            f"target_sparsity was given but none of the methods {list(methods)} has a target "
            f"option; set the method's own fields in recipe.yaml instead."
        )
    return changes


__all__ = ["RecipeOverrides"]
