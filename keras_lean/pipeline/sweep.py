"""Sweep: several methods and sparsity targets on one baseline, as a CSV and a plot.

`sweep(out)` trains one baseline (or reuses a run folder's with `baseline_run=`), then for each
(method, target) point writes a recipe into its own run folder `OUT/<method>-<target>/` and runs
configure, finetune, validate and deploy there. Each point's figures come from that folder's
`report.json`: the validation metric and its change against the baseline (accuracy drop for a
classifier; perplexity rise, relative, for a causal LM: the metric the run's validate step gates
on), measured sparsity and parameter fraction of the deployed model, fine-tune energy and TFLite
latency. Layout of `OUT/`::

    baseline/            the baseline run folder (absent with `baseline_run=`)
    magnitude-0.5/       one complete run folder per point (`keras-lean report` reads it)
    ...
    sweep.csv            one row per point, rewritten (atomically) after every point
    sweep.png            the metric (accuracy or perplexity), fine-tune energy and latency
                         against sparsity

A point that fails records its error in its row and the sweep goes on. The sweet spot is the
point with the highest sparsity whose change passes the recipe's `max_metric_drop` for that
metric (`max_accuracy_drop`, or `max_perplexity_rise` for a causal LM); it is marked in the CSV
(`sweet_spot`) and on the plot. The plot needs matplotlib (the `plot` extra); without it the
CSV is written and `SweepResult.plot_message` says how to install it.

Example:
    >>> from keras_lean.pipeline.sweep import sweep
    >>> result = sweep("savedmodels/sweep", methods=["magnitude"], targets=[0.5, 0.8, 0.9])
    >>> result.sweet_spot.method, result.sweet_spot.sparsity
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keras_lean.pipeline.methods import method_classes
from keras_lean.pipeline.plots import PLOT_INSTALL_HINT, plot_sweep
from keras_lean.pipeline.recipe import Recipe, load_recipe, method_class, recipe_to_yaml
from keras_lean.pipeline.rundir import RunDir, atomic_write_text
from keras_lean.pipeline.steps import configure, deploy, finetune, train_baseline, validate
from keras_lean.pipeline.steps.report import fmt, text_table
from keras_lean.pipeline.steps.stage import StageEntry

CSV_NAME = "sweep.csv"
PNG_NAME = "sweep.png"
BASELINE_NAME = "baseline"


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One (method, target) point of a sweep: one row of `sweep.csv`.

    Fractions are in [0, 1]; `None` (an empty CSV cell) where a stage did not get that far.

    Attributes:
        method: the recipe method.
        target: the value given to the method's target option.
        target_option: what the target sets: `target_sparsity`, `ratio` (structured), or
            `final_sparsity` (lottery: its per-round `rate` is derived from `rounds`).
        folder: the point's run folder, relative to the sweep folder.
        status: `ok` or `failed`.
        accuracy: validation accuracy of the fine-tuned Keras model (`validate`; token
            accuracy for a causal LM).
        baseline_accuracy: the baseline's validation accuracy (`validate`).
        accuracy_drop: `baseline_accuracy - accuracy`.
        max_accuracy_drop: the recipe's gate of classifiers.
        metric: what `validate` gated the run on, so what `passed` and the sweet spot judge:
            `accuracy` (classifiers) or `perplexity` (causal LMs).
        perplexity: validation perplexity of the fine-tuned causal LM (else empty).
        baseline_perplexity: the baseline's.
        perplexity_rise: `(perplexity - baseline_perplexity) / baseline_perplexity`.
        max_perplexity_rise: the recipe's gate of causal LMs.
        passed: whether the change of `metric` is within its budget (`judge_point`).
        sweet_spot: the highest-`sparsity` point that passed (one per sweep at most).
        sparsity: fraction of the baseline's parameters that are gone or zero in the deployed
            model, `1 - nonzero_params / baseline_params` (biases included), so unstructured
            and structured points share one axis.
        pruned_sparsity: sparsity of the pruned kernels as the method reports it (what
            `target_sparsity` sets); empty for methods that remove whole channels.
        param_fraction: `params / baseline_params`: below 1 only where parameters were
            physically removed (structured).
        params: parameters of the deployed model.
        nonzero_params: its parameters that are not zero.
        baseline_params: parameters of the baseline.
        tflite_accuracy: validation accuracy of the TFLite model in the interpreter.
        tflite_gzip_bytes: gzip size of the `.tflite` file.
        tflite_gzip_ratio: that size over the baseline `.tflite`'s, with the same settings.
        finetune_duration_s: wall time of the fine-tune stage.
        finetune_energy_j: energy of the fine-tune stage (`report.json`).
        finetune_energy_kwh: the same in kWh.
        energy_method: how it was obtained (`measured:...` or `estimated:cpu-tdp`).
        keras_latency_ms: median time of one batch through Keras `predict`.
        tflite_latency_ms: median time of one batch through the TFLite interpreter.
        latency_batch_size: the batch size of both latencies.
        error: `stage: ExceptionType: message` when the point failed.
    """

    method: str
    target: float
    target_option: str
    folder: str
    status: str = "failed"
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    accuracy_drop: float | None = None
    max_accuracy_drop: float | None = None
    metric: str = "accuracy"
    perplexity: float | None = None
    baseline_perplexity: float | None = None
    perplexity_rise: float | None = None
    max_perplexity_rise: float | None = None
    passed: bool | None = None
    sweet_spot: bool = False
    sparsity: float | None = None
    pruned_sparsity: float | None = None
    param_fraction: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    baseline_params: int | None = None
    tflite_accuracy: float | None = None
    tflite_gzip_bytes: int | None = None
    tflite_gzip_ratio: float | None = None
    finetune_duration_s: float | None = None
    finetune_energy_j: float | None = None
    finetune_energy_kwh: float | None = None
    energy_method: str | None = None
    keras_latency_ms: float | None = None
    tflite_latency_ms: float | None = None
    latency_batch_size: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def value(self) -> float | None:
        """The fine-tuned model's figure of `metric` (accuracy or perplexity)."""
        return self.perplexity if self.metric == "perplexity" else self.accuracy

    @property
    def change(self) -> float | None:
        """How much worse than the baseline, in `metric`'s own terms (drop or relative rise)."""
        return self.perplexity_rise if self.metric == "perplexity" else self.accuracy_drop

    @property
    def budget(self) -> float | None:
        """The largest `change` that passes (`max_perplexity_rise` or `max_accuracy_drop`)."""
        return self.max_perplexity_rise if self.metric == "perplexity" else self.max_accuracy_drop

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: The columns of `sweep.csv`, in order.
CSV_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SweepPoint))


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What `sweep` did.

    Attributes:
        out: the sweep folder.
        baseline_dir: the baseline run folder the points started from.
        points: one `SweepPoint` per (method, target), in sweep order.
        csv_path: `OUT/sweep.csv`.
        png_path: `OUT/sweep.png`, or None when it could not be drawn (see `plot_message`).
        plot_message: why there is no plot (e.g. matplotlib is not installed), else None.
        jit_decision: the `JitDecision` taken once for every point when the recipe said
            `jit_compile: auto`, else None.
    """

    out: Path
    baseline_dir: Path
    points: tuple[SweepPoint, ...]
    csv_path: Path
    png_path: Path | None
    plot_message: str | None = None
    jit_decision: Any = None

    @property
    def sweet_spot(self) -> SweepPoint | None:
        """The marked point, or None when no point passed validation."""
        return next((p for p in self.points if p.sweet_spot), None)

    @property
    def failed(self) -> tuple[SweepPoint, ...]:
        return tuple(p for p in self.points if not p.ok)

    def table(self) -> str:
        """The points as a fixed-width text table (the sweet spot marked with `*`); a causal-LM
        sweep shows perplexity and its relative rise, what its points are judged by."""
        lm = any(p.metric == "perplexity" for p in self.points)
        headers = (
            "method",
            "target",
            "perplexity" if lm else "accuracy",
            "rise" if lm else "drop",
            "sparsity",
            "params",
            "finetune J",
            "TFLite ms",
        )
        rows, notes = [], []
        for p in self.points:
            rows.append(
                (
                    p.method,
                    f"{p.target:g}",
                    fmt(p.value, "{:.3f}" if p.metric == "perplexity" else "{:.4f}"),
                    fmt(p.change, "{:+.2%}" if p.metric == "perplexity" else "{:+.4f}"),
                    fmt(p.sparsity, "{:.1%}"),
                    fmt(p.param_fraction, "{:.0%}"),
                    fmt(p.finetune_energy_j, "{:.1f}"),
                    fmt(p.tflite_latency_ms, "{:.3f}"),
                )
            )
            if not p.ok:
                notes.append(f"failed: {p.error}")
            elif p.sweet_spot:
                notes.append("* sweet spot")
            else:
                notes.append("" if p.passed else f"over max {headers[3]}")
        lines = text_table(headers, rows, left=(0, 1), rule=True)
        body = [f"{row}  {note}".rstrip() for row, note in zip(lines[2:], notes, strict=True)]
        return "\n".join([*lines[:2], *body])


# --------------------------------------------------------------------------------------------
# Planning and validation


def available_methods() -> list[str]:
    """Registered methods whose module imports here and that have a target option."""
    return [c.name for c in method_classes() if c.target_option is not None]


def default_methods() -> list[str]:
    """The methods a sweep runs when none are named: those with `Method.sweep_targets`."""
    return [c.name for c in method_classes() if c.target_option is not None and c.sweep_targets]


def sweep_points(
    methods: Sequence[str] | None = None,
    targets: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
) -> list[tuple[str, float]]:
    """Resolves and checks the (method, target) points of a sweep, in sweep order.

    Args:
        methods: method names (None: `default_methods()`).
        targets: targets for every method, or a mapping method -> targets (None: each method's
            `Method.sweep_targets`). Each target is in (0, 1).

    Returns:
        The points, methods in the given order, targets in the given order (duplicates dropped).

    Raises:
        ValueError: an unknown or unavailable method, a method without a sparsity target, a
            target outside (0, 1); the message names `methods` or `targets`.
    """
    if methods is None:
        methods = default_methods()
    if isinstance(methods, str):
        methods = [methods]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("methods must name at least one method. Received: methods=[]")
    for name in methods:
        cls = method_class(name, path="methods")
        if cls.target_option is None:
            raise ValueError(
                f"methods: {name!r} has no sparsity target to sweep (no target option). "
                f"Sweepable here: {', '.join(available_methods())}."
            )
    if isinstance(targets, Mapping):
        unknown = sorted(set(targets) - set(methods))
        if unknown:
            raise ValueError(
                f"targets names method {unknown[0]!r}, which is not in methods {methods}."
            )
    points = []
    for name in methods:
        own = method_class(name, path="methods").sweep_targets
        if targets is None or (isinstance(targets, Mapping) and name not in targets):
            if not own:
                raise ValueError(
                    f"targets: method {name!r} has no default sweep targets; give its "
                    f"{method_class(name).target_option} values in targets."
                )
            ts = own
        elif isinstance(targets, Mapping):
            ts = targets[name]
        else:
            ts = targets
        ts = [ts] if isinstance(ts, (int, float)) else list(ts)
        if not ts:
            raise ValueError(f"targets must hold at least one value. Received: targets={ts}")
        for t in ts:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
                raise ValueError(f"targets must be numbers in (0, 1). Received: targets={ts}")
        for t in dict.fromkeys(float(t) for t in ts):
            points.append((name, t))
    return points


def point_recipe(base: Recipe, method: str, target: float) -> Recipe:
    """The recipe of one sweep point: `base` with only `method`, its target option set.

    Args:
        base: the recipe to start from (fine-tune, export and gate settings; the method's own
            section if it has one).
        method: the method.
        target: the value of the method's `target_sparsity`, `ratio` (structured) or final
            sparsity (lottery: sets `rate` for the recipe's `rounds`).

    Raises:
        ValueError: the method's options reject the target.
    """
    cls = method_class(method, path="methods")
    opts = base.method_options.get(method) or cls.options_class()
    return base.replace(methods=(method,), **{method: cls.with_target(opts, target)})


def _folder_name(method: str, target: float) -> str:
    return f"{method}-{target:g}"


# --------------------------------------------------------------------------------------------
# The sweep


def sweep(
    out: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    targets: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    epochs: int | None = None,
    baseline_run: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    val_split: float | None = None,
    arch: str = "cnn",
    baseline_epochs: int = 8,
    recipe: str | os.PathLike | None = None,
    max_accuracy_drop: float | None = None,
    jit_compile: str | None = None,
    seed: int = 0,
    plot: bool = True,
    verbose: int = 0,
    progress: Callable[[SweepPoint, int, int], None] | None = None,
) -> SweepResult:
    """Runs several methods and targets on one baseline; writes `OUT/sweep.csv` and a plot.

    The baseline is trained once into `OUT/baseline/` (or taken from `baseline_run`, which is
    only read). Every point gets its own run folder `OUT/<method>-<target>/` holding a copy of
    the baseline, a recipe built from `recipe` (or the defaults), and the outputs of configure,
    finetune, validate and deploy (deploy runs whether validation passed or not, to measure
    every point). A point that raises is recorded as failed, with its error, and the sweep
    goes on; the CSV is rewritten atomically after every point.

    Args:
        out: the sweep folder. It must not hold an earlier sweep (`sweep.csv` or a point's
            folder); nothing in it is ever deleted.
        methods: method names (None: magnitude, movement, structured, and lottery where
            available).
        targets: targets in (0, 1) for every method, or a mapping method -> targets (None:
            each method's `Method.sweep_targets`). The target sets the method's
            `Method.target_option` (`target_sparsity`, `ratio` for structured, ...).
        epochs: fine-tune epochs of every point (None: the recipe's).
        baseline_run: a run folder holding `baseline.keras` (and its `manifest.json`) to start
            from instead of training a baseline.
        data: `digits`, a `.npz` or an image folder (None: `digits`, or with `baseline_run`
            that run's data).
        val_split: validation fraction where the data has no split (None: 0.2, or the run's).
        arch: built-in baseline architecture (`cnn`, `mlp`) when training one.
        baseline_epochs: baseline training epochs.
        recipe: a recipe file to start every point from (its `methods` are replaced).
        max_accuracy_drop: the validation gate and the sweet spot's limit (None: the
            recipe's).
        jit_compile: `on`, `off` or `auto` for fine-tuning (None: the recipe's). `auto` is
            decided once, on the baseline, before the points, and every point gets the answer:
            deciding per point would charge the measurement to some points' fine-tune energy.
        seed: random seed of the baseline.
        plot: draw `sweep.png` (needs matplotlib).
        verbose: Keras progress output of training (0 silent).
        progress: called as `progress(point, index, total)` after every point.

    Returns:
        A `SweepResult`.

    Raises:
        ValueError: bad methods or targets (before anything is trained), a bad recipe or data.
        FileExistsError: `out` already holds a sweep.
        MissingStepError: `baseline_run` has no `baseline.keras`.
    """
    out = Path(out)
    plan = sweep_points(methods, targets)
    base = load_recipe(recipe) if recipe is not None else Recipe()
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1. Received: epochs={epochs!r}")
        base = base.replace(finetune=dataclasses.replace(base.finetune, epochs=epochs))
    if jit_compile is not None:
        base = base.replace(finetune=dataclasses.replace(base.finetune, jit_compile=jit_compile))
    if max_accuracy_drop is not None:
        base = base.replace(max_accuracy_drop=max_accuracy_drop)
    # Every point's recipe is validated before the baseline trains, so a typo costs a second.
    recipes = [point_recipe(base, m, t) for m, t in plan]
    if val_split is not None and not 0 < val_split < 1:
        raise ValueError(f"val_split must be in (0, 1). Received: val_split={val_split}")

    folders = [out / _folder_name(m, t) for m, t in plan]
    csv_path, png_path = out / CSV_NAME, out / PNG_NAME
    taken = [p for p in (csv_path, *folders) if p.exists()]
    if taken:
        raise FileExistsError(
            f"{taken[0]} exists: {out} already holds a sweep. Choose a new out folder (reuse its "
            f"baseline with baseline_run={str(out / BASELINE_NAME)!r})."
        )

    if baseline_run is not None:
        source = RunDir(baseline_run)
        source.require(source.baseline, for_step="sweep")
        source.require(source.manifest, for_step="sweep")
    else:
        source = RunDir(out / BASELINE_NAME)
        if source.baseline.exists():
            raise FileExistsError(
                f"{source.baseline} exists; reuse it with baseline_run={str(source.root)!r} "
                f"or choose a new out folder."
            )
        train_baseline(
            source,
            data="digits" if data is None else data,
            arch=arch,
            epochs=baseline_epochs,
            val_split=0.2 if val_split is None else val_split,
            seed=seed,
            verbose=verbose,
        )
    baseline_entry = next((e for e in source.read_entries() if e.stage == "baseline"), None)

    base, jit = _settle_jit(base, source, data if baseline_run is not None else None, val_split)
    recipes = [point_recipe(base, m, t) for m, t in plan]
    points: list[SweepPoint] = []
    for i, ((method, target), rec, folder) in enumerate(
        zip(plan, recipes, folders, strict=True), start=1
    ):
        point = _run_point(
            RunDir(folder),
            source,
            baseline_entry,
            method=method,
            target=target,
            recipe=rec,
            data=None if baseline_run is None else data,
            val_split=None if baseline_run is None else val_split,
            verbose=verbose,
        )
        points.append(point)
        points = mark_sweet_spot(points)
        _write_csv(csv_path, points)
        if progress is not None:
            progress(points[-1], i, len(plan))

    png, message = None, None
    if plot:
        try:
            png = plot_sweep(points, png_path)
        except ImportError:
            message = (
                f"matplotlib is not installed: wrote {csv_path} but no plot; "
                f"{PLOT_INSTALL_HINT} to get {PNG_NAME}."
            )
    return SweepResult(out, source.root, tuple(points), csv_path, png, message, jit)


def _settle_jit(
    base: Recipe, source: RunDir, data: str | os.PathLike | None, val_split: float | None
) -> tuple[Recipe, Any]:
    """Turns `jit_compile: auto` into `on` or `off`, measured once on the baseline model."""
    if base.finetune.jit_compile != "auto":
        return base, None
    import math

    import keras

    from keras_lean.pipeline.models import load_model
    from keras_lean.pipeline.steps import decide_jit_compile
    from keras_lean.pipeline.steps.common import load_run_data

    manifest = source.read_manifest()
    ds = load_run_data(manifest, data, val_split)  # a causal-LM run's windows too
    ft = base.finetune
    decision = decide_jit_compile(
        load_model(source.baseline),
        ds,
        batch_size=ft.batch_size,
        total_steps=ft.epochs * math.ceil(len(ds.x_train) / ft.batch_size),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=bool(manifest.get("from_logits", False))
        ),
    )
    on = "on" if decision.jit_compile else "off"
    return base.replace(finetune=dataclasses.replace(ft, jit_compile=on)), decision


def _run_point(
    run: RunDir,
    source: RunDir,
    baseline_entry: StageEntry | None,
    *,
    method: str,
    target: float,
    recipe: Recipe,
    data: str | os.PathLike | None,
    val_split: float | None,
    verbose: int,
) -> SweepPoint:
    """Prepares one point's run folder and runs configure..deploy in it; never raises."""
    import shutil

    stage = "prepare"
    error = None
    try:
        run.root.mkdir(parents=True)
        shutil.copy2(source.baseline, run.baseline)
        shutil.copy2(source.manifest, run.manifest)
        if data is not None or val_split is not None:
            fields: dict[str, Any] = {}
            if data is not None:
                s = str(data)
                fields["data"] = s if s == "digits" else str(Path(s).resolve())
            if val_split is not None:
                fields["val_split"] = val_split
            run.update_manifest(**fields)
        if baseline_entry is not None:
            run.record_stage(baseline_entry.to_dict())
        stage = "configure"
        header = f"keras_lean sweep point: {method} at {target:g}."
        atomic_write_text(run.recipe, recipe_to_yaml(recipe, header=header))
        configure(run, recipe=run.recipe, force=True)
        stage = "finetune"
        finetune(run, verbose=verbose)
        stage = "validate"
        validate(run)
        stage = "deploy"
        deploy(run)
        stage = None
    except Exception as e:  # one point's failure must not stop the sweep
        error = f"{stage}: {type(e).__name__}: {' '.join(str(e).split())}"
    return _point_from_run(run, method, target, recipe, error)


def _point_from_run(
    run: RunDir, method: str, target: float, recipe: Recipe, error: str | None
) -> SweepPoint:
    """Reads a point's figures from its run folder's stage entries (whatever stages finished)."""
    try:
        entries = {e.stage: e for e in run.read_entries()}
    except (OSError, ValueError):
        entries = {}
    kw: dict[str, Any] = {
        "max_accuracy_drop": recipe.max_accuracy_drop,
        "max_perplexity_rise": recipe.max_perplexity_rise,
        "status": "ok" if error is None else "failed",
        "error": error,
    }
    base = entries.get("baseline")
    ft = entries.get("finetune")
    if ft is not None:
        kw.update(
            finetune_duration_s=ft.duration_s,
            finetune_energy_j=ft.energy_j,
            finetune_energy_kwh=ft.energy_kwh,
            energy_method=ft.energy_method,
        )
    val = entries.get("validate")
    if val is not None:
        kw.update(validation_fields(val.details or {}))
    dep = entries.get("deploy")
    if dep is not None:
        d = dep.details or {}
        exp = d.get("export") or {}
        base_params = (base.params if base is not None else None) or (
            d.get("baseline_export") or {}
        ).get("params")
        params, nonzero = dep.params, dep.nonzero_params
        kw.update(
            params=params,
            nonzero_params=nonzero,
            baseline_params=base_params,
            tflite_accuracy=exp.get("tflite_accuracy"),
            tflite_gzip_bytes=exp.get("tflite_gzip_bytes"),
            tflite_gzip_ratio=d.get("tflite_gzip_ratio"),
            keras_latency_ms=exp.get("keras_latency_ms"),
            tflite_latency_ms=exp.get("tflite_latency_ms"),
            latency_batch_size=exp.get("latency_batch_size"),
        )
        if base_params and params is not None and nonzero is not None:
            kw["sparsity"] = 1 - nonzero / base_params
            kw["param_fraction"] = params / base_params
        final = ((d.get("methods") or {}).get(method) or {}).get("final")
        if isinstance(final, dict) and final.get("sparsity") is not None:
            kw["pruned_sparsity"] = final["sparsity"]
    option = method_class(method).target_option
    point = SweepPoint(method, target, option, run.root.name, **kw)
    return dataclasses.replace(point, passed=judge_point(point)) if val is not None else point


def validation_fields(details: Mapping[str, Any]) -> dict[str, Any]:
    """A point's validation figures from its validate entry's details (`validation.json`):
    the accuracies, and for a causal LM (`metric: perplexity`) the perplexities."""
    metric = details.get("metric") or "accuracy"
    fields = {
        "metric": metric,
        "accuracy": details.get("finetuned_accuracy"),
        "baseline_accuracy": details.get("baseline_accuracy"),
        "accuracy_drop": details.get("accuracy_drop"),
    }
    if metric == "perplexity":
        fields.update(
            perplexity=details.get("finetuned_perplexity"),
            baseline_perplexity=details.get("baseline_perplexity"),
            perplexity_rise=details.get("perplexity_rise"),
        )
    return fields


def judge_point(point: SweepPoint) -> bool | None:
    """Whether `point` passes the gate of the metric its run was validated by: the change
    (accuracy drop, or relative perplexity rise: `guard.StageGate.change`, as the validate step
    and the guard compute it) within the recipe's budget for that metric. None without the
    figures."""
    from keras_lean.pipeline.guard import StageGate

    base = point.baseline_perplexity if point.metric == "perplexity" else point.baseline_accuracy
    if point.value is None or base is None or point.budget is None:
        return None
    if point.metric == "perplexity" and not base > 0:
        return None
    gate = StageGate(point.metric, None, base, point.budget)
    return gate.within(point.value)


#: Sparsities this close to the highest passing one count as equal for the sweet spot: two
#: methods at the same target differ by a few stray zeros, which must not outrank accuracy.
SWEET_SPOT_SPARSITY_TIE = 0.005


def mark_sweet_spot(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """Returns the points with `sweet_spot` set on one at most.

    The sweet spot is the highest-`sparsity` point that succeeded and passed validation;
    points within `SWEET_SPOT_SPARSITY_TIE` of that sparsity tie, and the tie goes to the higher
    figure of the gate's metric (higher accuracy, or lower perplexity), then to less fine-tune
    energy. None is marked when no point passed.
    """
    candidates = [p for p in points if p.ok and p.passed and p.sparsity is not None]
    best = None
    if candidates:
        top = max(p.sparsity for p in candidates)
        best = max(
            (p for p in candidates if p.sparsity >= top - SWEET_SPOT_SPARSITY_TIE),
            key=lambda p: (-_worse(p), -(p.finetune_energy_j or 0.0), p.sparsity),
        )
    return [dataclasses.replace(p, sweet_spot=p is best) for p in points]


def _worse(point: SweepPoint) -> float:
    """How much worse than the baseline `point` is in its gate's metric (lower is better)."""
    change = point.change
    return math.inf if change is None else change


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _write_csv(path: Path, points: Sequence[SweepPoint]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({k: _csv_cell(v) for k, v in p.to_dict().items()})
    return atomic_write_text(path, buf.getvalue())


__all__ = [
    "CSV_COLUMNS",
    "SweepPoint",
    "SweepResult",
    "available_methods",
    "default_methods",
    "judge_point",
    "mark_sweet_spot",
    "plot_sweep",
    "point_recipe",
    "sweep",
    "sweep_points",
    "validation_fields",
]
