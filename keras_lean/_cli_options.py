"""The `keras-lean` options shared by several commands, and the option types they use.

Choices and defaults come from the one constant that holds each (architectures, strategies,
quantizations, the carbon-intensity default, the method registry); nothing here imports
TensorFlow or Keras, so `import keras_lean.cli` stays light.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from keras_lean._choices import KERAS_QUANTIZATIONS, QUANTIZATIONS
from keras_lean.energy.carbon import WORLD_AVERAGE_G_PER_KWH
from keras_lean.pipeline.models import ARCHITECTURES
from keras_lean.pipeline.strategy import STRATEGIES


class LazyHelpOption(click.Option):
    """An option whose help text is computed when help is shown (it reads the method registry,
    which `import keras_lean.cli` must not load: `--help` stays fast)."""

    def __init__(self, *args: Any, help_fn: Callable[[], str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._help_fn = help_fn

    def get_help_record(self, ctx: click.Context):
        self.help = self._help_fn()
        return super().get_help_record(ctx)


def method_classes() -> list:
    from keras_lean.pipeline.methods import method_classes

    return method_classes()


def methods_help() -> str:
    names = ", ".join(c.name for c in method_classes())
    return f"Method(s) to apply (repeatable): {names}."


def target_help() -> str:
    # Methods that share a target option and its meaning share one entry.
    by_meaning: dict[tuple[str, str], list[str]] = {}
    for c in method_classes():
        if c.target_option is not None:
            by_meaning.setdefault((c.target_option, c.target_help), []).append(c.name)
    parts = [
        f"{', '.join(names)}: {option}" + (f" ({meaning})" if meaning else "")
        for (option, meaning), names in by_meaning.items()
    ]
    return "Sets each chosen method's target option. " + "; ".join(parts) + "."


def sweep_methods_help() -> str:
    names = ",".join(c.name for c in method_classes() if c.sweep_targets)
    return f"Comma-separated methods (default: {names})."


def sweep_targets_help() -> str:
    parts = [
        f"{c.name} {c.target_option} {','.join(f'{t:g}' for t in c.sweep_targets)}"
        for c in method_classes()
        if c.target_option is not None and c.sweep_targets
    ]
    return (
        "Comma-separated targets in (0, 1) for every method, each method's target option "
        f"(default per method: {'; '.join(parts)})."
    )


def run_options(fn: Callable) -> Callable:
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


def data_options(fn: Callable) -> Callable:
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


def arch_option(fn: Callable) -> Callable:
    return click.option(
        "--arch",
        type=click.Choice(ARCHITECTURES),
        default=ARCHITECTURES[0],
        show_default=True,
        help="Built-in baseline architecture.",
    )(fn)


def quantization_option(help_text: str) -> Callable:
    return click.option(
        "--quantization", type=click.Choice(QUANTIZATIONS), default=None, help=help_text
    )


def keras_quantization_option(help_text: str) -> Callable:
    """`--keras-quantization`: `export.keras_quantization` (gptq / awq: keras-hub causal LMs)."""
    return click.option(
        "--keras-quantization",
        type=click.Choice(KERAS_QUANTIZATIONS),
        default=None,
        help=help_text,
    )


def baseline_options(fn: Callable) -> Callable:
    for opt in reversed(
        [
            arch_option,
            click.option(
                "--model",
                "model_path",
                type=click.Path(),
                default=None,
                help="Adopt this .keras model instead of training one; or, with text data "
                "(.csv/.jsonl), a keras-hub preset folder whose backbone gets a classifier head "
                "(text + label columns) or is trained as a causal LM (text alone; a decoder "
                "preset, or no --model for a built-in tiny GPT-2 decoder).",
            ),
            click.option(
                "--sequence-length",
                type=int,
                default=None,
                help="Tokens per text with text data (per window for a causal LM; default 128).",
            ),
            click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
            click.option(
                "--strategy",
                type=click.Choice(STRATEGIES),
                default=STRATEGIES[0],
                show_default=True,
                help="tf.distribute strategy.",
            ),
            click.option(
                "--carbon-intensity",
                default=None,
                help=f"gCO2e/kWh or a country code (default {WORLD_AVERAGE_G_PER_KWH:g}, world "
                "average).",
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


#: The command-line options that become `RecipeOverrides` fields (same names).
OVERRIDE_OPTIONS = (
    "methods",
    "target_sparsity",
    "epochs",
    "batch_size",
    "learning_rate",
    "jit_compile",
    "mixed_precision",
    "quantization",
    "keras_quantization",
    "max_accuracy_drop",
    "settings",
)


def recipe_options(fn: Callable) -> Callable:
    """The recipe options; the command receives them as one `overrides` (RecipeOverrides)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from keras_lean.pipeline.overrides import RecipeOverrides

        fields = {k: kwargs.pop(k) for k in OVERRIDE_OPTIONS}
        fields["methods"] = tuple(fields["methods"]) or None
        mp = fields["mixed_precision"]
        fields["mixed_precision"] = None if mp is None else mp == "on"
        fields["settings"] = tuple(fields["settings"]) or None
        return fn(*args, overrides=RecipeOverrides(**fields), **kwargs)

    for opt in reversed(
        [
            click.option(
                "--recipe",
                type=click.Path(dir_okay=False),
                default=None,
                help="Start from this recipe YAML instead of the defaults.",
            ),
            click.option(
                "--method", "methods", multiple=True, cls=LazyHelpOption, help_fn=methods_help
            ),
            click.option(
                "--target-sparsity",
                type=float,
                default=None,
                cls=LazyHelpOption,
                help_fn=target_help,
            ),
            click.option("--epochs", type=int, default=None, help="Fine-tune epochs."),
            click.option("--batch-size", type=int, default=None, help="Batch size."),
            click.option("--learning-rate", type=float, default=None, help="Learning rate."),
            click.option(
                "--jit-compile",
                type=click.Choice(JIT_CHOICES),
                default=None,
                help="XLA for fine-tuning (auto: measure both, keep the faster).",
            ),
            click.option(
                "--mixed-precision",
                type=click.Choice(["on", "off"]),
                default=None,
                help="mixed_float16 fine-tuning.",
            ),
            quantization_option("TFLite quantization."),
            keras_quantization_option("Also save Keras' own Model.quantize of the .keras."),
            click.option(
                "--max-accuracy-drop",
                type=float,
                default=None,
                help="Validation gate: largest allowed accuracy drop (0.01 = 1 point).",
            ),
            click.option(
                "--set",
                "settings",
                multiple=True,
                metavar="KEY=VALUE",
                help="Set any recipe field by its dotted path, e.g. --set structured.mode="
                "progressive (repeatable; the value is YAML; applied last).",
            ),
        ]
    ):
        wrapper = opt(wrapper)
    return wrapper


JIT_CHOICES = ("on", "off", "auto")


def compare_dense_option(fn: Callable) -> Callable:
    """`--compare-dense`: `run(compare_dense=True)`, the saving against dense fine-tuning."""
    return click.option(
        "--compare-dense/--no-compare-dense",
        default=None,
        help="Also fine-tune the same baseline densely (same epochs, data order, seed, batch "
        "size, learning rate; its own energy window) and print the fine-tune's saving "
        "(default: no, unless the default experiment says so).",
    )(fn)


def carbon(value: str | None) -> float | str:
    if value is None:
        return WORLD_AVERAGE_G_PER_KWH
    try:
        return float(value)
    except ValueError:
        return value


def distribution_options(fn: Callable) -> Callable:
    """`--distribution` and the multi-process settings (keras_lean.pipeline.distribution)."""
    from keras_lean.pipeline.distribution import DISTRIBUTIONS

    for name, kind, text in (
        ("--coordinator-timeout", int, "Seconds to wait for the coordinator (default 120)."),
        ("--process-id", str, "This process's index, 0..N-1 (or JAX_PROCESS_ID)."),
        ("--num-processes", str, "Processes that join (or JAX_NUM_PROCESSES)."),
        ("--coordinator", str, "HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)."),
    ):
        fn = click.option(name, type=kind, default=None, help=text)(fn)
    return click.option(
        "--distribution",
        type=click.Choice(DISTRIBUTIONS),
        default=DISTRIBUTIONS[0],
        show_default=True,
        help="data-parallel: train on every device of every process (KERAS_BACKEND=jax; "
        "docs/distributed.md).",
    )(fn)
