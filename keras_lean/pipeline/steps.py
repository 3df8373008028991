"""The five pipeline steps (and `run`, `report`): each reads and writes one run folder.

    train_baseline -> configure -> finetune -> validate -> deploy

Every step runs inside an energy window named after it (`keras_lean.energy`), writes its
artifacts atomically into the run folder (see `keras_lean.pipeline.rundir`) and records one entry
in `RUN/report.json`: stage, time, energy (J, kWh, measured/estimated label), CO2, training compute
(FLOPs), accuracy, parameters, nonzero parameters and gzip size. A step whose inputs are missing
raises `MissingStepError` naming the step to run first; a failing step leaves earlier artifacts
untouched.

Example:
    >>> from keras_lean.pipeline import run
    >>> result = run("savedmodels/default")      # digits, CNN, magnitude pruning to 80 %
    >>> result.validation.passed, result.deploy.entry["gzip_bytes"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keras_lean.pipeline.data import check_data_against_model, load_data
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.models import ARCHITECTURES, build_model, load_model
from keras_lean.pipeline.recipe import (
    SECTIONS,
    ExportOptions,
    FinetuneOptions,
    Recipe,
    load_recipe,
    recipe_to_yaml,
)
from keras_lean.pipeline.rundir import (
    RunDir,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    save_model_atomic,
)
from keras_lean.pipeline.strategy import STRATEGIES, get_strategy

if TYPE_CHECKING:  # pragma: no cover
    import keras

DEFAULT_ROOT = Path("savedmodels")
DEFAULT_RUN_NAME = "default"
_EVAL_BATCH = 256


def run_dir_for(out: str | os.PathLike | None = None, run_name: str | None = None) -> RunDir:
    """Returns the run folder: `out` if given, else `savedmodels/<run_name or 'default'>`."""
    if out is not None:
        return RunDir(out)
    return RunDir(DEFAULT_ROOT / (run_name or DEFAULT_RUN_NAME))


def _as_run(out: str | os.PathLike | RunDir) -> RunDir:
    return out if isinstance(out, RunDir) else RunDir(out)


@dataclasses.dataclass(frozen=True)
class StageResult:
    """What one step did.

    Attributes:
        stage: the step's name.
        entry: its `report.json` entry.
        artifacts: name -> path of the files it wrote.
    """

    stage: str
    entry: dict
    artifacts: dict


@dataclasses.dataclass(frozen=True)
class ValidationResult(StageResult):
    """`validate`'s result.

    Attributes:
        baseline_accuracy: validation accuracy of `baseline.keras`.
        finetuned_accuracy: validation accuracy of `finetuned.keras`.
        accuracy_drop: baseline minus fine-tuned (negative when fine-tuning improved it).
        max_accuracy_drop: the recipe's gate.
        passed: `accuracy_drop <= max_accuracy_drop`.
    """

    baseline_accuracy: float = 0.0
    finetuned_accuracy: float = 0.0
    accuracy_drop: float = 0.0
    max_accuracy_drop: float = 0.0
    passed: bool = False


@dataclasses.dataclass(frozen=True)
class RunResult:
    """`run`'s result: one `StageResult` per step (deploy is None when validation failed)."""

    baseline: StageResult
    configure: StageResult
    finetune: StageResult
    validation: ValidationResult
    deploy: StageResult | None

    @property
    def passed(self) -> bool:
        return self.validation.passed


# --------------------------------------------------------------------------------------------
# Shared helpers


def _tracker(run: RunDir, output_dir: Path, manifest: dict):
    from keras_lean.energy import EnergyTracker

    energy = manifest.get("energy", {})
    return EnergyTracker(
        output_dir,
        carbon_intensity=energy.get("carbon_intensity", 475.0),
        pue=energy.get("pue", 1.0),
        cpu_tdp_w=energy.get("cpu_tdp_w"),
        run_name=run.name,
    )


@contextlib.contextmanager
def _stage(run: RunDir, stage: str, manifest: dict, flops: float | None = None) -> Iterator[dict]:
    """Runs the block inside an energy window; on success records the stage in report.json.

    The block fills the yielded dict (accuracy, sizes, details, flops); nothing is recorded if
    the block raises, so a failed stage leaves the report as it was. The energy files follow the
    same rule: they are written to a temporary folder that replaces `energy/<stage>/` only on
    success; a failed attempt's records (the energy it spent) go to `energy/<stage>.failed/`,
    and the last successful run's `energy/<stage>/` stays as it was.
    """
    info: dict[str, Any] = {}
    final = run.energy_dir(stage)
    with atomic_directory(final) as tmp:
        try:
            with _tracker(run, tmp, manifest) as tracker:
                info["tracker"] = tracker
                with tracker.window(stage, flops=flops) as window:
                    yield info
                    if info.get("flops") is not None:
                        window.flops = float(info["flops"])
        except BaseException:
            failed = final.with_name(f"{stage}.failed")
            with contextlib.suppress(OSError):  # never hide the stage's own error
                with atomic_directory(failed) as keep:
                    shutil.copytree(tmp, keep, dirs_exist_ok=True)
            raise
        rec = window.record
        entry = {
            "stage": stage,
            "started_at": rec.start_time,
            "duration_s": rec.duration_s,
            "energy_j": rec.energy_j,
            "energy_kwh": rec.energy_kwh,
            "energy_method": rec.method,
            "emissions_kg": rec.emissions_kg,
            "flops": rec.flops,
            "accuracy": info.get("accuracy"),
            "params": info.get("params"),
            "nonzero_params": info.get("nonzero_params"),
            "gzip_bytes": info.get("gzip_bytes"),
            "details": info.get("details", {}),
        }
        run.record_stage(entry)
        info["entry"] = entry


def _forward_flops(model: keras.Model) -> int | None:
    """Forward FLOPs per sample from `keras_lean.flops`, or None where it cannot count."""
    try:
        from keras_lean.flops import count_flops

        return int(count_flops(model).total)
    except Exception:  # an exotic layer the counter rejects must not fail a stage
        return None


def _load_run_data(run: RunDir, manifest: dict, data: str | None, val_split: float | None) -> Data:
    spec = data if data is not None else manifest.get("data", "digits")
    split = val_split if val_split is not None else manifest.get("val_split", 0.2)
    return load_data(spec, val_split=split, seed=manifest.get("seed", 0))


def _data_spec(data: str | os.PathLike) -> str:
    """Stores file and folder data as absolute paths, so later steps find them from anywhere."""
    s = str(data)
    return s if s == "digits" else str(Path(s).resolve())


def _loss(from_logits: bool):
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _outputs_are_probabilities(model: keras.Model, x) -> bool:
    import numpy as np

    out = np.asarray(model.predict(x[:64], verbose=0), dtype="float64")
    return bool(
        out.ndim == 2
        and np.all(out >= -1e-6)
        and np.all(out <= 1 + 1e-6)
        and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    )


def _evaluate(model: keras.Model, data: Data, from_logits: bool = False) -> float:
    """Validation accuracy: argmax of the outputs against the labels (logits or probabilities).

    Uses `predict` so the model's compile state (optimizer, strategy) is left untouched.
    """
    import numpy as np

    out = np.asarray(model.predict(data.x_val, batch_size=_EVAL_BATCH, verbose=0))
    return float(np.mean(out.argmax(axis=-1) == data.y_val))


def _finalize(model: keras.Model, methods: Sequence) -> keras.Model:
    """The deploy chain: each method's `finalize`, last-applied first (unwrap in reverse)."""
    for method in sorted(methods, key=lambda m: m.order, reverse=True):
        model = method.finalize(model)
    return model


def _check_no_wrappers(model: keras.Model) -> None:
    from keras_lean.sparsity import PruneLowMagnitude

    def walk(m):
        for layer in m.layers:
            if isinstance(layer, PruneLowMagnitude):
                raise ValueError(
                    f"deploy: layer {layer.name!r} is still wrapped in PruneLowMagnitude after "
                    f"the methods' finalize chain."
                )
            if hasattr(layer, "layers"):
                walk(layer)

    walk(model)


# --------------------------------------------------------------------------------------------
# Step 1


def train_baseline(
    out: str | os.PathLike | RunDir,
    *,
    data: str | os.PathLike = "digits",
    arch: str = "cnn",
    model_path: str | os.PathLike | None = None,
    epochs: int = 8,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    val_split: float = 0.2,
    seed: int = 0,
    strategy: str = "default",
    carbon_intensity: float | str = 475.0,
    pue: float = 1.0,
    cpu_tdp_w: float | None = None,
    verbose: int = 1,
) -> StageResult:
    """Step 1: trains a built-in baseline, or adopts and evaluates the user's model.

    Writes `RUN/baseline.keras` and `RUN/manifest.json` (data, architecture, strategy, seed and
    energy settings, which later steps reuse).

    Args:
        out: the run folder.
        data: `digits`, a `.npz` file or an image folder (see `load_data`).
        arch: built-in architecture, `cnn` or `mlp` (ignored with `model_path`).
        model_path: a `.keras` model to adopt instead of training one; it is evaluated, not
            trained.
        epochs: training epochs of the built-in model (>= 1).
        batch_size: training batch size (>= 1).
        learning_rate: Adam learning rate (> 0).
        val_split: validation fraction where the data has no split.
        seed: random seed (data split, initialization, shuffling).
        strategy: `default`, `mirrored` or `multiworker` (`tf.distribute`).
        carbon_intensity: gCO2e/kWh or a country code, for every stage of this run.
        pue: data-centre PUE for every stage of this run.
        cpu_tdp_w: CPU TDP in watts for the energy estimate (None: the energy package default).
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).

    Returns:
        A `StageResult`.

    Raises:
        ValueError: bad arguments, unreadable data or model, or data that does not fit it.
        FileNotFoundError: the data or model file does not exist.
    """
    import keras

    run = _as_run(out)
    if model_path is None and arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}. Received: arch={arch!r}")
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(STRATEGIES)}. Received: strategy={strategy!r}"
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {name}={value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0. Received: learning_rate={learning_rate}")
    ds = load_data(data, val_split=val_split, seed=seed)
    keras.utils.set_random_seed(seed)
    manifest = {
        "version": 1,
        "data": _data_spec(data),
        "val_split": val_split,
        "seed": seed,
        "strategy": strategy,
        "arch": None if model_path is not None else arch,
        "model_source": str(Path(model_path).resolve()) if model_path is not None else None,
        "input_shape": list(ds.x_train.shape[1:]),
        "num_classes": ds.num_classes,
        "energy": {"carbon_intensity": carbon_intensity, "pue": pue, "cpu_tdp_w": cpu_tdp_w},
    }
    # Fail on bad energy settings before any work (the tracker validates them).
    from keras_lean.energy import TrackerConfig

    TrackerConfig(**manifest["energy"])
    strat = get_strategy(strategy)
    if model_path is not None:
        with strat.scope():
            model = load_model(model_path)
        check_data_against_model(ds, model, model_name=str(model_path))
    with _stage(run, "baseline", manifest) as info:
        details: dict[str, Any] = {"data": manifest["data"], "strategy": strategy}
        if model_path is None:
            with strat.scope():
                model = build_model(arch, ds.x_train.shape[1:], ds.num_classes)
                model.compile(
                    optimizer=keras.optimizers.Adam(learning_rate),
                    loss=_loss(False),
                    metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                )
            history = model.fit(
                ds.x_train,
                ds.y_train,
                batch_size=batch_size,
                epochs=epochs,
                validation_data=(ds.x_val, ds.y_val),
                callbacks=[info["tracker"].callback()],
                verbose=verbose,
            )
            from_logits = False
            fwd = _forward_flops(model)
            info["flops"] = None if fwd is None else 3 * fwd * len(ds.x_train) * epochs
            details.update(
                arch=arch,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                history={k: [float(v) for v in vs] for k, vs in history.history.items()},
            )
        else:
            from_logits = not _outputs_are_probabilities(model, ds.x_val)
            details.update(model_source=manifest["model_source"], from_logits=from_logits)
        manifest["from_logits"] = from_logits
        info["accuracy"] = _evaluate(model, ds, from_logits)
        save_model_atomic(model, run.baseline)
        atomic_write_json(run.manifest, manifest)
        _fill_sizes(info, model)
        info["details"] = details
    return StageResult("baseline", info["entry"], {"baseline": str(run.baseline)})


def _fill_sizes(info: dict, deployable: keras.Model) -> None:
    from keras_lean.export import weight_sizes

    sizes = weight_sizes(deployable)
    info.update(
        params=sizes.params, nonzero_params=sizes.nonzero_params, gzip_bytes=sizes.gzip_bytes
    )


# --------------------------------------------------------------------------------------------
# Step 2


def configure(
    out: str | os.PathLike | RunDir,
    *,
    recipe: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    target_sparsity: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    jit_compile: str | None = None,
    mixed_precision: bool | None = None,
    quantization: str | None = None,
    max_accuracy_drop: float | None = None,
    force: bool = False,
) -> StageResult:
    """Step 2: writes `RUN/recipe.yaml`, a commented recipe listing the model's prunable layers.

    Starts from `recipe` (a YAML file) or the defaults, then sets the fields given here.

    Args:
        out: the run folder (must hold `baseline.keras`).
        recipe: a recipe file to start from.
        methods: method names (replaces the recipe's).
        target_sparsity: sets `target_sparsity` of every method section that has one.
        epochs: `finetune.epochs`.
        batch_size: `finetune.batch_size`.
        learning_rate: `finetune.learning_rate`.
        jit_compile: `finetune.jit_compile` (`on`, `off`, `auto`).
        mixed_precision: `finetune.mixed_precision`.
        quantization: `export.quantization`.
        max_accuracy_drop: the validation gate.
        force: overwrite an existing `recipe.yaml` (otherwise it is an error, so hand edits are
            not lost).

    Returns:
        A `StageResult` (artifact `recipe`).

    Raises:
        MissingStepError: no baseline yet.
        FileExistsError: `recipe.yaml` exists and `force` is False.
        ValueError: an invalid value (naming the recipe field).
    """
    run = _as_run(out)
    run.require(run.baseline, for_step="configure")
    if run.recipe.exists() and not force:
        raise FileExistsError(
            f"{run.recipe} exists (it may hold your edits); pass force=True (--force) to "
            f"overwrite it."
        )
    base = load_recipe(recipe) if recipe is not None else Recipe()
    rec = _apply_overrides(
        base,
        methods=methods,
        target_sparsity=target_sparsity,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        jit_compile=jit_compile,
        mixed_precision=mixed_precision,
        quantization=quantization,
        max_accuracy_drop=max_accuracy_drop,
    )
    manifest = run.read_manifest()
    with _stage(run, "configure", manifest) as info:
        model = load_model(run.baseline)
        layers = _prunable_layers(model)
        header = (
            f"keras_lean recipe for run {run.name!r} (model {model.name!r}).\n"
            "Edit it, then run `keras-lean finetune`. Reference: docs/recipe.md.\n"
            "Unknown keys are errors; every field below is shown with its value."
        )
        text = recipe_to_yaml(rec, header=header, layers=layers)
        atomic_write_text(run.recipe, text)
        info["details"] = {"methods": list(rec.methods), "prunable_layers": layers}
    return StageResult("configure", info["entry"], {"recipe": str(run.recipe)})


def _prunable_layers(model: keras.Model) -> list[str]:
    from keras_lean.sparsity import is_prunable

    out = []

    def walk(m):
        for layer in m.layers:
            if hasattr(layer, "layers") and not is_prunable(layer):
                walk(layer)
            elif is_prunable(layer):
                n = sum(int(math.prod(w.shape)) for w in layer.weights)
                out.append(f"{layer.name} ({type(layer).__name__}, {n} params)")

    walk(model)
    return out


def _apply_overrides(rec: Recipe, **o: Any) -> Recipe:
    changes: dict[str, Any] = {}
    methods = tuple(o["methods"]) if o.get("methods") else rec.methods
    if o.get("methods"):
        changes["methods"] = methods
    if o.get("max_accuracy_drop") is not None:
        changes["max_accuracy_drop"] = o["max_accuracy_drop"]
    if o.get("target_sparsity") is not None:
        from keras_lean.pipeline.recipe import method_class

        touched = False
        for name in methods:
            cls = method_class(name)
            opts = rec.method_options.get(name) or cls.options_class()
            if any(f.name == "target_sparsity" for f in dataclasses.fields(opts)):
                changes[name] = dataclasses.replace(opts, target_sparsity=o["target_sparsity"])
                touched = True
        if not touched:
            raise ValueError(
                f"target_sparsity was given but none of the methods {list(methods)} has a "
                f"target_sparsity option."
            )
    ft: dict[str, Any] = {}
    for key in ("epochs", "batch_size", "learning_rate", "jit_compile", "mixed_precision"):
        if o.get(key) is not None:
            ft[key] = o[key]
    if ft:
        changes["finetune"] = dataclasses.replace(rec.finetune, **ft)
    if o.get("quantization") is not None:
        changes["export"] = dataclasses.replace(rec.export, quantization=o["quantization"])
    return rec.replace(**changes) if changes else rec


# --------------------------------------------------------------------------------------------
# Step 3


@dataclasses.dataclass(frozen=True)
class JitDecision:
    """The measured `jit_compile: auto` choice.

    Attributes:
        jit_compile: the choice.
        step_ms_off: median train-step time without XLA.
        step_ms_on: median train-step time with XLA (None if XLA failed).
        compile_s_off: first-step (trace) time without XLA.
        compile_s_on: first-step (trace + XLA compile) time with XLA.
        reason: why.
    """

    jit_compile: bool
    step_ms_off: float
    step_ms_on: float | None
    compile_s_off: float
    compile_s_on: float | None
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decide_jit_compile(
    model: keras.Model,
    data: Data,
    *,
    batch_size: int,
    total_steps: int,
    loss: Any,
    steps: int = 8,
) -> JitDecision:
    """Times a few train steps with and without XLA and keeps the faster over the whole run.

    XLA wins only if its per-step saving over `total_steps` outweighs its extra compile time;
    never assumed (on small CPU models XLA is often slower). The model's weights are restored
    afterwards; the caller compiles it again for the real run.

    Args:
        model: the model about to be fine-tuned (built, not necessarily compiled).
        data: training data (one batch is used).
        batch_size: the fine-tune batch size.
        total_steps: fine-tune optimizer steps.
        loss: the loss.
        steps: timed steps per setting (after one warm-up step).

    Returns:
        A `JitDecision`.
    """
    import statistics

    import keras

    n = min(batch_size, len(data.x_train))
    x, y = data.x_train[:n], data.y_train[:n]
    saved = model.get_weights()
    timings: dict[bool, tuple[float, float]] = {}
    failure = None
    try:
        for jit in (False, True):
            try:
                model.compile(optimizer=keras.optimizers.Adam(), loss=loss, jit_compile=jit)
                t0 = time.perf_counter()
                model.train_on_batch(x, y)
                first = time.perf_counter() - t0
                per_step = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    model.train_on_batch(x, y)
                    per_step.append(time.perf_counter() - t0)
                timings[jit] = (first, statistics.median(per_step) * 1e3)
            except Exception as e:  # XLA may not support an op: then the answer is "off"
                if not jit:
                    raise
                failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        model.set_weights(saved)
    first_off, ms_off = timings[False]
    if True not in timings:
        return JitDecision(False, ms_off, None, first_off, None, f"XLA failed: {failure}")
    first_on, ms_on = timings[True]
    saving_s = (ms_off - ms_on) / 1e3 * total_steps
    extra_compile_s = first_on - first_off
    use = ms_on < ms_off and saving_s > extra_compile_s
    reason = (
        f"XLA step {ms_on:.2f} ms vs {ms_off:.2f} ms without; over {total_steps} steps "
        f"{'saves' if saving_s > 0 else 'costs'} {abs(saving_s):.2f} s against "
        f"{extra_compile_s:.2f} s extra compile"
    )
    return JitDecision(use, ms_off, ms_on, first_off, first_on, reason)


def _with_policy(
    model: keras.Model, policy: str, keep: frozenset[str] = frozenset()
) -> keras.Model:
    """A clone whose layers (except those named in `keep`) use dtype policy `policy`."""
    import keras

    def clone_fn(layer):
        cfg = layer.get_config()
        if layer.name not in keep and "dtype" in cfg:
            cfg["dtype"] = policy
        return layer.__class__.from_config(cfg)

    clone = keras.models.clone_model(model, clone_function=clone_fn)
    clone.set_weights(model.get_weights())
    return clone


def _with_mixed_precision(model: keras.Model) -> keras.Model:
    """A clone computing in float16 (variables float32); output layers stay float32."""
    output_layers = frozenset(t._keras_history[0].name for t in model.outputs)
    return _with_policy(model, "mixed_float16", keep=output_layers)


def _as_float32(model: keras.Model) -> keras.Model:
    """Deployment form of a mixed-precision model: float32 everywhere (TFLite's float path)."""

    def mixed(m) -> bool:
        return any(
            getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32") != "float32"
            or (hasattr(layer, "layers") and mixed(layer))
            for layer in m.layers
        )

    return _with_policy(model, "float32") if mixed(model) else model


def _recipe_digest(rec: Recipe) -> str:
    return hashlib.sha256(json.dumps(rec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class _Checkpoint:
    """Saves the model after every epoch (atomically), with the epoch number beside it."""

    def __new__(cls, run: RunDir, state: dict):
        import keras

        class Checkpoint(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                save_model_atomic(self.model, run.checkpoint)
                atomic_write_json(run.checkpoint_state, {**state, "epoch": epoch + 1})

        return Checkpoint()


class PipelineFit:
    """The `fit` handed to `Method.finetune` (the method contract's `FitFn`).

    Calling it compiles the model with the recipe's optimizer, loss and XLA choice under the
    run's strategy, and trains on the run's data: `fit(model, epochs=None, callbacks=(),
    initial_epoch=0)`. A method that compiles and trains by itself (lottery) reads the same
    settings from its attributes, so its training matches the pipeline's.

    Attributes:
        loss: the run's loss.
        jit_compile: the run's XLA decision.
        verbose: Keras progress output.
    """

    def __init__(
        self,
        *,
        data,
        learning_rate,
        loss,
        jit_compile,
        batch_size,
        epochs,
        strategy,
        tracker,
        verbose,
        keep_compiled=None,
    ):
        self._data = data
        self._learning_rate = learning_rate
        self._batch_size = batch_size
        self._epochs = epochs
        self._strategy = strategy
        self._tracker = tracker
        self._keep_compiled = keep_compiled
        self.loss = loss
        self.jit_compile = jit_compile
        self.verbose = verbose

    def optimizer(self):
        """A fresh Adam at the recipe's learning rate."""
        import keras

        return keras.optimizers.Adam(self._learning_rate)

    def scope(self):
        """The run's distribution-strategy scope (create variables under it)."""
        return self._strategy.scope()

    def energy_window(self, name: str):
        """Measures a block as an energy window nested in the stage's.

        Returns a context manager yielding the `Window`; its `record` (energy_j, duration_s) is
        set when the block ends.
        """
        return self._tracker.window(name)

    def energy_callback(self):
        """A Keras callback recording each epoch's energy (nested in the open window)."""
        return self._tracker.callback()

    def __call__(self, m, epochs=None, callbacks=(), initial_epoch=0):
        import keras

        if self._keep_compiled is not None and m is self._keep_compiled:
            self._keep_compiled = None  # a resumed model keeps its restored optimizer state
            m.jit_compile = self.jit_compile
        else:
            with self._strategy.scope():
                m.compile(
                    optimizer=self.optimizer(),
                    loss=self.loss,
                    metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                    jit_compile=self.jit_compile,
                )
        ds = self._data
        return m.fit(
            ds.x_train,
            ds.y_train,
            batch_size=self._batch_size,
            epochs=epochs if epochs is not None else self._epochs,
            validation_data=(ds.x_val, ds.y_val),
            callbacks=list(callbacks),
            initial_epoch=initial_epoch,
            verbose=self.verbose,
        )


def finetune(
    out: str | os.PathLike | RunDir,
    *,
    resume: bool = False,
    strategy: str | None = None,
    data: str | os.PathLike | None = None,
    val_split: float | None = None,
    verbose: int = 1,
) -> StageResult:
    """Step 3: applies the recipe's methods and fine-tunes; writes `RUN/finetuned.keras`.

    The methods' `prepare` runs in ascending order (wrapping, transforming); one `fit` then
    trains (or the method that owns the loop, e.g. lottery, runs it). After every epoch the model
    is checkpointed atomically to `RUN/checkpoint.keras`; `resume=True` continues from it (the
    pruning step, masks and optimizer state included).

    With `recipe.guard.stages`, the pruning method runs in stages instead (see
    `keras_lean.pipeline.guard`): each stage is validated against the baseline's accuracy, the
    last stage within `max_accuracy_drop` is kept (the baseline if none is), and every stage is
    recorded under `details.guard`. Guarded runs are not checkpointed per epoch.

    Args:
        out: the run folder (must hold `baseline.keras` and `recipe.yaml`).
        resume: continue from the last checkpoint if there is one for this recipe.
        strategy: override the run's `tf.distribute` strategy.
        data: override the run's data (must have the same shapes).
        val_split: override the run's validation split.
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).

    Returns:
        A `StageResult` (artifact `finetuned`).

    Raises:
        MissingStepError: no baseline or recipe yet.
        ValueError: invalid recipe, data that does not fit the model, or a checkpoint made with
            a different recipe.
    """
    import keras

    run = _as_run(out)
    run.require(run.baseline, for_step="finetune")
    run.require(run.recipe, for_step="finetune")
    rec = load_recipe(run.recipe)
    manifest = run.read_manifest()
    strategy = strategy or manifest.get("strategy", "default")
    strat = get_strategy(strategy)
    ds = _load_run_data(run, manifest, None if data is None else str(data), val_split)
    ft: FinetuneOptions = rec.finetune
    from_logits = bool(manifest.get("from_logits", False))
    loss = _loss(from_logits)
    plan = FinetunePlan(
        epochs=ft.epochs,
        steps_per_epoch=math.ceil(len(ds.x_train) / ft.batch_size),
        batch_size=ft.batch_size,
    )
    digest = _recipe_digest(rec)
    methods = rec.ordered_methods()
    keras.utils.set_random_seed(ft.seed)

    guard = rec.guard
    resumed_from = None
    resume_note = None
    if resume and guard.enabled:
        resume_note = "recipe.guard runs restart from the first stage: started from the beginning"
    elif resume and run.checkpoint.exists() and run.checkpoint_state.exists():
        state = json.loads(run.checkpoint_state.read_text())
        if state.get("recipe") != digest:
            raise ValueError(
                f"{run.checkpoint} was made with a different recipe.yaml; fine-tune again "
                f"without --resume to start over."
            )
        resumed_from = int(state["epoch"])
    elif resume:
        resume_note = "no checkpoint for this recipe: started from the beginning"
    with _stage(run, "finetune", manifest) as info:
        with strat.scope():
            if resumed_from is not None:
                model = load_model(run.checkpoint, compile=True)
                method_reports = state.get("methods", {})
            else:
                model = load_model(run.baseline)
                check_data_against_model(ds, model, model_name=str(run.baseline))
                if guard.enabled:
                    # The stages are judged against the baseline as `validate` measures it.
                    baseline_accuracy = _evaluate(model, ds, from_logits)
                if ft.mixed_precision:
                    model = _with_mixed_precision(model)
                if not guard.enabled:  # the guard prepares each stage itself
                    for method in methods:
                        model = method.prepare(model, ds, plan)
                method_reports = {m.name: m.report() for m in methods}

        jit, probe = _jit_choice(
            run, rec, model, ds, plan, loss, strategy, strat, info["tracker"], resumed_from is None
        )
        state = {"recipe": digest, "methods": _jsonable(method_reports)}
        fit = PipelineFit(
            data=ds,
            learning_rate=ft.learning_rate,
            loss=loss,
            jit_compile=jit.jit_compile,
            batch_size=ft.batch_size,
            epochs=ft.epochs,
            strategy=strat,
            tracker=info["tracker"],
            verbose=verbose,
            keep_compiled=model if resumed_from is not None else None,
        )

        epochs_run = None
        guard_details = None
        if guard.enabled:
            from keras_lean.pipeline.guard import run_stages

            outcome = run_stages(
                model,
                methods[0],
                ds,
                guard=guard,
                steps_per_epoch=plan.steps_per_epoch,
                batch_size=ft.batch_size,
                fit=fit,
                evaluate=lambda m: _evaluate(m, ds, from_logits),
                baseline_accuracy=baseline_accuracy,
                max_accuracy_drop=rec.max_accuracy_drop,
                energy_window=fit.energy_window,
                callbacks=lambda: [fit.energy_callback()],
                scope=fit.scope,
            )
            model, methods = outcome.model, [outcome.method]
            epochs_run = outcome.epochs_run
            guard_details = outcome.to_dict()
        else:
            model, epochs_run = _train(
                model, methods, ds, plan, fit, run, state, method_reports, ft, resumed_from
            )
        info["accuracy"] = _evaluate(model, ds, from_logits)
        save_model_atomic(model, run.finetuned)
        for p in (run.checkpoint, run.checkpoint_state):
            if p.exists():
                p.unlink()
        deployable = _finalize(model, methods)
        _fill_sizes(info, deployable)
        fwd = _forward_flops(deployable)
        samples = len(ds.x_train) * (epochs_run if epochs_run is not None else ft.epochs)
        info["flops"] = None if fwd is None else 3 * fwd * samples
        if resumed_from is None:
            method_reports = {m.name: m.report() for m in methods}
        else:
            for m in methods:
                method_reports[m.name] = {**method_reports.get(m.name, {}), **m.report()}
        info["details"] = _jsonable(
            {
                "methods": method_reports,
                "jit_compile": jit.to_dict(),
                "jit_probe": probe,
                "mixed_precision": ft.mixed_precision,
                "strategy": strategy,
                "replicas": int(strat.num_replicas_in_sync),
                "epochs_run": epochs_run,
                "resumed_from_epoch": resumed_from,
                "resume_note": resume_note,
                "plan": dataclasses.asdict(plan),
            }
        )
        if guard_details is not None:
            info["details"]["guard"] = _jsonable(guard_details)
    return StageResult("finetune", info["entry"], {"finetuned": str(run.finetuned)})


def _train(model, methods, ds, plan, fit, run, state, method_reports, ft, resumed_from):
    """One fit with checkpoints and early stopping, or the loop of a method that owns it.

    Returns the trained model and the epochs run.
    """
    import keras

    callbacks = [_Checkpoint(run, state)]
    for method in methods:
        callbacks.extend(method.callbacks(plan))
    es = ft.early_stopping
    if es.enabled:
        start = 0
        if es.after_pruning:
            start = _pruning_end_epoch(method_reports, plan)
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy",
                mode="max",
                patience=es.patience,
                min_delta=es.min_delta,
                start_from_epoch=start,
            )
        )
    for method in methods:
        owned = method.finetune(model, ds, plan, fit)
        if owned is not None:
            return owned, method.report().get("epochs_run")
    history = fit(
        model,
        callbacks=[*callbacks, fit.energy_callback()],
        initial_epoch=resumed_from or 0,
    )
    return model, len(history.history.get("loss", []))


def _jsonable(obj: Any) -> Any:
    return json.loads(
        json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def _pruning_end_epoch(method_reports: dict, plan: FinetunePlan) -> int:
    """The epoch in which the last sparsity schedule ends (0 if no method reports one)."""
    end = 0
    for rep in method_reports.values():
        sched = rep.get("schedule") if isinstance(rep, dict) else None
        if isinstance(sched, dict) and "end_step" in sched:
            end = max(end, math.ceil((int(sched["end_step"]) + 1) / plan.steps_per_epoch))
    return end


def _jit_choice(
    run, rec, model, ds, plan, loss, strategy, strat, tracker, measure
) -> tuple[JitDecision, dict | None]:
    """The XLA decision, and the energy record of measuring it (None when nothing was measured).

    The measurement runs in its own `jit_probe` window inside the finetune stage's, so its cost is
    counted in the stage (it was spent) and shown apart (it is paid once per run folder).
    """
    mode = rec.finetune.jit_compile
    if mode in ("on", "off"):
        on = mode == "on"
        return JitDecision(on, 0.0, None, 0.0, None, f"recipe: jit_compile: {mode}"), None
    key = {
        "batch_size": rec.finetune.batch_size,
        "strategy": strategy,
        "methods": list(rec.methods),
        "mixed_precision": rec.finetune.mixed_precision,
        "input_shape": list(ds.x_train.shape[1:]),
    }
    if run.jit_decision.exists():
        cached = json.loads(run.jit_decision.read_text())
        if cached.get("key") == key:
            d = cached["decision"]
            return JitDecision(**{**d, "reason": f"cached: {d['reason']}"}), None
    if not measure:
        # Measuring recompiles the model, which would drop a resumed optimizer state.
        decision = JitDecision(False, 0.0, None, 0.0, None, "resumed without a cached decision")
        return decision, None
    with tracker.window("jit_probe") as window, strat.scope():
        decision = decide_jit_compile(
            model, ds, batch_size=rec.finetune.batch_size, total_steps=plan.total_steps, loss=loss
        )
    atomic_write_json(run.jit_decision, {"key": key, "decision": decision.to_dict()})
    rec_ = window.record
    return decision, {"duration_s": rec_.duration_s, "energy_j": rec_.energy_j}


# --------------------------------------------------------------------------------------------
# Step 4


def validate(
    out: str | os.PathLike | RunDir,
    *,
    data: str | os.PathLike | None = None,
    val_split: float | None = None,
) -> ValidationResult:
    """Step 4: evaluates baseline and fine-tuned models on the validation data; the gate.

    Writes `RUN/validation.json`. Passes when the accuracy drop (baseline minus fine-tuned) is at
    most the recipe's `max_accuracy_drop`.

    Args:
        out: the run folder (must hold `baseline.keras`, `finetuned.keras`, `recipe.yaml`).
        data: override the run's data.
        val_split: override the run's validation split.

    Returns:
        A `ValidationResult`; check `.passed`.

    Raises:
        MissingStepError: an input is missing.
    """
    run = _as_run(out)
    run.require(run.baseline, for_step="validate")
    run.require(run.recipe, for_step="validate")
    run.require(run.finetuned, for_step="validate")
    rec = load_recipe(run.recipe)
    manifest = run.read_manifest()
    ds = _load_run_data(run, manifest, None if data is None else str(data), val_split)
    from_logits = bool(manifest.get("from_logits", False))
    with _stage(run, "validate", manifest) as info:
        baseline = load_model(run.baseline)
        check_data_against_model(ds, baseline, model_name=str(run.baseline))
        base_acc = _evaluate(baseline, ds, from_logits)
        finetuned = load_model(run.finetuned)
        ft_acc = _evaluate(finetuned, ds, from_logits)
        drop = base_acc - ft_acc
        passed = drop <= rec.max_accuracy_drop + 1e-9
        fwd = _forward_flops(baseline)
        info["flops"] = None if fwd is None else 2 * fwd * len(ds.x_val)
        result = {
            "baseline_accuracy": base_acc,
            "finetuned_accuracy": ft_acc,
            "accuracy_drop": drop,
            "max_accuracy_drop": rec.max_accuracy_drop,
            "passed": passed,
            "val_samples": int(len(ds.x_val)),
        }
        atomic_write_json(run.validation, result)
        info["accuracy"] = ft_acc
        info["details"] = result
    return ValidationResult(
        "validate",
        info["entry"],
        {"validation": str(run.validation)},
        baseline_accuracy=base_acc,
        finetuned_accuracy=ft_acc,
        accuracy_drop=drop,
        max_accuracy_drop=rec.max_accuracy_drop,
        passed=passed,
    )


# --------------------------------------------------------------------------------------------
# Step 5


def deploy(
    out: str | os.PathLike | RunDir,
    *,
    quantization: str | None = None,
    data: str | os.PathLike | None = None,
    val_split: float | None = None,
) -> StageResult:
    """Step 5: finalizes (strips wrappers, ...), exports SavedModel and TFLite, checks them.

    Writes `RUN/export/` in one rename: `model.keras` (the plain deployable model),
    `model_saved_model/`, `model.tflite`, `baseline.tflite` (same settings, for the size ratio),
    and `deploy.json` (sizes, max abs diff of TFLite vs Keras, accuracies, latency).

    Args:
        out: the run folder (must hold `finetuned.keras` and `recipe.yaml`).
        quantization: override the recipe's `export.quantization`.
        data: override the run's data.
        val_split: override the run's validation split.

    Returns:
        A `StageResult` (artifacts `export`, `saved_model`, `tflite`, `keras`).

    Raises:
        MissingStepError: an input is missing.
        ValueError: an invalid quantization.
    """
    from keras_lean.export import export_model

    run = _as_run(out)
    run.require(run.finetuned, for_step="deploy")
    run.require(run.recipe, for_step="deploy")
    rec = load_recipe(run.recipe)
    opts: ExportOptions = rec.export
    if quantization is not None:
        opts = dataclasses.replace(opts, quantization=quantization)
    manifest = run.read_manifest()
    ds = _load_run_data(run, manifest, None if data is None else str(data), val_split)
    methods = rec.ordered_methods()
    before = {m.name: _jsonable(m.report()) for m in methods}
    with _stage(run, "deploy", manifest) as info:
        finetuned = load_model(run.finetuned)
        model = _as_float32(_finalize(finetuned, methods))
        _check_no_wrappers(model)
        folded: tuple[str, ...] = ()
        if opts.fold_batchnorm:
            from keras_lean.export import fold_batchnorm

            model, folded = fold_batchnorm(model)
        calib = ds.x_train[: opts.calibration_samples]
        common = dict(
            quantization=opts.quantization,
            calibration_x=calib,
            check_x=ds.x_val,
            check_y=ds.y_val,
            latency_batch_size=opts.latency_batch_size,
            latency_runs=opts.latency_runs,
        )
        with atomic_directory(run.export_dir) as tmp:
            save_model_atomic(model, tmp / "model.keras")
            report = export_model(model, tmp, name="model", formats=opts.formats, **common)
            baseline_report = None
            if opts.compare_baseline and "tflite" in opts.formats and run.baseline.exists():
                baseline_report = export_model(
                    load_model(run.baseline), tmp, name="baseline", formats=("tflite",), **common
                )
            details = {
                "export": _relative(report.to_dict(), tmp, run.export_dir),
                "methods": _deploy_method_reports(run, methods, before),
                "folded_batchnorm": list(folded),
            }
            if baseline_report is not None:
                details["baseline_export"] = _relative(
                    baseline_report.to_dict(), tmp, run.export_dir
                )
                details["tflite_gzip_ratio"] = (
                    report.tflite_gzip_bytes / baseline_report.tflite_gzip_bytes
                )
            details = _jsonable(details)
            atomic_write_json(tmp / "deploy.json", details)
        info["accuracy"] = (
            report.tflite_accuracy
            if report.tflite_accuracy is not None
            else (_evaluate(model, ds, bool(manifest.get("from_logits", False))))
        )
        info["params"] = report.params
        info["nonzero_params"] = report.nonzero_params
        info["gzip_bytes"] = (
            report.tflite_gzip_bytes
            if report.tflite_gzip_bytes is not None
            else report.weights_gzip_bytes
        )
        info["details"] = details
    artifacts = {"export": str(run.export_dir), "keras": str(run.export_dir / "model.keras")}
    if "saved_model" in opts.formats:
        artifacts["saved_model"] = str(run.export_dir / "model_saved_model")
    if "tflite" in opts.formats:
        artifacts["tflite"] = str(run.export_dir / "model.tflite")
    return StageResult("deploy", info["entry"], artifacts)


def _deploy_method_reports(run: RunDir, methods: Sequence, before: dict) -> dict:
    """Each method's report at deploy, completed with what it recorded at finetune.

    Deploy builds fresh method instances, which know only their options and what their
    `finalize` just found; the rest (per-layer widths, lottery rounds, schedules) was recorded
    in the finetune entry of `report.json`. What finalize set or changed wins.
    """
    recorded: dict = {}
    for entry in run.read_report():
        if entry.get("stage") == "finetune":
            recorded = (entry.get("details") or {}).get("methods") or {}
    out = {}
    for m in methods:
        now = _jsonable(m.report())
        old = before.get(m.name, {})
        learned = {k: v for k, v in now.items() if k not in old or old[k] != v}
        out[m.name] = {**now, **(recorded.get(m.name) or {}), **learned}
    return out


def _relative(d: dict, tmp: Path, final: Path) -> dict:
    """Rewrites paths inside the temporary export folder to their final location."""
    out = {}
    for k, v in d.items():
        if isinstance(v, str) and v.startswith(str(tmp)):
            v = str(final) + v[len(str(tmp)) :]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# All five, and the report


def run(
    out: str | os.PathLike | RunDir,
    *,
    data: str | os.PathLike = "digits",
    arch: str = "cnn",
    model_path: str | os.PathLike | None = None,
    baseline_epochs: int = 8,
    val_split: float = 0.2,
    seed: int = 0,
    strategy: str = "default",
    recipe: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    target_sparsity: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    jit_compile: str | None = None,
    mixed_precision: bool | None = None,
    quantization: str | None = None,
    max_accuracy_drop: float | None = None,
    carbon_intensity: float | str = 475.0,
    pue: float = 1.0,
    cpu_tdp_w: float | None = None,
    verbose: int = 1,
) -> RunResult:
    """Runs the five steps in order with the same options (see each step for them).

    With no options: scikit-learn digits, the built-in CNN, magnitude pruning to 80 %. The
    recipe is written fresh (an existing `recipe.yaml` is replaced). Deploy is skipped when
    validation fails (`result.passed` is False).

    Returns:
        A `RunResult`.
    """
    run_ = _as_run(out)
    # Validate the recipe options before training anything, so a typo fails in a second.
    base = load_recipe(recipe) if recipe is not None else Recipe()
    _apply_overrides(
        base,
        methods=methods,
        target_sparsity=target_sparsity,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        jit_compile=jit_compile,
        mixed_precision=mixed_precision,
        quantization=quantization,
        max_accuracy_drop=max_accuracy_drop,
    )
    b = train_baseline(
        run_,
        data=data,
        arch=arch,
        model_path=model_path,
        epochs=baseline_epochs,
        batch_size=batch_size or 32,
        learning_rate=learning_rate or 1e-3,
        val_split=val_split,
        seed=seed,
        strategy=strategy,
        carbon_intensity=carbon_intensity,
        pue=pue,
        cpu_tdp_w=cpu_tdp_w,
        verbose=verbose,
    )
    c = configure(
        run_,
        recipe=recipe,
        methods=methods,
        target_sparsity=target_sparsity,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        jit_compile=jit_compile,
        mixed_precision=mixed_precision,
        quantization=quantization,
        max_accuracy_drop=max_accuracy_drop,
        force=True,
    )
    f = finetune(run_, verbose=verbose)
    v = validate(run_)
    d = deploy(run_) if v.passed else None
    return RunResult(b, c, f, v, d)


@dataclasses.dataclass(frozen=True)
class RunReport:
    """The contents of `RUN/report.json`.

    Attributes:
        run: the run folder's name.
        stages: one entry per stage, in pipeline order.
    """

    run: str
    stages: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {"version": 1, "run": self.run, "stages": list(self.stages)}

    def summary(self) -> dict:
        """Headline figures: final accuracy and sparsity, TFLite gzip ratio, total time/energy."""
        by = {s["stage"]: s for s in self.stages}
        out: dict[str, Any] = {
            "duration_s": sum(s.get("duration_s") or 0 for s in self.stages),
            "energy_j": sum(s.get("energy_j") or 0 for s in self.stages),
            "emissions_kg": sum(s.get("emissions_kg") or 0 for s in self.stages),
        }
        if "validate" in by:
            out["validation"] = by["validate"]["details"]
        if "deploy" in by:
            d = by["deploy"]
            if d.get("params"):
                out["sparsity"] = 1 - d["nonzero_params"] / d["params"]
            out["tflite_gzip_ratio"] = d["details"].get("tflite_gzip_ratio")
            out["tflite_accuracy"] = d.get("accuracy")
            # Sparsity of the pruned kernels (biases and dense layers excluded), as methods report.
            for name, rep in (d["details"].get("methods") or {}).items():
                final = rep.get("final") if isinstance(rep, dict) else None
                if isinstance(final, dict) and "sparsity" in final:
                    out.setdefault("pruned_sparsity", {})[name] = final["sparsity"]
        return out

    def table(self) -> str:
        """The stages as a fixed-width text table."""
        cols = [
            ("stage", "stage", "{}"),
            ("time s", "duration_s", "{:.1f}"),
            ("energy J", "energy_j", "{:.1f}"),
            ("kWh", "energy_kwh", "{:.2e}"),
            ("energy method", "energy_method", "{}"),
            ("CO2 g", "emissions_kg", None),
            ("accuracy", "accuracy", "{:.4f}"),
            ("params", "params", "{:,}"),
            ("nonzero", "nonzero_params", "{:,}"),
            ("gzip KB", "gzip_bytes", None),
        ]
        rows = []
        for s in self.stages:
            row = []
            for _, key, fmt in cols:
                v = s.get(key)
                if v is None:
                    row.append("-")
                elif key == "emissions_kg":
                    row.append(f"{v * 1000:.3f}")
                elif key == "gzip_bytes":
                    row.append(f"{v / 1024:.1f}")
                else:
                    row.append(fmt.format(v))
            rows.append(row)
        headers = [c[0] for c in cols]
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)
        ]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            lines.append(
                "  ".join(
                    (v.ljust(w) if i in (0, 4) else v.rjust(w))
                    for i, (v, w) in enumerate(zip(r, widths, strict=True))
                )
            )
        summ = self.summary()
        extra = []
        if "validation" in summ:
            v = summ["validation"]
            extra.append(
                f"validation: baseline {v['baseline_accuracy']:.4f} -> fine-tuned "
                f"{v['finetuned_accuracy']:.4f} (drop {v['accuracy_drop']:+.4f}, max "
                f"{v['max_accuracy_drop']}): {'PASS' if v['passed'] else 'FAIL'}"
            )
        if "sparsity" in summ:
            ratio = summ.get("tflite_gzip_ratio")
            pruned = summ.get("pruned_sparsity") or {}
            extra.append(
                f"deployed: {summ['sparsity']:.1%} of all parameters are zero"
                + "".join(f"; {n}: {v:.1%} of pruned weights" for n, v in pruned.items())
                + (f"; TFLite gzip {ratio:.2f}x the baseline's" if ratio is not None else "")
            )
        extra.append(
            f"total: {summ['duration_s']:.1f} s, {summ['energy_j']:.1f} J, "
            f"{summ['emissions_kg'] * 1000:.3f} g CO2e"
        )
        return "\n".join([*lines, "", *extra, *self._detail_tables()])

    def _detail_tables(self) -> list[str]:
        """Guard stages, lottery rounds, structured widths and the XLA probe, where present."""
        by = {s["stage"]: s for s in self.stages}
        ft = (by.get("finetune") or {}).get("details") or {}
        methods = dict(ft.get("methods") or {})
        # Deploy's reports carry the finetune record plus what finalize found.
        methods.update(((by.get("deploy") or {}).get("details") or {}).get("methods") or {})
        out: list[str] = []
        guard = ft.get("guard")
        if isinstance(guard, dict) and guard.get("stages"):
            out += [
                "",
                f"guard stages (baseline accuracy {guard['baseline_accuracy']:.4f}, "
                f"max_accuracy_drop {guard['max_accuracy_drop']:g}):",
            ]
            rows = [
                (
                    str(r["stage"]),
                    f"{r['target_sparsity']:g}",
                    _fmt(r.get("sparsity"), "{:.1%}"),
                    _fmt(r.get("val_accuracy"), "{:.4f}"),
                    _fmt(r.get("accuracy_drop"), "{:+.4f}"),
                    _fmt(r.get("energy_j"), "{:.1f}"),
                    "kept" if r.get("kept") else ("ok" if r.get("within_budget") else "over"),
                )
                for r in guard["stages"]
            ]
            out += _text_table(
                ("stage", "target", "sparsity", "val acc", "drop", "energy J", "status"), rows
            )
            out.append(f"kept: {guard.get('reason', '')}")
        lottery = methods.get("lottery")
        if isinstance(lottery, dict) and lottery.get("rounds"):
            out += [
                "",
                f"lottery rounds (rewind_step {lottery.get('rewind_step')}, "
                f"scope {lottery.get('scope')}):",
            ]
            rows = [
                (
                    str(r["index"]),
                    _fmt(r.get("sparsity"), "{:.1%}"),
                    _fmt(r.get("val_accuracy"), "{:.4f}"),
                    _fmt(r.get("energy_j"), "{:.1f}"),
                    _fmt(r.get("duration_s"), "{:.1f}"),
                )
                for r in lottery["rounds"]
            ]
            out += _text_table(("round", "sparsity", "val acc", "energy J", "time s"), rows)
        structure = (methods.get("structured") or {}).get("structure")
        if isinstance(structure, dict) and structure.get("layers"):
            widths = [
                f"{r['name']} {r['width_before']}->{r['width_after']}"
                for r in structure["layers"]
                if r.get("width_before") is not None and r.get("width_after") != r["width_before"]
            ]
            out += ["", "structured widths: " + (", ".join(widths) or "unchanged")]
        probe, jit = ft.get("jit_probe"), ft.get("jit_compile") or {}
        if isinstance(probe, dict):
            out += [
                "",
                f"jit_compile auto: measured XLA {'on' if jit.get('jit_compile') else 'off'} in "
                f"{probe['duration_s']:.1f} s, {probe['energy_j']:.1f} J (inside the finetune "
                "stage; later fine-tunes of this run folder reuse the decision)",
            ]
        return out


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  " + "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    for r in rows:
        lines.append("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    return lines


def report(out: str | os.PathLike | RunDir) -> RunReport:
    """Reads `RUN/report.json`.

    Raises:
        MissingStepError: the folder has no report yet.
        ValueError: the file is not a keras_lean report.
    """
    run_ = _as_run(out)
    run_.require(run_.report_file, for_step="report")
    return RunReport(run_.name, tuple(run_.read_report()))


__all__ = [
    "SECTIONS",
    "JitDecision",
    "RunReport",
    "RunResult",
    "StageResult",
    "ValidationResult",
    "configure",
    "decide_jit_compile",
    "deploy",
    "finetune",
    "report",
    "run",
    "run_dir_for",
    "train_baseline",
    "validate",
]
