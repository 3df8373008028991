"""Recipe sections as frozen dataclasses whose fields carry their own type, check and comment.

Every section of a recipe (`finetune`, `export`, `guard`, and each method's options in
`keras_lean.pipeline.methods`) is a `Section` subclass whose fields are declared with `option`:

    @dataclasses.dataclass(frozen=True)
    class GuardOptions(Section):
        stages: tuple[float, ...] = option((), List(Float(gt=0, lt=1)), "[] = off; ...")
        epochs_per_stage: int = option(1, Int(min=1), "fine-tune epochs per stage")

One parser reads them all: `Section.from_dict(d)` refuses anything but a mapping and unknown keys,
then the dataclass is built, and its `__post_init__` runs each field's `Kind.parse` (coerce and
check, the one place a value is checked) and the section's `check()` (rules between fields).
The same checks run when a section is built or `dataclasses.replace`d in code. Every failure is a
`RecipeError(path, message)` whose path names the field as a recipe writes it:
`structured.ratio`, `magnitude.schedule.end`, `guard.stages[2]`. `field_comments(cls)` gives the
comment of every field, which `recipe_to_yaml` writes beside it.

This module imports nothing from `keras_lean.pipeline`, so `recipe.py` and the methods both use
it without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar


class RecipeError(ValueError):
    """A recipe value, key or combination that is not allowed.

    Attributes:
        path: where, as a recipe writes it: `structured.ratio`, `guard.stages[2]`, `methods`
            (`recipe` for the document as a whole).
        message: what is wrong and what is allowed.
        source: the file it was read from, or None.

    `str()` is `"<path>: <message>"` (prefixed by `"<source>: "` when read from a file). It is
    a `ValueError`, so callers that catch `ValueError` keep working.
    """

    def __init__(self, path: str, message: str, *, source: str | None = None):
        self.path = path
        self.message = message
        self.source = source
        self._rooted = False
        super().__init__(path, message)

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{self.source}: {text}" if self.source else text

    def __reduce__(self):
        return (_rebuild_error, (self.path, self.message, self.source, self._rooted))

    def under(self, prefix: str) -> RecipeError:
        """This error with its path placed under `prefix` (a field or section name).

        Errors of a section that knows its own place in the recipe (`finetune`, ...) are
        already complete and come back unchanged.
        """
        if self._rooted or not prefix:
            return self
        path = self.path
        joined = (
            prefix if not path else (prefix + path if path.startswith("[") else f"{prefix}.{path}")
        )
        out = RecipeError(joined, self.message, source=self.source)
        out.__cause__ = self.__cause__
        return out

    def from_file(self, source: str) -> RecipeError:
        """This error, saying which file it came from."""
        out = RecipeError(self.path, self.message, source=source)
        out._rooted = self._rooted
        return out


def _rebuild_error(path, message, source, rooted):
    e = RecipeError(path, message, source=source)
    e._rooted = rooted
    return e


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a self-nested list
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(expected: str, value: Any) -> RecipeError:
    return RecipeError("", f"must be {expected}. Received: {_show(value)}")


# --------------------------------------------------------------------------------------------
# Kinds: how one value is read from YAML and checked


class Kind:
    """How a field's value is read (from YAML or code) and checked.

    `parse(value)` returns the value in its canonical form (tuples for lists, ...) or raises
    `RecipeError("", message)`; the field's name is added by the section. It is idempotent:
    parsing a parsed value gives it back. `dump(value)` gives the YAML-able form.
    """

    expected: str = "a value"

    def parse(self, value: Any) -> Any:
        return value

    def dump(self, value: Any) -> Any:
        return value


class Int(Kind):
    """An integer (an integral float such as `3.0` is accepted), optionally bounded."""

    def __init__(self, *, min: int | None = None, max: int | None = None):
        self.min, self.max = min, max
        bounds = [f">= {min}" if min is not None else "", f"<= {max}" if max is not None else ""]
        self.expected = " ".join(["an int", *[b for b in bounds if b]])

    def parse(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(self.expected, value)
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise _fail(self.expected, value)
        value = int(value)
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            raise _fail(self.expected, value)
        return value


class Float(Kind):
    """A finite number within bounds; `min`/`max` are inclusive, `gt`/`lt` exclusive.

    A string holding a number is read as one: PyYAML (YAML 1.1) reads `1e-3` as a string.
    """

    def __init__(self, *, min=None, max=None, gt=None, lt=None):
        self.min, self.max, self.gt, self.lt = min, max, gt, lt
        lo = f"[{min:g}" if min is not None else (f"({gt:g}" if gt is not None else None)
        hi = f"{max:g}]" if max is not None else (f"{lt:g})" if lt is not None else None)
        if lo and hi:
            self.range = f"in {lo}, {hi}"
        elif lo:
            self.range = f"{'>=' if min is not None else '>'} {lo[1:]}"
        elif hi:
            self.range = f"{'<=' if max is not None else '<'} {hi[:-1]}"
        else:
            self.range = ""
        self.expected = f"a number {self.range}".strip()

    def parse(self, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _fail(self.expected, value) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(self.expected, value)
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            raise _fail(self.range or self.expected, value) from None
        ok = math.isfinite(number)
        ok = ok and (self.min is None or number >= self.min)
        ok = ok and (self.max is None or number <= self.max)
        ok = ok and (self.gt is None or number > self.gt) and (self.lt is None or number < self.lt)
        if not ok:
            raise _fail(self.range or self.expected, value)
        return number


class Bool(Kind):
    """A switch: true/false, on/off, yes/no (PyYAML reads the unquoted words as booleans)."""

    expected = "on or off (true/false, yes/no)"

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            v = value.strip().lower()
            if v in ("on", "true", "yes"):
                return True
            if v in ("off", "false", "no"):
                return False
        raise _fail(self.expected, value)


class Choice(Kind):
    """One of fixed strings. `aliases` maps other spellings (a YAML boolean, None) to a choice."""

    def __init__(
        self,
        *choices: Any,
        aliases: Mapping[Any, Any] | None = None,
        normalize: Callable[[str], str] | None = None,
    ):
        self.choices = choices
        self.aliases = dict(aliases or {})
        self.normalize = normalize
        self.expected = (
            f"{choices[0]!r}" if len(choices) == 1 else "one of " + ", ".join(map(str, choices))
        )

    def parse(self, value: Any) -> Any:
        for alias, target in self.aliases.items():
            if value is alias or (type(value) is type(alias) and value == alias):
                return target
        if isinstance(value, str) and self.normalize is not None:
            value = self.normalize(value)
        if isinstance(value, bool) or value not in self.choices:
            raise _fail(self.expected, value)
        return value


class Optional(Kind):
    """None (`null`), or a value of `inner`."""

    def __init__(self, inner: Kind):
        self.inner = inner
        self.expected = f"{inner.expected} or null"

    def parse(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.inner.parse(value)
        except RecipeError as e:
            if e.path:
                raise
            raise _fail(self.expected, value) from None

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)


class OneOf(Kind):
    """The first of several kinds that accepts the value (e.g. an int >= 1, or "auto")."""

    def __init__(self, *kinds: Kind):
        self.kinds = kinds
        self.expected = " or ".join(k.expected for k in kinds)

    def parse(self, value: Any) -> Any:
        for kind in self.kinds:
            try:
                return kind.parse(value)
            except RecipeError:
                continue
        raise _fail(self.expected, value)


class List(Kind):
    """A list of `item` values, kept as a tuple. A single value of type `scalar` (e.g. `str`) is
    a list of one; null is the empty list if `none_is_empty`. Errors in an item name it:
    `stages[2]`."""

    def __init__(
        self,
        item: Kind,
        *,
        length: int | None = None,
        scalar: type | None = None,
        none_is_empty: bool = True,
        increasing: bool = False,
        what: str | None = None,
    ):
        self.item, self.length, self.scalar = item, length, scalar
        self.none_is_empty, self.increasing = none_is_empty, increasing
        self.expected = what or (
            f"a list of {length} values" if length else f"a list of values ({item.expected})"
        )

    def parse(self, value: Any) -> tuple:
        if value is None and self.none_is_empty:
            return ()
        if self.scalar is not None and isinstance(value, self.scalar):
            value = [value]
        if not isinstance(value, list | tuple):
            raise _fail(self.expected, value)
        if self.length is not None and len(value) != self.length:
            raise _fail(self.expected, value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(self.item.parse(v))
            except RecipeError as e:
                raise e.under(f"[{i}]") from None
        if self.increasing:
            for i in range(1, len(out)):
                if not out[i] > out[i - 1]:
                    raise RecipeError(
                        "", f"must be strictly increasing. Received: {_show(list(value))}"
                    )
        return tuple(out)

    def dump(self, value: Any) -> list:
        return [self.item.dump(v) for v in value]


class Str(Kind):
    """A string (a layer-name pattern, a regex)."""

    expected = "a string"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _fail(self.expected, value)
        return value


def Patterns(what: str = "layer-name patterns") -> List:  # noqa: N802 (a Kind factory)
    """A list of strings; a single string is a list of one, null the empty list."""
    return List(Str(), scalar=str, what=f"a list of {what} (strings)")


def Pair(*, optional: bool = False) -> Kind:  # noqa: N802 (a Kind factory)
    """`[a, b]` of ints >= 1 (or null when `optional`)."""
    pair = List(Int(min=1), length=2, none_is_empty=False, what="a pair of ints [a, b] >= 1")
    return Optional(pair) if optional else pair


class Nested(Kind):
    """A sub-section: a mapping parsed by `section_class.from_dict` (null: its defaults)."""

    def __init__(self, section_class: type[Section]):
        self.section_class = section_class
        self.expected = "a mapping"

    def parse(self, value: Any) -> Section:
        if isinstance(value, self.section_class):
            return value
        return self.section_class.from_dict(value)

    def dump(self, value: Section) -> dict:
        return value.to_dict()


class NestedMap(Kind):
    """`{key: sub-section}` (e.g. per-layer overrides keyed by a layer-name pattern)."""

    def __init__(self, section_class: type[Section]):
        self.section_class = section_class
        self.expected = "a mapping {pattern: {...}}"

    def parse(self, value: Any) -> Mapping:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise _fail(self.expected, value)
        out = {}
        for key, sub in value.items():
            if not isinstance(key, str) or not key:
                raise RecipeError(
                    key_path(key), f"must be a non-empty string key. Received: {_show(key)}"
                )
            try:
                out[key] = (
                    sub
                    if isinstance(sub, self.section_class)
                    else (self.section_class.from_dict(sub))
                )
            except RecipeError as e:
                raise e.under(key_path(key)) from None
        return MappingProxyType(out)

    def dump(self, value: Mapping) -> dict:
        return {k: v.to_dict() for k, v in value.items()}


# --------------------------------------------------------------------------------------------
# Sections


def key_path(key: Any) -> str:
    """A mapping key as a path part: itself when it reads as one, else its repr (`''`, `3`)."""
    if isinstance(key, str) and key.strip() == key and key and "." not in key:
        return key
    return _show(key)


def unknown_key(unknown: list, allowed: list[str]) -> RecipeError:
    """The error for keys outside `allowed`: the path names the first, the message the rest."""
    more = f" (and {', '.join(map(key_path, unknown[1:]))})" if unknown[1:] else ""
    return RecipeError(
        key_path(unknown[0]), f"unknown key{more}. Allowed keys here: {', '.join(allowed)}."
    )


def option(
    default: Any = dataclasses.MISSING,
    kind: Kind | None = None,
    comment: str = "",
    *,
    default_factory: Any = dataclasses.MISSING,
    check: Callable[[Any], str | None] | None = None,
):
    """A section field: its default, `Kind`, the comment written beside it in `recipe.yaml`,
    and an optional `check(value) -> message or None` run after the kind parsed it."""
    meta = {"kind": kind or Kind(), "comment": comment, "check": check}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Section:
    """Base of a recipe section (a frozen dataclass whose fields are declared with `option`).

    Subclasses may set `root` (their fixed place in the recipe, e.g. `"finetune"`) so errors
    raised when they are built in code name it too, and override `check()` for rules between
    fields (raise `RecipeError(field, message)`).
    """

    root: ClassVar[str | None] = None

    def __post_init__(self):
        try:
            for f in dataclasses.fields(self):
                kind = f.metadata.get("kind")
                if kind is None:
                    continue
                try:
                    value = kind.parse(getattr(self, f.name))
                    check = f.metadata.get("check")
                    message = check(value) if check is not None else None
                    if message:
                        raise RecipeError("", message)
                except RecipeError as e:
                    raise e.under(f.name) from None
                object.__setattr__(self, f.name, value)
            self.check()
        except RecipeError as e:
            raise self._rooted(e) from None

    @classmethod
    def _rooted(cls, e: RecipeError) -> RecipeError:
        if cls.root is None or e._rooted:
            return e
        out = e.under(cls.root)
        out._rooted = True
        return out

    def check(self) -> None:
        """Rules between fields; raise `RecipeError(field name, message)`."""

    @classmethod
    def from_dict(cls, d: Any) -> Section:
        """Parses a recipe mapping (null: every default); errors name the key path."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise cls._rooted(
                RecipeError("", f"must be a mapping of options. Received: {_show(d)}")
            )
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in allowed]
        if unknown:
            raise cls._rooted(unknown_key(unknown, allowed))
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return {
            f.name: f.metadata.get("kind", Kind()).dump(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }


def parse_section(section_class: type, data: Any, path: str) -> Any:
    """Parses `data` with `section_class` and names `path` in any error.

    A class that is not a `Section` (a plugin's own options) only needs `from_dict(d)` and
    `to_dict()`; its ValueError/TypeError becomes a `RecipeError` at `path`.
    """
    try:
        if isinstance(section_class, type) and issubclass(section_class, Section):
            return section_class.from_dict(data)
        return section_class.from_dict(data if data is not None else {})
    except RecipeError as e:
        raise e.under(path) from None
    except (ValueError, TypeError) as e:
        raise RecipeError(path, str(e)) from e


def field_comments(section_class: type) -> dict[str, Any]:
    """`{field: comment}`, and `{field + ".": {...}}` for sub-sections, of a section class."""
    out: dict[str, Any] = {}
    if not dataclasses.is_dataclass(section_class):
        return dict(getattr(section_class, "FIELD_COMMENTS", {}))
    for f in dataclasses.fields(section_class):
        out[f.name] = f.metadata.get("comment", "")
        kind = f.metadata.get("kind")
        if isinstance(kind, Nested):
            out[f"{f.name}."] = field_comments(kind.section_class)
    return out


__all__ = [
    "Bool",
    "Choice",
    "Float",
    "Int",
    "Kind",
    "List",
    "Nested",
    "NestedMap",
    "OneOf",
    "Optional",
    "Pair",
    "Patterns",
    "RecipeError",
    "Section",
    "Str",
    "field_comments",
    "key_path",
    "option",
    "parse_section",
    "unknown_key",
]
