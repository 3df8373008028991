"""`keras-lean`: the command line, a thin shell over `keras_lean.pipeline` and `keras_lean.energy`.

Every command parses its options, calls one public function and prints a short summary. Library
errors become one line on stderr and exit code 2 (bad input); a failed validation gate exits 1;
`--debug` shows the traceback instead. Importing this module imports neither TensorFlow nor Keras,
so `keras-lean --help` is fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from keras_lean import __version__

_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _carbon(value: str | None) -> float | str:
    if value is None:
        return 475.0
    try:
        return float(value)
    except ValueError:
        return value


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _library_call(fn: Callable) -> Callable:
    """Runs a command body; turns library errors into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = debug or bool((ctx.find_root().obj or {}).get("debug"))
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except _BAD_INPUT as e:
            if debug:
                raise
            click.echo(f"Error: {_one_line(e)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            hint = ""
            if ctx.info_name in ("finetune", "run"):
                hint = " Continue fine-tuning with `keras-lean finetune --resume`."
            click.echo(f"Interrupted; earlier stages' files are intact.{hint}", err=True)
            ctx.exit(130)

    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


def _run_options(fn: Callable) -> Callable:
    fn = click.option(
        "--run-name",
        default=None,
        help="Run folder name under savedmodels/ (default: 'default'). Ignored with --out.",
    )(fn)
    return click.option(
        "--out",
        "out",
        type=click.Path(file_okay=False),
        default=None,
        help="Run folder (default: savedmodels/<run-name>/).",
    )(fn)


def _data_options(fn: Callable) -> Callable:
    fn = click.option(
        "--val-split",
        type=float,
        default=0.2,
        show_default=True,
        help="Validation fraction when the data has no split.",
    )(fn)
    return click.option(
        "--data",
        default="digits",
        show_default=True,
        help="'digits', a .npz file (x_train,y_train,x_val,y_val or x,y) or an image folder.",
    )(fn)


def _baseline_options(fn: Callable) -> Callable:
    for opt in reversed(
        [
            click.option(
                "--arch",
                type=click.Choice(["cnn", "mlp"]),
                default="cnn",
                show_default=True,
                help="Built-in baseline architecture.",
            ),
            click.option(
                "--model",
                "model_path",
                type=click.Path(),
                default=None,
                help="Adopt this .keras model instead of training one.",
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
            click.option(
                "--strategy",
                type=click.Choice(["default", "mirrored", "multiworker"]),
                default="default",
                show_default=True,
                help="tf.distribute strategy.",
            ),
            click.option(
                "--carbon-intensity",
                default=None,
                help="gCO2e/kWh or a country code (default 475, world average).",
            ),
            click.option("--pue", type=float, default=1.0, show_default=True, help="PUE."),
            click.option(
                "--cpu-tdp",
                "cpu_tdp_w",
                type=float,
                default=None,
                help="CPU TDP in watts for the energy estimate.",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _recipe_options(fn: Callable) -> Callable:
    for opt in reversed(
        [
            click.option(
                "--recipe",
                type=click.Path(dir_okay=False),
                default=None,
                help="Start from this recipe YAML instead of the defaults.",
            ),
            click.option(
                "--method",
                "methods",
                multiple=True,
                help="Method(s) to apply (repeatable): magnitude, movement, structured, "
                "lowrank, lora, lottery.",
            ),
            click.option("--target-sparsity", type=float, default=None, help="Target sparsity."),
            click.option("--epochs", type=int, default=None, help="Fine-tune epochs."),
            click.option("--batch-size", type=int, default=None, help="Batch size."),
            click.option("--learning-rate", type=float, default=None, help="Learning rate."),
            click.option(
                "--jit-compile",
                type=click.Choice(["on", "off", "auto"]),
                default=None,
                help="XLA for fine-tuning (auto: measure both, keep the faster).",
            ),
            click.option(
                "--mixed-precision",
                type=click.Choice(["on", "off"]),
                default=None,
                help="mixed_float16 fine-tuning.",
            ),
            click.option(
                "--quantization",
                type=click.Choice(["none", "dynamic", "float16", "int8"]),
                default=None,
                help="TFLite quantization.",
            ),
            click.option(
                "--max-accuracy-drop",
                type=float,
                default=None,
                help="Validation gate: largest allowed accuracy drop (0.01 = 1 point).",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _quiet(fn: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(fn)


def _run_dir(out: str | None, run_name: str | None):
    from keras_lean.pipeline import run_dir_for

    return run_dir_for(out, run_name)


def _mp(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _summary(result: Any) -> str:
    e = result.entry
    parts = [f"{result.stage}:"]
    if e.get("accuracy") is not None:
        parts.append(f"accuracy {e['accuracy']:.4f}")
    if e.get("params"):
        parts.append(
            f"params {e['params']:,} (nonzero {e['nonzero_params']:,}, "
            f"{1 - e['nonzero_params'] / e['params']:.1%} zeros)"
        )
    if e.get("gzip_bytes") is not None:
        parts.append(f"gzip {e['gzip_bytes'] / 1024:.1f} KB")
    parts.append(f"[{e['duration_s']:.1f} s, {e['energy_j']:.1f} J {e['energy_method']}]")
    artifacts = ", ".join(str(p) for p in result.artifacts.values())
    return " ".join(parts) + (f" -> {artifacts}" if artifacts else "")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (every command).")
@click.version_option(__version__, prog_name="keras-lean")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make Keras models leaner, and measure the energy it takes.

    \b
    The five steps (each reads and writes one run folder, default savedmodels/default/):
      keras-lean baseline    train (or adopt) the baseline model
      keras-lean configure   write recipe.yaml, then edit it
      keras-lean finetune    apply the recipe while fine-tuning
      keras-lean validate    accuracy gate (exit 1 on fail)
      keras-lean deploy      strip, export SavedModel + TFLite, check, measure
    `keras-lean run` does all five; `keras-lean report RUN` prints the table.
    """
    ctx.obj = {"debug": debug}


@cli.command()
@_run_options
@_data_options
@_baseline_options
@click.option("--epochs", type=int, default=8, show_default=True, help="Training epochs.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size.")
@click.option("--learning-rate", type=float, default=1e-3, show_default=True, help="Adam LR.")
@_quiet
@_library_call
def baseline(
    out,
    run_name,
    data,
    val_split,
    arch,
    model_path,
    seed,
    strategy,
    carbon_intensity,
    pue,
    cpu_tdp_w,
    epochs,
    batch_size,
    learning_rate,
    quiet,
):
    """Step 1: train a baseline (--arch) or adopt your model (--model); writes baseline.keras."""
    from keras_lean.pipeline import train_baseline

    result = train_baseline(
        _run_dir(out, run_name),
        data=data,
        arch=arch,
        model_path=model_path,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        val_split=val_split,
        seed=seed,
        strategy=strategy,
        carbon_intensity=_carbon(carbon_intensity),
        pue=pue,
        cpu_tdp_w=cpu_tdp_w,
        verbose=0 if quiet else 1,
    )
    click.echo(_summary(result))


@cli.command()
@_run_options
@_recipe_options
@click.option("--force", is_flag=True, help="Overwrite an existing recipe.yaml.")
@_library_call
def configure(
    out,
    run_name,
    recipe,
    methods,
    target_sparsity,
    epochs,
    batch_size,
    learning_rate,
    jit_compile,
    mixed_precision,
    quantization,
    max_accuracy_drop,
    force,
):
    """Step 2: write recipe.yaml (commented, listing the prunable layers) for you to edit."""
    from keras_lean.pipeline import configure as configure_

    result = configure_(
        _run_dir(out, run_name),
        recipe=recipe,
        methods=list(methods) or None,
        target_sparsity=target_sparsity,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        jit_compile=jit_compile,
        mixed_precision=_mp(mixed_precision),
        quantization=quantization,
        max_accuracy_drop=max_accuracy_drop,
        force=force,
    )
    click.echo(_summary(result))


@cli.command()
@_run_options
@click.option("--resume", is_flag=True, help="Continue from the last epoch's checkpoint.")
@click.option(
    "--strategy",
    type=click.Choice(["default", "mirrored", "multiworker"]),
    default=None,
    help="Override the run's tf.distribute strategy.",
)
@_quiet
@_library_call
def finetune(out, run_name, resume, strategy, quiet):
    """Step 3: apply the recipe during fine-tuning; writes finetuned.keras."""
    from keras_lean.pipeline import finetune as finetune_

    result = finetune_(
        _run_dir(out, run_name), resume=resume, strategy=strategy, verbose=0 if quiet else 1
    )
    click.echo(_summary(result))


@cli.command()
@_run_options
@_library_call
def validate(out, run_name):
    """Step 4: compare baseline and fine-tuned accuracy; exit 1 if the drop is too large."""
    from keras_lean.pipeline import validate as validate_

    result = validate_(_run_dir(out, run_name))
    _echo_validation(result)
    if not result.passed:
        click.get_current_context().exit(1)


def _echo_validation(result: Any) -> None:
    verdict = "PASS" if result.passed else "FAIL"
    click.echo(
        f"validate: {verdict}: baseline {result.baseline_accuracy:.4f}, fine-tuned "
        f"{result.finetuned_accuracy:.4f}, drop {result.accuracy_drop:+.4f} "
        f"(max {result.max_accuracy_drop})"
    )


@cli.command()
@_run_options
@click.option(
    "--quantization",
    type=click.Choice(["none", "dynamic", "float16", "int8"]),
    default=None,
    help="Override the recipe's TFLite quantization.",
)
@_library_call
def deploy(out, run_name, quantization):
    """Step 5: strip wrappers, export SavedModel + TFLite, check in the interpreter, measure."""
    from keras_lean.pipeline import deploy as deploy_

    result = deploy_(_run_dir(out, run_name), quantization=quantization)
    click.echo(_summary(result))
    d = result.entry["details"]
    exp = d["export"]
    if exp.get("max_abs_diff") is not None:
        click.echo(
            f"  TFLite vs Keras: max abs diff {exp['max_abs_diff']:.3g}; latency batch "
            f"{exp['latency_batch_size']}: Keras {exp['keras_latency_ms']:.2f} ms, TFLite "
            f"{exp['tflite_latency_ms']:.2f} ms"
        )
    if d.get("tflite_gzip_ratio") is not None:
        click.echo(f"  TFLite gzip size: {d['tflite_gzip_ratio']:.2f}x the baseline's")


@cli.command(name="run")
@_run_options
@_data_options
@_baseline_options
@click.option(
    "--baseline-epochs", type=int, default=8, show_default=True, help="Baseline training epochs."
)
@_recipe_options
@_quiet
@_library_call
def run_cmd(
    out,
    run_name,
    data,
    val_split,
    arch,
    model_path,
    seed,
    strategy,
    carbon_intensity,
    pue,
    cpu_tdp_w,
    baseline_epochs,
    recipe,
    methods,
    target_sparsity,
    epochs,
    batch_size,
    learning_rate,
    jit_compile,
    mixed_precision,
    quantization,
    max_accuracy_drop,
    quiet,
):
    """All five steps with the same options (no options: digits, CNN, 80 % magnitude pruning)."""
    from keras_lean.pipeline import report as report_
    from keras_lean.pipeline import run as run_

    folder = _run_dir(out, run_name)
    result = run_(
        folder,
        data=data,
        arch=arch,
        model_path=model_path,
        baseline_epochs=baseline_epochs,
        val_split=val_split,
        seed=seed,
        strategy=strategy,
        recipe=recipe,
        methods=list(methods) or None,
        target_sparsity=target_sparsity,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        jit_compile=jit_compile,
        mixed_precision=_mp(mixed_precision),
        quantization=quantization,
        max_accuracy_drop=max_accuracy_drop,
        carbon_intensity=_carbon(carbon_intensity),
        pue=pue,
        cpu_tdp_w=cpu_tdp_w,
        verbose=0 if quiet else 1,
    )
    click.echo(report_(folder).table())
    if not result.passed:
        click.echo("validation failed: deploy skipped", err=True)
        click.get_current_context().exit(1)


def _comma_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if param.name != "targets":
        return items
    try:
        return [float(v) for v in items]
    except ValueError as e:
        raise click.BadParameter(f"expected numbers separated by commas: {e}") from e


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="savedmodels/sweep",
    show_default=True,
    help="Sweep folder: baseline/, one run folder per point, sweep.csv, sweep.png.",
)
@click.option(
    "--methods",
    callback=_comma_list,
    help="Comma-separated methods (default: magnitude,movement,structured[,lottery]).",
)
@click.option(
    "--targets",
    callback=_comma_list,
    help="Comma-separated targets in (0, 1) for every method: target_sparsity, or ratio for "
    "structured (default: 0.5,0.7,0.8,0.9; structured 0.25,0.5).",
)
@click.option("--epochs", type=int, default=None, help="Fine-tune epochs per point.")
@click.option(
    "--baseline-run",
    type=click.Path(file_okay=False),
    default=None,
    help="Start from this run folder's baseline.keras instead of training one.",
)
@click.option("--data", default=None, help="'digits' (default), a .npz file or an image folder.")
@click.option("--val-split", type=float, default=None, help="Validation fraction (default 0.2).")
@click.option(
    "--arch",
    type=click.Choice(["cnn", "mlp"]),
    default="cnn",
    show_default=True,
    help="Built-in baseline architecture.",
)
@click.option(
    "--baseline-epochs", type=int, default=8, show_default=True, help="Baseline training epochs."
)
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    default=None,
    help="Start every point from this recipe (its methods are replaced).",
)
@click.option(
    "--max-accuracy-drop", type=float, default=None, help="Validation gate and sweet-spot limit."
)
@click.option("--jit-compile", type=click.Choice(["on", "off", "auto"]), default=None, help="XLA.")
@click.option("--seed", type=int, default=0, show_default=True, help="Baseline random seed.")
@click.option("--verbose", "-v", is_flag=True, help="Keras progress lines while training.")
@_library_call
def sweep(
    out,
    methods,
    targets,
    epochs,
    baseline_run,
    data,
    val_split,
    arch,
    baseline_epochs,
    recipe,
    max_accuracy_drop,
    jit_compile,
    seed,
    verbose,
):
    """Several methods x sparsity targets on one baseline: sweep.csv and sweep.png."""
    from keras_lean.pipeline.sweep import sweep as sweep_
    from keras_lean.pipeline.sweep import sweep_points

    # Checked here too, so the error names the option it came from.
    for hint, args in (("'--methods'", (methods, None)), ("'--targets'", (methods, targets))):
        try:
            plan = sweep_points(*args)
        except ValueError as e:
            raise click.BadParameter(_one_line(e), param_hint=hint) from e
    where = f"baseline from {baseline_run}" if baseline_run else "a baseline"
    click.echo(f"sweep: {where}, then {len(plan)} points into {out}", err=True)

    def progress(p, i, n):
        if p.ok:
            text = (
                f"accuracy {p.accuracy:.4f} (drop {p.accuracy_drop:+.4f}), sparsity "
                f"{p.sparsity:.1%}, fine-tune {p.finetune_energy_j:.1f} J"
            )
        else:
            text = f"FAILED: {p.error}"
        click.echo(f"  [{i}/{n}] {p.method} {p.target:g}: {text}", err=True)

    result = sweep_(
        out,
        methods=methods,
        targets=targets,
        epochs=epochs,
        baseline_run=baseline_run,
        data=data,
        val_split=val_split,
        arch=arch,
        baseline_epochs=baseline_epochs,
        recipe=recipe,
        max_accuracy_drop=max_accuracy_drop,
        jit_compile=jit_compile,
        seed=seed,
        verbose=2 if verbose else 0,
        progress=progress,
    )
    if result.jit_decision is not None:
        d = result.jit_decision
        click.echo(
            f"jit_compile auto, decided once on the baseline: {'on' if d.jit_compile else 'off'} "
            f"({d.reason})",
            err=True,
        )
    click.echo(result.table())
    click.echo(f"\n-> {result.csv_path}" + (f", {result.png_path}" if result.png_path else ""))
    if result.plot_message:
        click.echo(result.plot_message, err=True)
    if result.failed:
        click.echo(f"{len(result.failed)} of {len(result.points)} points failed", err=True)
        if len(result.failed) == len(result.points):
            click.get_current_context().exit(1)


@cli.command()
@click.argument("run_folder", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print report.json's content as JSON.")
@_library_call
def report(run_folder, as_json):
    """Print the run's table: stage, time, energy, CO2, accuracy, params, nonzero, gzip size."""
    from keras_lean.pipeline import report as report_

    rep = report_(run_folder or _run_dir(None, None))
    if as_json:
        click.echo(json.dumps({**rep.to_dict(), "summary": rep.summary()}, indent=2))
    else:
        click.echo(rep.table())


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for energy.json and energy.csv.",
)
@click.option("--name", default=None, help="Window name (default: the command line).")
@click.option("--carbon-intensity", default=None, help="gCO2e/kWh or a country code.")
@click.option("--pue", type=float, default=1.0, show_default=True, help="PUE.")
@click.option("--cpu-tdp", "cpu_tdp_w", type=float, default=None, help="CPU TDP in watts.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_library_call
def measure(out, name, carbon_intensity, pue, cpu_tdp_w, command):
    """Measure the energy of any command: keras-lean measure -- python train.py ..."""
    from keras_lean.energy import measure_command

    try:
        code, record = measure_command(
            list(command),
            out,
            window_name=name,
            carbon_intensity=_carbon(carbon_intensity),
            pue=pue,
            cpu_tdp_w=cpu_tdp_w,
        )
    except OSError as e:
        raise ValueError(f"cannot run {command[0]!r}: {e.strerror or e}") from e
    click.echo(
        f"measure: exit {code}, {record.duration_s:.2f} s, {record.energy_j:.2f} J "
        f"({record.energy_kwh:.3e} kWh, {record.method}), "
        f"{record.emissions_kg * 1000:.4f} g CO2e" + (f" -> {out}" if out else ""),
        err=True,
    )
    click.get_current_context().exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`keras-lean`)."""
    # Only the CLI process quiets TensorFlow's C++ start-up logging; the library never does.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="keras-lean")


if __name__ == "__main__":  # pragma: no cover
    main()
