"""Pruning schedules: serializable Keras 3 adapters with TFMOT's exact semantics.

This is the only keras_lean module that imports TensorFlow Model Optimization (TFMOT), and it does
so lazily (`import_tfmot`) while leaving the process as it found it: importing TFMOT sets
`TF_USE_LEGACY_KERAS=1` and resolves `tf.keras` to legacy tf_keras for the rest of the process;
`import_tfmot` pins `tf.keras` to what the caller's environment selects before the import and
restores the environment variable afterwards (absent stays absent).

A schedule is a callable `schedule(step) -> (should_prune, sparsity)`: a boolean scalar tensor
saying whether masks are recomputed at this pruning step, and the float32 target sparsity. The
adapters below reproduce `tfmot.sparsity.keras.ConstantSparsity` and `PolynomialDecay` exactly,
but, unlike TFMOT's, round-trip through `get_config` / `from_config` (and therefore `.keras`
files). `as_schedule` turns anything schedule-like (an adapter, a TFMOT schedule, a user
subclass of either, a dict config) into an adapter.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Any

import keras
from keras import ops

from keras_lean import _backend

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PruningSchedule",
    "TfmotScheduleAdapter",
    "as_schedule",
    "import_tfmot",
]

_LEGACY_ENV = "TF_USE_LEGACY_KERAS"


@contextlib.contextmanager
def _preserve_legacy_keras_env():
    """Restores `TF_USE_LEGACY_KERAS` (value or absence) and pins `tf.keras` on exit."""
    import tensorflow as tf

    # `tf.keras` is a lazy loader that picks Keras 3 or tf_keras on first access, from the
    # environment variable. TFMOT sets the variable and then touches `tf.keras`, which would lock
    # in tf_keras for the whole process. Touching it first locks in the caller's choice.
    getattr(tf.keras, "version", None)
    before = os.environ.get(_LEGACY_ENV)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_LEGACY_ENV, None)
        else:
            os.environ[_LEGACY_ENV] = before


def import_tfmot():
    """Imports `tensorflow_model_optimization` without changing the process's Keras choice.

    Returns:
        The `tensorflow_model_optimization` module.

    Raises:
        ImportError: if TFMOT (or tf_keras, which it needs) is not installed.
    """
    with _preserve_legacy_keras_env():
        return importlib.import_module("tensorflow_model_optimization")


def _is_tfmot_schedule(obj: Any) -> bool:
    """True for instances of `tfmot.sparsity.keras.PruningSchedule` (no TFMOT import needed)."""
    for cls in type(obj).__mro__:
        if cls.__name__ == "PruningSchedule" and cls.__module__.startswith(
            "tensorflow_model_optimization"
        ):
            return True
    return False


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"{name} must be an integer. Received: {name}={value!r}")
    return int(value)


def _check_sparsity(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must be a float in [0, 1). Received: {name}={value!r}"
            ) from None
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1). Received: {name}={value!r}")
    return float(value)


def _check_steps(begin_step: Any, end_step: Any, frequency: Any, allow_forever: bool):
    begin_step = _check_int("begin_step", begin_step)
    end_step = _check_int("end_step", end_step)
    frequency = _check_int("frequency", frequency)
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0. Received: begin_step={begin_step}")
    if end_step == -1 and not allow_forever:
        raise ValueError(
            f"end_step must be >= begin_step ({begin_step}) for this schedule (-1, prune "
            f"forever, is not allowed). Received: end_step={end_step}"
        )
    if end_step != -1 and end_step < begin_step:
        allowed = "-1 (prune forever) or " if allow_forever else ""
        raise ValueError(
            f"end_step must be {allowed}>= begin_step ({begin_step}). Received: end_step={end_step}"
        )
    if frequency <= 0:
        raise ValueError(f"frequency must be > 0. Received: frequency={frequency}")
    return begin_step, end_step, frequency


def _should_prune(step, begin_step: int, end_step: int, frequency: int):
    """TFMOT's rule: prune in [begin_step, end_step] (end_step=-1: forever) every `frequency`."""
    step = ops.cast(step, _backend.step_dtype())
    in_range = ops.greater_equal(step, begin_step)
    if end_step >= 0:
        in_range = ops.logical_and(in_range, ops.less_equal(step, end_step))
    on_turn = ops.equal(ops.mod(step - begin_step, frequency), 0)
    return ops.logical_and(in_range, on_turn)


@keras.saving.register_keras_serializable(package="keras_lean")
class PruningSchedule:
    """Base class of keras_lean pruning schedules.

    Subclasses implement `__call__(step) -> (should_prune, sparsity)` with `keras.ops` (it runs
    inside the compiled train step, also under XLA) and `get_config`; register them with
    `keras.saving.register_keras_serializable` so models using them load without
    `custom_objects`.
    """

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step).")

    def get_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config().")

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_lean")
class ConstantSparsity(PruningSchedule):
    """Constant target sparsity, pruned every `frequency` steps in `[begin_step, end_step]`.

    Same semantics as `tfmot.sparsity.keras.ConstantSparsity`.

    Args:
        target_sparsity: fraction of weights to zero, in [0, 1).
        begin_step: first pruning step (>= 0).
        end_step: last pruning step, or -1 to keep pruning for ever.
        frequency: masks are recomputed every `frequency` steps from `begin_step`.

    Example:

    >>> schedule = ConstantSparsity(0.8, begin_step=0, frequency=10)
    >>> should_prune, sparsity = schedule(10)
    """

    def __init__(self, target_sparsity, begin_step=0, end_step=-1, frequency=100):
        self.target_sparsity = _check_sparsity("target_sparsity", target_sparsity)
        self.begin_step, self.end_step, self.frequency = _check_steps(
            begin_step, end_step, frequency, allow_forever=True
        )

    def __call__(self, step):
        return (
            _should_prune(step, self.begin_step, self.end_step, self.frequency),
            ops.convert_to_tensor(self.target_sparsity, dtype="float32"),
        )

    def get_config(self) -> dict:
        return {
            "target_sparsity": self.target_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="keras_lean")
class PolynomialDecay(PruningSchedule):
    """Sparsity rising from `initial_sparsity` to `final_sparsity` along a polynomial.

    Same semantics as `tfmot.sparsity.keras.PolynomialDecay`:
    `s(step) = final + (initial - final) * (1 - p) ** power` with
    `p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`.

    Args:
        initial_sparsity: sparsity at `begin_step`, in [0, 1).
        final_sparsity: sparsity at and after `end_step`, in [0, 1).
        begin_step: first pruning step (>= 0).
        end_step: last pruning step (>= begin_step; -1 is not allowed).
        power: exponent of the polynomial (3 ramps fast early, then slowly).
        frequency: masks are recomputed every `frequency` steps from `begin_step`.

    Example:

    >>> schedule = PolynomialDecay(0.0, 0.9, begin_step=0, end_step=1000, frequency=50)
    """

    def __init__(
        self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100
    ):
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        self.final_sparsity = _check_sparsity("final_sparsity", final_sparsity)
        self.begin_step, self.end_step, self.frequency = _check_steps(
            begin_step, end_step, frequency, allow_forever=False
        )
        if isinstance(power, bool) or not isinstance(power, int | float):
            raise ValueError(f"power must be a number. Received: power={power!r}")
        self.power = power

    def __call__(self, step):
        # Same float32 arithmetic as TFMOT, so both pick the same k at every step.
        span = max(self.end_step - self.begin_step, 0)
        delta = ops.cast(ops.cast(step, _backend.step_dtype()) - self.begin_step, "float32")
        if span == 0:
            p = ops.where(ops.greater_equal(delta, 0.0), 1.0, 0.0)
        else:
            p = ops.divide(delta, ops.convert_to_tensor(float(span), dtype="float32"))
        p = ops.minimum(1.0, ops.maximum(0.0, p))
        sparsity = ops.add(
            ops.multiply(
                ops.convert_to_tensor(self.initial_sparsity - self.final_sparsity, "float32"),
                ops.power(1.0 - p, ops.convert_to_tensor(float(self.power), "float32")),
            ),
            ops.convert_to_tensor(self.final_sparsity, "float32"),
        )
        return (
            _should_prune(step, self.begin_step, self.end_step, self.frequency),
            ops.cast(sparsity, "float32"),
        )

    def get_config(self) -> dict:
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class_path(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _tfmot_kwargs(config: Any) -> dict:
    """TFMOT's get_config nests the arguments under 'config'; its from_config does not unnest."""
    if isinstance(config, dict) and set(config) == {"class_name", "config"}:
        return dict(config["config"])
    return dict(config)


def _rebuild_tfmot_schedule(cls: type, kwargs: dict):
    try:
        return cls(**kwargs)
    except TypeError:
        return cls.from_config(kwargs)


@keras.saving.register_keras_serializable(package="keras_lean")
class TfmotScheduleAdapter(PruningSchedule):
    """Wraps a user subclass of `tfmot.sparsity.keras.PruningSchedule` so it can be saved.

    The adapter stores the class path (`module:QualName`) and the schedule's own config, and
    rebuilds it on load (importing TFMOT then). This round-trips when the class is importable by
    that path (defined at module level, not in `__main__`, a notebook or a function) and its
    `get_config()` returns its `__init__` arguments (flat, or nested under `'config'` as TFMOT
    does). Otherwise `serializable` is False, a warning says so when the adapter is made, and
    `get_config` raises a ValueError explaining how to fix the schedule: training works, saving
    does not.

    Args:
        schedule: a `tfmot.sparsity.keras.PruningSchedule` instance, or None with `class_path`
            and `config` (the form `from_config` uses).
        class_path: `"module:QualName"` of the schedule class (for loading).
        config: the schedule's `__init__` arguments (for loading).
    """

    def __init__(self, schedule=None, class_path=None, config=None):
        if schedule is None:
            if class_path is None:
                raise ValueError(
                    "TfmotScheduleAdapter needs a schedule, or class_path and config. "
                    "Received: schedule=None, class_path=None"
                )
            import_tfmot()
            cls = _resolve_class_path(class_path)
            schedule = _rebuild_tfmot_schedule(cls, dict(config or {}))
        if not _is_tfmot_schedule(schedule):
            raise ValueError(
                "schedule must be a tfmot.sparsity.keras.PruningSchedule. "
                f"Received: schedule={schedule!r}"
            )
        if _backend.is_jax():
            raise ValueError(
                f"Pruning schedule {type(schedule).__name__} (a TFMOT subclass) computes with "
                "TensorFlow ops, which cannot run inside JAX's jitted train step. Under "
                "KERAS_BACKEND=jax use keras_lean.sparsity.ConstantSparsity / PolynomialDecay "
                "(TFMOT's two schedules convert to them), or subclass "
                "keras_lean.sparsity.PruningSchedule with keras.ops."
            )
        self.schedule = schedule
        self.class_path = _class_path(type(schedule))
        self._why_not_serializable = self._check_round_trip()
        self.config = None if self._why_not_serializable else self._kwargs()
        if self._why_not_serializable:
            warnings.warn(
                f"Pruning schedule {type(schedule).__name__} works for training but cannot be "
                f"saved: {self._why_not_serializable}",
                stacklevel=3,
            )

    @property
    def serializable(self) -> bool:
        """Whether `get_config` / `from_config` rebuild this schedule."""
        return self._why_not_serializable is None

    def _kwargs(self) -> dict:
        return _tfmot_kwargs(self.schedule.get_config())

    def _check_round_trip(self) -> str | None:
        cls = type(self.schedule)
        if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
            return (
                f"its class {cls.__qualname__} is defined in {cls.__module__!r}"
                f"{' inside a function' if '<locals>' in cls.__qualname__ else ''}, so it cannot "
                "be imported when the model is loaded. Define it at module level in an "
                "importable module, or subclass keras_lean.sparsity.PruningSchedule and register "
                "it with keras.saving.register_keras_serializable."
            )
        try:
            kwargs = self._kwargs()
            rebuilt = _rebuild_tfmot_schedule(cls, kwargs)
            if _tfmot_kwargs(rebuilt.get_config()) != kwargs:
                return "rebuilding it from get_config() gives a different config."
        except Exception as e:  # noqa: BLE001 - any failure means it cannot round-trip
            return (
                f"rebuilding it from get_config() fails ({type(e).__name__}: {e}). Make "
                "get_config() return the __init__ arguments."
            )
        return None

    def __call__(self, step):
        should_prune, sparsity = self.schedule(step)
        return ops.cast(should_prune, "bool"), ops.cast(sparsity, "float32")

    def get_config(self) -> dict:
        if self._why_not_serializable:
            raise ValueError(
                f"Pruning schedule {type(self.schedule).__name__} cannot be serialized: "
                f"{self._why_not_serializable}"
            )
        return {"schedule": None, "class_path": self.class_path, "config": dict(self.config)}

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TfmotScheduleAdapter)
            and self.class_path == other.class_path
            and self.config == other.config
            and self.serializable
            and other.serializable
        )

    def __hash__(self) -> int:
        return hash(self.class_path)

    def __repr__(self) -> str:
        return f"TfmotScheduleAdapter({self.schedule!r})"


_NATIVE = {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}


def as_schedule(obj: Any) -> PruningSchedule:
    """Returns a serializable keras_lean schedule for anything schedule-like.

    Args:
        obj: one of
            - a keras_lean `PruningSchedule` (returned as is);
            - a `tfmot.sparsity.keras.ConstantSparsity` / `PolynomialDecay` (converted to the
              keras_lean adapter with the same arguments, hence the same behaviour);
            - any other `tfmot.sparsity.keras.PruningSchedule` (a user subclass): wrapped in a
              `TfmotScheduleAdapter` (see there for when it can be saved);
            - a dict: `{"class_name": "ConstantSparsity" | "PolynomialDecay", "config": {...}}`
              (TFMOT's get_config form) or a Keras-serialized schedule.

    Returns:
        A `PruningSchedule` whose `get_config` / `from_config` round-trip.

    Raises:
        ValueError: if `obj` is none of the above, or its arguments are invalid.

    Example:

    >>> as_schedule({"class_name": "ConstantSparsity", "config": {"target_sparsity": 0.5}})
    ConstantSparsity(target_sparsity=0.5, begin_step=0, end_step=-1, frequency=100)
    """
    if isinstance(obj, PruningSchedule):
        return obj
    if _is_tfmot_schedule(obj):
        name = type(obj).__name__
        if name in _NATIVE and type(obj).__module__.startswith("tensorflow_model_optimization"):
            return _NATIVE[name](**_tfmot_kwargs(obj.get_config()))
        return TfmotScheduleAdapter(obj)
    if isinstance(obj, dict):
        if "module" in obj or "registered_name" in obj:
            restored = keras.saving.deserialize_keras_object(obj)
            if not isinstance(restored, PruningSchedule):
                raise ValueError(
                    "pruning_schedule config must describe a PruningSchedule. "
                    f"Received: pruning_schedule={obj!r}"
                )
            return restored
        class_name = obj.get("class_name")
        if class_name not in _NATIVE or not isinstance(obj.get("config", {}), dict):
            raise ValueError(
                "pruning_schedule dict must be {'class_name': 'ConstantSparsity' | "
                f"'PolynomialDecay', 'config': {{...}}}}. Received: pruning_schedule={obj!r}"
            )
        extra = set(obj) - {"class_name", "config"}
        if extra:
            raise ValueError(
                f"Unknown key(s) {sorted(extra)} in pruning_schedule dict. Allowed: "
                f"'class_name', 'config'. Received: pruning_schedule={obj!r}"
            )
        try:
            return _NATIVE[class_name](**obj.get("config", {}))
        except TypeError as e:
            raise ValueError(f"Invalid {class_name} config: {e}. Received: {obj!r}") from None
    raise ValueError(
        "pruning_schedule must be a keras_lean.sparsity.PruningSchedule, a "
        "tfmot.sparsity.keras.PruningSchedule or a dict config. "
        f"Received: pruning_schedule={obj!r} of type {type(obj).__name__}"
    )
