"""Step 5: finalize (strip wrappers, shrink, merge), export SavedModel and TFLite, check them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from keras_lean.pipeline.models import load_model
from keras_lean.pipeline.recipe import ExportOptions, load_recipe
from keras_lean.pipeline.rundir import (
    RunDir,
    atomic_directory,
    atomic_write_json,
    save_model_atomic,
)
from keras_lean.pipeline.steps.common import (
    StageResult,
    as_run,
    evaluate,
    finalize_chain,
    jsonable,
    load_method_states,
    load_run_data,
    stage_result,
)
from keras_lean.pipeline.steps.precision import as_float32
from keras_lean.pipeline.steps.stage import StageRecorder, _stage

if TYPE_CHECKING:  # pragma: no cover
    import keras


def deploy(
    out: str | os.PathLike | RunDir,
    *,
    quantization: str | None = None,
    keras_quantization: str | None = None,
    data: str | os.PathLike | None = None,
    val_split: float | None = None,
) -> StageResult:
    """Step 5: finalizes (strips wrappers, ...), exports SavedModel and TFLite, checks them.

    Writes `RUN/export/` in one rename: `model.keras` (the plain deployable model),
    `model_saved_model/`, `model.tflite`, `baseline.tflite` (same settings, for the size ratio),
    and `deploy.json` (sizes, max abs diff of TFLite vs Keras, accuracies, latency, and every
    equivalence check). With `export.sparse_tflite`, `model.tflite` stores sparse tensors and
    `model_dense.tflite` is the dense-format file it is checked against (sizes, latencies and
    a note on what the runtime gains go to `deploy.json`); with `export.keras_quantization`,
    `model_<mode>.keras` is Keras' own quantization of the model, measured the same way. Each method
    first reads back what it learned at finetune (`Method.load_state` from `RUN/methods/`), so
    its deploy report holds that too (lottery rounds, structured widths, schedules).

    Args:
        out: the run folder (must hold `finetuned.keras` and `recipe.yaml`).
        quantization: override the recipe's `export.quantization`.
        keras_quantization: override the recipe's `export.keras_quantization`.
        data: override the run's data.
        val_split: override the run's validation split.

    Returns:
        A `StageResult` (artifacts `export`, `saved_model`, `tflite`, `keras`).

    Raises:
        MissingStepError: an input is missing.
        ValueError: an invalid quantization.
    """
    run = as_run(out)
    run.require(run.finetuned, for_step="deploy")
    run.require(run.recipe, for_step="deploy")
    rec = load_recipe(run.recipe)
    opts: ExportOptions = rec.export
    overrides = {"quantization": quantization, "keras_quantization": keras_quantization}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        opts = dataclasses.replace(opts, **overrides)
    opts, skipped = _formats_for_backend(opts)
    manifest = run.read_manifest()
    ds = load_run_data(manifest, data, val_split)
    methods = rec.ordered_methods()
    load_method_states(run, methods)
    with _stage(run, "deploy", manifest) as stage:
        model = as_float32(finalize_chain(load_model(run.finetuned), methods))
        check_no_wrappers(model)
        folded: tuple[str, ...] = ()
        if opts.fold_batchnorm:
            from keras_lean.export import fold_batchnorm

            model, folded = fold_batchnorm(model)
        reports = {m.name: m.report() for m in methods}
        report = _export(run, model, ds, opts, reports, folded, stage, skipped)
        stage.accuracy = (
            report.tflite_accuracy if report.tflite_accuracy is not None else evaluate(model, ds)
        )
        stage.params = report.params
        stage.nonzero_params = report.nonzero_params
        stage.gzip_bytes = (
            report.tflite_gzip_bytes
            if report.tflite_gzip_bytes is not None
            else report.weights_gzip_bytes
        )
    artifacts = {"export": str(run.export_dir), "keras": str(run.export_dir / "model.keras")}
    if "saved_model" in opts.formats:
        artifacts["saved_model"] = str(run.export_dir / "model_saved_model")
    if "tflite" in opts.formats:
        artifacts["tflite"] = str(run.export_dir / "model.tflite")
    return stage_result("deploy", stage, artifacts)


def _sparse_tflite(opts: ExportOptions, model: keras.Model) -> bool:
    """`export.sparse_tflite`: on, off, or auto (when enough of the weights are zero and the
    quantization keeps sparse storage runnable: not `dynamic`)."""
    if opts.sparse_tflite != "auto":
        return opts.sparse_tflite == "on"  # `on` with `dynamic`: the export says why it cannot
    from keras_lean.export import SPARSE_QUANTIZATIONS, weight_sizes
    from keras_lean.pipeline.recipe import SPARSE_TFLITE_AUTO

    if opts.quantization not in SPARSE_QUANTIZATIONS:
        return False
    return weight_sizes(model).sparsity >= SPARSE_TFLITE_AUTO


def _keras_quantization(model, ds, opts: ExportOptions, tmp: Path, final: Path) -> dict | None:
    """`export.keras_quantization`: Keras' own `Model.quantize` of the artifact, measured
    (gptq / awq calibrated on the first `export.calibration_samples` training samples)."""
    if opts.keras_quantization == "none":
        return None
    from keras_lean.export import CALIBRATED_QUANTIZATIONS, quantize_keras_artifact

    mode = opts.keras_quantization
    n = opts.calibration_samples
    calibration = None
    if mode in CALIBRATED_QUANTIZATIONS:
        x = ds.x_train
        calibration = {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]
    rep = quantize_keras_artifact(
        model,
        tmp / f"model_{mode}.keras",
        mode,
        check_x=ds.x_val,
        check_y=ds.y_val,
        float_path=tmp / "model.keras",
        calibration=calibration,
    )
    return _relative(rep.to_dict(), tmp, final)


def _tflite_latency(path: Path, x, opts: ExportOptions) -> float | None:
    """Median batch latency (ms) of the `.tflite` at `path`, as `export_model` measures it."""
    import numpy as np

    from keras_lean.export import TFLiteRunner, measure_latency_ms

    if x is None or not len(x):
        return None
    batch = np.resize(x, (opts.latency_batch_size, *x.shape[1:]))
    return measure_latency_ms(TFLiteRunner(path), batch, opts.latency_runs)


def _baseline_ratios(
    run, report, baseline_report, opts: ExportOptions, tmp: Path, ds_x=None
) -> dict:
    """Size ratios (deployed / baseline) vs the baseline at the same settings and, when the
    export is quantized, vs the float baseline's `.tflite` (what the size targets compare to)."""
    from keras_lean.export import convert_to_tflite, file_sizes, strip_tflite_names

    out = {
        "tflite_gzip_ratio": report.tflite_gzip_bytes / baseline_report.tflite_gzip_bytes,
        "tflite_raw_ratio": report.tflite_raw_bytes / baseline_report.tflite_raw_bytes,
    }
    raw, gz = baseline_report.tflite_raw_bytes, baseline_report.tflite_gzip_bytes
    latency = baseline_report.tflite_latency_ms
    if opts.quantization != "none":
        path = convert_to_tflite(load_model(run.baseline), tmp / "baseline_float.tflite")
        if opts.strip_tflite_names:  # like for like with the stripped model
            strip_tflite_names(path)
        raw, gz = file_sizes(path)
        latency = _tflite_latency(path, ds_x, opts) if ds_x is not None else None
    out["float_baseline_tflite"] = {"raw_bytes": raw, "gzip_bytes": gz, "latency_ms": latency}
    out["tflite_raw_ratio_vs_float_baseline"] = report.tflite_raw_bytes / raw
    out["tflite_gzip_ratio_vs_float_baseline"] = report.tflite_gzip_bytes / gz
    return out


def describe_formats(opts: ExportOptions) -> str:
    """The deploy heading's formats: what this backend exports, and what it skips."""
    try:
        kept, skipped = _formats_for_backend(opts)
    except ValueError:  # nothing this backend can export: deploy itself refuses, naming why
        return " + ".join(opts.formats)
    return " + ".join(kept.formats) + "".join(
        f" ({name} skipped: needs KERAS_BACKEND=tensorflow)" for name in skipped
    )


def _formats_for_backend(opts: ExportOptions) -> tuple[ExportOptions, dict[str, str]]:
    """Drops the formats Keras cannot export under this backend; says why (deploy.json)."""
    from keras_lean import _backend

    if _backend.name() == "tensorflow" or "tflite" not in opts.formats:
        return opts, {}
    reason = (
        f"needs the TensorFlow backend (Keras' LiteRT export does not run under "
        f"{_backend.name()}): run `KERAS_BACKEND=tensorflow keras-lean deploy --out RUN`"
    )
    kept = tuple(f for f in opts.formats if f != "tflite")
    if not kept:
        raise ValueError(f"export.formats: tflite {reason}.")
    return dataclasses.replace(opts, formats=kept), {"tflite": reason}


def _export(
    run, model, ds, opts: ExportOptions, method_reports, folded, stage: StageRecorder, skipped=None
):
    """Writes `RUN/export/` in one rename; fills `stage.details`; returns the `ExportReport`."""
    from keras_lean.export import export_model

    common = dict(
        quantization=opts.quantization,
        calibration_x=ds.x_train[: opts.calibration_samples],
        check_x=ds.x_val,
        check_y=ds.y_val,
        latency_batch_size=opts.latency_batch_size,
        latency_runs=opts.latency_runs,
        strip_names=opts.strip_tflite_names,
    )
    with atomic_directory(run.export_dir) as tmp:
        save_model_atomic(model, tmp / "model.keras")
        keras_q = _keras_quantization(model, ds, opts, tmp, run.export_dir)  # gptq: fails fast
        sparse = "tflite" in opts.formats and _sparse_tflite(opts, model)
        report = export_model(
            model, tmp, name="model", formats=opts.formats, sparse=sparse, **common
        )
        baseline_report = None
        if opts.compare_baseline and "tflite" in opts.formats and run.baseline.exists():
            baseline_report = export_model(
                load_model(run.baseline), tmp, name="baseline", formats=("tflite",), **common
            )
        details = {
            "export": _relative(report.to_dict(), tmp, run.export_dir),
            "methods": method_reports,
            "folded_batchnorm": list(folded),
            "equivalence_passed": report.equivalence_passed,
        }
        if skipped:
            details["formats_skipped"] = dict(skipped)
        if keras_q is not None:
            details["keras_quantization"] = keras_q
        if baseline_report is not None:
            details["baseline_export"] = _relative(baseline_report.to_dict(), tmp, run.export_dir)
            details.update(_baseline_ratios(run, report, baseline_report, opts, tmp, ds_x=ds.x_val))
        details = jsonable(details)
        atomic_write_json(tmp / "deploy.json", details)
    stage.details = details
    return report


def check_no_wrappers(model: keras.Model) -> None:
    """Raises ValueError when the finalize chain left a `PruneLowMagnitude` wrapper behind."""
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


def _relative(d: dict, tmp: Path, final: Path) -> dict:
    """Rewrites paths inside the temporary export folder to their final location."""
    out = {}
    for k, v in d.items():
        if isinstance(v, str) and v.startswith(str(tmp)):
            v = str(final) + v[len(str(tmp)) :]
        out[k] = v
    return out


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B"


def _times(num: float | None, den: float | None) -> str:
    """`Nx`: how many times `den` fits in `num` (num / den), or `-`."""
    return "-" if not num or not den else f"{num / den:.2f}x"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def report_lines(details: dict) -> list[str]:
    """The deploy figures of `deploy.json` as report lines (`keras-lean report`).

    Per export: raw and gzip size, how many times smaller than the float baseline's `.tflite`,
    accuracy (and max |diff| vs Keras), latency against the float baseline's; the sparse format's
    dense-format twin and what the runtime gains from it; the Keras-quantized `.keras`. Empty
    when `details` holds no export.
    """
    exp = details.get("export") if isinstance(details, dict) else None
    if not isinstance(exp, dict):
        return []
    base = details.get("float_baseline_tflite") or {}
    b_raw, b_gz = base.get("raw_bytes"), base.get("gzip_bytes")
    q = exp.get("quantization", "none")
    batch = exp.get("latency_batch_size")
    out = ["", f"deploy ({q} TFLite, latency at batch {batch}):"]
    if exp.get("tflite_raw_bytes") is not None:
        out.append(
            f"  model.tflite{' (sparse storage)' if exp.get('sparse_tflite') else ''}: "
            f"{_kb(exp['tflite_raw_bytes'])} raw, {_kb(exp.get('tflite_gzip_bytes'))} gzip; "
            f"{_times(b_raw, exp['tflite_raw_bytes'])} smaller raw, "
            f"{_times(b_gz, exp.get('tflite_gzip_bytes'))} gzip than the float baseline's "
            f".tflite ({_kb(b_raw)} raw, {_kb(b_gz)} gzip)"
        )
        base_acc = (details.get("baseline_export") or {}).get("keras_accuracy")
        acc = exp.get("tflite_accuracy")
        drop = "" if acc is None or base_acc is None else f" ({100 * (acc - base_acc):+.2f} pt)"
        diff = exp.get("max_abs_diff")
        out.append(
            f"  accuracy: TFLite {q} {_acc(acc)}{drop}, Keras {_acc(exp.get('keras_accuracy'))}, "
            f"baseline {_acc(base_acc)}"
            + ("" if diff is None else f"; max |TFLite - Keras| {diff:.3g}")
        )
        b_ms, ms = base.get("latency_ms"), exp.get("tflite_latency_ms")
        out.append(
            f"  latency: TFLite {_ms(ms)} vs the float baseline's {_ms(b_ms)}"
            + (f" ({_times(b_ms, ms)} faster)" if ms and b_ms else "")
            + f"; Keras {_ms(exp.get('keras_latency_ms'))}"
        )
    if exp.get("sparse_tflite"):
        out.append(
            f"  dense-format twin: {_kb(exp.get('dense_tflite_raw_bytes'))} raw, "
            f"{_kb(exp.get('dense_tflite_gzip_bytes'))} gzip, "
            f"{_ms(exp.get('dense_tflite_latency_ms'))}; sparse vs dense max |diff| "
            f"{exp.get('sparse_vs_dense_max_abs_diff')}"
        )
        if exp.get("sparse_latency_note"):
            out.append(f"  no speed from sparse storage here: {exp['sparse_latency_note']}")
    kq = details.get("keras_quantization")
    if isinstance(kq, dict):
        f_raw, raw = kq.get("float_raw_bytes"), kq.get("raw_bytes")
        out.append(
            f"  Keras {kq.get('mode')} .keras: {_kb(raw)} raw vs float {_kb(f_raw)} "
            f"({_times(f_raw, raw)} smaller), accuracy {_acc(kq.get('accuracy'))} vs float "
            f"{_acc(kq.get('float_accuracy'))}" + (f"; {kq['note']}" if kq.get("note") else "")
        )
    if not details.get("equivalence_passed", True):
        failed = [e.get("candidate") for e in exp.get("equivalence", ()) if not e.get("passed")]
        out.append(f"  equivalence FAILED: {', '.join(map(str, failed))}")
    return out
