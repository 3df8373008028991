"""`keras-lean`: the command line, a thin shell over `keras_lean.pipeline` and `keras_lean.energy`.

Every command parses its options, calls one public function and prints a short summary. Library
errors become one line on stderr and exit code 2 (bad input); a failed validation gate exits 1,
and so does a `TypeError` (a bug, with a hint to rerun with `--debug`); `--debug` shows the
traceback instead. Importing this module imports neither TensorFlow nor Keras,
so `keras-lean --help` is fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from keras_lean import __version__
from keras_lean import _cli_options as opts
from keras_lean.console import current_console, interrupted_message, verbosity_options
from keras_lean.pipeline.strategy import STRATEGIES

#: Library errors that mean the user's input is wrong: one line, exit 2. A TypeError is not
#: among them: it is a bug (in keras_lean or a caller's code), so it exits 1 with a hint.
_BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)

#: The five steps in pipeline order; `--help` lists them first, then the other commands.
STEP_COMMANDS = ("baseline", "configure", "finetune", "validate", "deploy")


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
            if ctx.info_name == "measure":  # its child's stderr must reach the terminal
                return fn(*args, **kwargs)
            with current_console().native_quiet(debug):
                return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except _BAD_INPUT as e:
            if debug:
                raise
            click.echo(f"Error: {_one_line(e)}", err=True)
            ctx.exit(2)
        except TypeError as e:
            if debug:
                raise
            click.echo(
                f"Error: {type(e).__name__}: {_one_line(e)}\n"
                f"This is a bug, not a problem with your input: run the command again with "
                f"--debug for the traceback, and report it.",
                err=True,
            )
            ctx.exit(1)
        except KeyboardInterrupt as e:
            folder = _run_dir(kwargs.get("out"), kwargs.get("run_name")).root
            click.echo(interrupted_message(e, ctx.info_name, folder), err=True)
            ctx.exit(130)

    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


_quiet = verbosity_options  # -q / -v; read with current_console()


def _run_dir(out: str | None, run_name: str | None):
    from keras_lean.pipeline import run_dir_for

    return run_dir_for(out, run_name)


def _summary(result: Any) -> str:
    e = result.record
    parts = [f"{result.stage}:"]
    if e.accuracy is not None:
        parts.append(f"accuracy {e.accuracy:.4f}")
    if e.params:
        parts.append(
            f"params {e.params:,} (nonzero {e.nonzero_params:,}, "
            f"{1 - e.nonzero_params / e.params:.1%} zeros)"
        )
    if e.gzip_bytes is not None:
        parts.append(f"gzip {e.gzip_bytes / 1024:.1f} KB")
    parts.append(f"[{e.duration_s:.1f} s, {e.energy_j:.1f} J {e.energy_method}]")
    artifacts = ", ".join(str(p) for p in result.artifacts.values())
    return " ".join(parts) + (f" -> {artifacts}" if artifacts else "")


class _StepsFirstGroup(click.Group):
    """Lists the five steps in pipeline order, then the other commands by name."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        steps = [n for n in STEP_COMMANDS if n in names]
        return steps + sorted(n for n in names if n not in STEP_COMMANDS)


@click.group(cls=_StepsFirstGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@opts.run_options
@opts.data_options
@opts.baseline_options
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
    sequence_length=None,
):
    """Step 1: train a baseline (--arch) or adopt your model (--model); writes baseline.keras."""
    from keras_lean.pipeline import train_baseline

    con, folder = current_console(), _run_dir(out, run_name)
    context = dict(arch=arch, model_path=model_path, data=data, epochs=epochs)
    with con.watch(folder.root, baseline=context):
        result = train_baseline(
            folder,
            data=data,
            arch=arch,
            model_path=model_path,
            sequence_length=sequence_length,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            val_split=val_split,
            seed=seed,
            strategy=strategy,
            carbon_intensity=opts.carbon(carbon_intensity),
            pue=pue,
            cpu_tdp_w=cpu_tdp_w,
            verbose=con.keras_verbose,
            callbacks=con.callbacks("baseline"),
        )
    click.echo(_summary(result))


@cli.command()
@opts.run_options
@opts.recipe_options
@click.option("--force", is_flag=True, help="Overwrite an existing recipe.yaml.")
@_quiet
@_library_call
def configure(out, run_name, recipe, overrides, force):
    """Step 2: write recipe.yaml (commented, listing the prunable layers) for you to edit."""
    from keras_lean.pipeline import configure as configure_

    folder = _run_dir(out, run_name)
    with current_console().watch(folder.root):
        result = configure_(folder, recipe=recipe, overrides=overrides, force=force)
    click.echo(_summary(result))


@cli.command()
@opts.run_options
@click.option("--resume", is_flag=True, help="Continue from the last epoch's checkpoint.")
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=None,
    help="Override the run's tf.distribute strategy.",
)
@_quiet
@_library_call
def finetune(out, run_name, resume, strategy):
    """Step 3: apply the recipe during fine-tuning; writes finetuned.keras.

    Ctrl-C stops after the current step; `--resume` continues from the last epoch's checkpoint.
    """
    from keras_lean.pipeline import finetune as finetune_
    from keras_lean.pipeline.interrupt import interrupt_callback

    con, folder = current_console(), _run_dir(out, run_name)
    with con.watch(folder.root):
        result = finetune_(
            folder,
            resume=resume,
            strategy=strategy,
            verbose=con.keras_verbose,
            callbacks=[*con.callbacks("finetune"), interrupt_callback()],
        )
    click.echo(_summary(result))
    for key in ("resume_note", "lock_note"):
        if result.record.details.get(key):
            con.line(f"  note: {result.record.details[key]}")


@cli.command()
@opts.run_options
@_quiet
@_library_call
def validate(out, run_name):
    """Step 4: compare baseline and fine-tuned accuracy; exit 1 if the drop is too large."""
    from keras_lean.pipeline import validate as validate_

    folder = _run_dir(out, run_name)
    with current_console().watch(folder.root):
        result = validate_(folder)
    _echo_validation(result)
    if not result.passed:
        click.get_current_context().exit(1)


def _echo_validation(result: Any) -> None:
    verdict = "PASS" if result.passed else "FAIL"
    gate = (result.entry or {}).get("details") or {}
    if gate.get("metric") == "perplexity":  # a causal LM: the gate is the relative rise
        click.echo(
            f"validate: {verdict}: perplexity baseline {gate['baseline_perplexity']:.3f}, "
            f"fine-tuned {gate['finetuned_perplexity']:.3f}, rise {gate['perplexity_rise']:+.2%} "
            f"(max {gate['max_perplexity_rise']:.2%})"
        )
        return
    click.echo(
        f"validate: {verdict}: baseline {result.baseline_accuracy:.4f}, fine-tuned "
        f"{result.finetuned_accuracy:.4f}, drop {result.accuracy_drop:+.4f} "
        f"(max {result.max_accuracy_drop})"
    )


@cli.command()
@opts.run_options
@opts.quantization_option("Override the recipe's TFLite quantization.")
@opts.keras_quantization_option("Override the recipe's export.keras_quantization.")
@_quiet
@_library_call
def deploy(out, run_name, quantization, keras_quantization):
    """Step 5: strip wrappers, export SavedModel + TFLite, check in the interpreter, measure."""
    from keras_lean.pipeline import deploy as deploy_

    folder = _run_dir(out, run_name)
    with current_console().watch(folder.root, deploy=dict(quantization=quantization)):
        result = deploy_(folder, quantization=quantization, keras_quantization=keras_quantization)
    click.echo(_summary(result))
    d = result.record.details
    exp = d["export"]
    if exp.get("max_abs_diff") is not None:
        click.echo(
            f"  TFLite vs Keras: max abs diff {exp['max_abs_diff']:.3g}; latency batch "
            f"{exp['latency_batch_size']}: Keras {exp['keras_latency_ms']:.2f} ms, TFLite "
            f"{exp['tflite_latency_ms']:.2f} ms"
        )
    from keras_lean.pipeline.steps.report import tflite_size_phrase

    size = tflite_size_phrase(d.get("tflite_gzip_ratio"), exp.get("quantization"))
    if size is not None:
        click.echo(f"  {size}")


@cli.command(name="run")
@opts.run_options
@opts.data_options
@opts.baseline_options
@click.option(
    "--baseline-epochs", type=int, default=8, show_default=True, help="Baseline training epochs."
)
@opts.recipe_options
@opts.compare_dense_option
@opts.distribution_options
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
    overrides,
    compare_dense=None,
    distribution="none",
    coordinator=None,
    num_processes=None,
    process_id=None,
    coordinator_timeout=None,
    sequence_length=None,
):
    """All five steps with the same options (no options: digits, CNN, 80 % magnitude pruning)."""
    from keras_lean.pipeline import DenseReferenceError
    from keras_lean.pipeline import distribution as dist
    from keras_lean.pipeline import report as report_
    from keras_lean.pipeline import run as run_
    from keras_lean.pipeline.interrupt import interrupt_callback

    dist.setup_from_cli(distribution, coordinator, num_processes, process_id, coordinator_timeout)

    con, folder = current_console(), _run_dir(out, run_name)
    baseline_context = dict(arch=arch, model_path=model_path, data=data, epochs=baseline_epochs)
    dense_error = None
    with con.watch(folder.root, baseline=baseline_context):
        try:
            result = dist.run_on_every_process(  # one process: run_(folder, ...)
                run_,
                folder,
                data=data,
                arch=arch,
                model_path=model_path,
                sequence_length=sequence_length,
                baseline_epochs=baseline_epochs,
                val_split=val_split,
                seed=seed,
                strategy=strategy,
                recipe=recipe,
                overrides=overrides,
                carbon_intensity=opts.carbon(carbon_intensity),
                pue=pue,
                cpu_tdp_w=cpu_tdp_w,
                verbose=con.keras_verbose,
                callbacks=[*con.callbacks("finetune"), interrupt_callback()],
                baseline_callbacks=con.callbacks("baseline"),
                compare_dense=compare_dense,
                dense_callbacks=[*con.callbacks("dense_reference"), interrupt_callback()],
            )
        except DenseReferenceError as e:  # the other steps are done: show them, then the error
            if click.get_current_context().params.get("debug"):
                raise
            result, dense_error = e.result, e
    con.line()
    if dist.is_writer():
        click.echo(report_(folder).table())
    else:  # data-parallel: process 0 writes the run folder and prints the report
        click.echo(f"process {dist.process_index()}: done; process 0 wrote {folder.root}")
    if not result.passed:
        click.echo("validation failed: deploy skipped", err=True)
    if dense_error is not None:
        click.echo(f"Error: {_one_line(dense_error)}", err=True)
    if not result.passed or dense_error is not None:
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
    "--methods", callback=_comma_list, cls=opts.LazyHelpOption, help_fn=opts.sweep_methods_help
)
@click.option(
    "--targets", callback=_comma_list, cls=opts.LazyHelpOption, help_fn=opts.sweep_targets_help
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
@opts.arch_option
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
@click.option("--jit-compile", type=click.Choice(opts.JIT_CHOICES), default=None, help="XLA.")
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
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw energy and accuracy per stage (and per epoch, for progressive runs and the "
    "dense reference) and per-layer sparsity (or widths) into this PNG (needs matplotlib).",
)
@_library_call
def report(run_folder, as_json, plot):
    """Print the run's table: stage, time, energy, CO2, accuracy, params, nonzero, gzip size."""
    from keras_lean.pipeline import report as report_

    rep = report_(run_folder or _run_dir(None, None))
    if as_json:
        click.echo(json.dumps({**rep.to_dict(), "summary": rep.summary()}, indent=2))
    else:
        click.echo(rep.table())
    if plot is not None:
        from keras_lean.pipeline.plots import PLOT_INSTALL_HINT, plot_run

        try:
            path = plot_run(rep, plot)
        except ImportError as e:
            raise ValueError(f"--plot needs matplotlib ({PLOT_INSTALL_HINT}): {e}") from e
        click.echo(f"-> {path}", err=as_json)


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
            carbon_intensity=opts.carbon(carbon_intensity),
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
    """Console entry point (`keras-lean`).

    TensorFlow's logging is quieted by `keras_lean.console` around each command (not with `-v`);
    the library never touches it.
    """
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="keras-lean")


if __name__ == "__main__":  # pragma: no cover
    main()
