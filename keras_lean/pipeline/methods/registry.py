"""The method registry: recipe name -> `Method` class.

Every module in `keras_lean/pipeline/methods/` registers its classes with `@register_method`
when the package is imported (built-ins are found by listing the folder, so adding a method is
adding its file). A user's method registers the same way, from anywhere:

    from keras_lean.pipeline.methods import Method, register_method

    @register_method
    class MyMethod(Method):
        name = "mine"
        order = 50
        options_class = MyOptions

Entries of `METHODS` may also be `"module:Class"` strings, imported on first use; a module that
is not installed makes `get_method_class` raise a ValueError saying so.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from keras_lean.pipeline.methods.base import Method

#: name -> the `Method` class, or a lazy `"module:Class"` reference. Registration order.
METHODS: dict[str, type | str] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Registers `cls` under `cls.name` (usable as a class decorator); returns `cls`.

    Raises:
        TypeError: `cls` is not a `Method` subclass or lacks `name`/`order`/`options_class`.
        ValueError: another class is already registered under that name.
    """
    from keras_lean.pipeline.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a Method subclass. Received: {cls!r}")
    for attr in ("name", "order", "options_class"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} must set the class attribute {attr!r}.")
    name = cls.name
    current = METHODS.get(name)
    if isinstance(current, type) and current is not cls and _qualname(current) != _qualname(cls):
        raise ValueError(
            f"A method named {name!r} is already registered ({_qualname(current)}); choose "
            f"another name for {_qualname(cls)}."
        )
    METHODS[name] = cls
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def get_method_class(name: str) -> type[Method]:
    """Returns the `Method` subclass registered under `name`.

    Raises:
        ValueError: `name` is not registered (the message lists the allowed names), or its
            module is not in this install.
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"Unknown method {name!r}. Allowed: {', '.join(sorted(METHODS))}.")
    entry = METHODS[name]
    if isinstance(entry, str):
        module_name, _, class_name = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"method {name!r} is not available in this install: {e}. A method needs its "
                f"module importable (keras_lean/pipeline/methods/ or a registered plugin)."
            ) from e
    return entry


def registered_class(name: str) -> type[Method] | None:
    """The class registered under `name`, or None (unknown or not importable)."""
    try:
        return get_method_class(name)
    except ValueError:
        return None


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(METHODS)


def method_classes() -> list[type[Method]]:
    """Every registered method class that imports here, in registration order."""
    return [c for c in (registered_class(n) for n in METHODS) if c is not None]


#: Built-in modules imported first, so `method_names()` (and the sweep's default order) reads
#: magnitude, movement, structured, lowrank, lottery, lora. Other modules of the folder follow
#: in name order: a new method needs no entry here.
_FIRST = ("magnitude", "structured", "lowrank", "lottery", "lora")
_NOT_METHODS = frozenset({"base", "registry"})


def discover() -> None:
    """Imports every method module of this package (each registers its classes)."""
    import pkgutil

    package = importlib.import_module("keras_lean.pipeline.methods")
    found = sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.name.startswith("_") and m.name not in _NOT_METHODS
    )
    for module in [*(m for m in _FIRST if m in found), *(m for m in found if m not in _FIRST)]:
        importlib.import_module(f"{package.__name__}.{module}")


__all__ = [
    "METHODS",
    "discover",
    "get_method_class",
    "method_classes",
    "method_names",
    "register_method",
    "registered_class",
]
