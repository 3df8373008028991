"""What the `keras-lean` CLI prints: stage headings, one progress bar per stage, the table.

Only the CLI uses this module; `import keras_lean` and the library leave logging, warnings,
environment variables and file descriptors alone.

Three levels (`Console.mode`):

- `normal`: TensorFlow's start-up and converter lines, `tf.function` retracing warnings and Python
  warnings are silenced; each stage prints a heading (`[3/5] finetune: magnitude 0 → 80 % over
  4 epochs`) and, where it trains, one progress bar (epoch, loss, accuracy, current sparsity,
  energy so far); then the table. On a terminal the bar redraws in place; elsewhere (CI, a
  pipe) it prints one plain line per epoch.
- `quiet` (`--quiet`): only the table (or a step's one-line summary).
- `verbose` (`-v`): everything: TensorFlow's logs, Keras' own progress bars, the headings.

TensorFlow writes its C++ lines (oneDNN, "Could not find cuda drivers", `cuInit`, the TFLite
converter's "fully_quantize: ...") to file descriptor 2 directly, whatever Python's logging says,
so `Console.native_quiet()` points fd 2 at a temporary file around a library call while Python's
`sys.stderr` keeps writing to the terminal; what was captured is shown only when the call fails
with `--debug`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

MODES = ("quiet", "normal", "verbose")
STAGE_ORDER = ("baseline", "configure", "finetune", "validate", "deploy")

# Python loggers that TensorFlow and its helpers write warnings to.
_NOISY_LOGGERS = ("tensorflow", "absl", "h5py", "jax._src.xla_bridge")


def silence_libraries() -> None:
    """Quiets TensorFlow and Python warnings for this process; call before TensorFlow loads.

    Sets `TF_CPP_MIN_LOG_LEVEL=3` (unless the user set it), lowers TensorFlow's and absl's
    Python loggers to errors and ignores Python warnings. The C++ lines TensorFlow prints before
    it reads its log level need `Console.native_quiet()` as well.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class _Fd2Capture:
    """Points file descriptor 2 at a temporary file; Python's `sys.stderr` stays on the terminal."""

    def __init__(self) -> None:
        self.text = ""

    @contextlib.contextmanager
    def __call__(self) -> Iterator[_Fd2Capture]:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. an embedded Python)
            yield self
            return
        tmp = tempfile.TemporaryFile()
        old_stderr = sys.stderr
        # Python's stderr keeps reaching the terminal (when it is fd 2; a test runner's
        # replacement stream is left as it is).
        terminal = None
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if sys.stderr.fileno() == 2:
                terminal = os.fdopen(os.dup(saved), "w", buffering=1, errors="replace")
        try:
            os.dup2(tmp.fileno(), 2)
            if terminal is not None:
                sys.stderr = terminal
            yield self
        finally:
            sys.stderr = old_stderr
            if terminal is not None:
                terminal.close()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            self.text = tmp.read().decode("utf-8", "replace")
            tmp.close()


@dataclasses.dataclass
class Console:
    """How much the CLI prints, and where.

    Attributes:
        mode: `quiet`, `normal` or `verbose` (see the module doc).
        stream: where headings, bars and tables go (stdout).
        interactive: redraw progress bars in place (None: when `stream` is a terminal).
        width: line width for bars (None: the terminal's).
    """

    mode: str = "normal"
    stream: TextIO | None = None
    interactive: bool | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"mode must be one of {', '.join(MODES)}. Received: mode={self.mode!r}"
            )
        if self.stream is None:
            self.stream = sys.stdout
        if self.interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            self.interactive = bool(isatty and isatty())
        self.captured = ""

    @classmethod
    def from_flags(cls, *, verbose: bool = False, quiet: bool = False, **kw: Any) -> Console:
        """`-v` wins over `--quiet`; neither is `normal`."""
        return cls("verbose" if verbose else "quiet" if quiet else "normal", **kw)

    # ------------------------------------------------------------------ what to pass the library

    @property
    def keras_verbose(self) -> int:
        """`verbose` for Keras' `fit`: its own bar only in verbose mode (lines when not a tty)."""
        if self.mode != "verbose":
            return 0
        return 1 if self.interactive else 2

    def callbacks(self, stage: str) -> list:
        """The Keras callbacks showing `stage`'s training: one progress bar (normal mode only)."""
        if self.mode != "normal":
            return []
        return [progress_bar(self, stage)]

    @contextlib.contextmanager
    def native_quiet(self, debug: bool = False) -> Iterator[None]:
        """Silences fd 2 (TensorFlow's C++ lines) around a library call, except in verbose mode.

        With `debug`, what was captured is printed to stderr when the block raises.
        """
        if self.mode == "verbose":
            yield
            return
        silence_libraries()
        capture = _Fd2Capture()
        try:
            with capture():
                yield
        except BaseException:
            if debug and capture.text.strip():
                sys.stderr.write(capture.text)
            raise
        finally:
            self.captured = capture.text

    # ------------------------------------------------------------------ printing

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str = "") -> None:
        """A line shown in normal and verbose mode."""
        if self.mode != "quiet":
            self.write(text + "\n")

    def result(self, text: str) -> None:
        """What every mode prints: the table, a step's summary."""
        self.write(text + "\n")

    def heading(self, stage: str, text: str, index: int | None = None, total: int = 5) -> None:
        """`[3/5] finetune: magnitude 0 → 80 % over 4 epochs` (normal and verbose)."""
        if index is None and stage in STAGE_ORDER:
            index = STAGE_ORDER.index(stage) + 1
        prefix = f"[{index}/{total}] " if index is not None else ""
        self.line(f"{prefix}{stage}: {text}" if text else f"{prefix}{stage}")

    def stage_heading(self, stage: str, run_dir: str | os.PathLike, **context: Any) -> None:
        """The heading of one of the five steps, described from the run folder's files."""
        self.heading(stage, describe_stage(stage, run_dir, **context))

    @contextlib.contextmanager
    def watch(self, run_dir: str | os.PathLike, **contexts: dict) -> Iterator[None]:
        """Prints each step's heading as it begins its work, during the block.

        A step begins once its inputs are checked, so a step refused for bad input prints only
        its error line.

        Args:
            run_dir: the run folder the steps work on.
            **contexts: per step, the options `describe_stage` needs (e.g. `baseline={...}`).
        """
        from keras_lean.pipeline.steps.stage import observe_stages

        def began(stage: str) -> None:
            self.stage_heading(stage, run_dir, **contexts.get(stage, {}))

        with observe_stages(began):
            yield

    def glyphs(self) -> tuple[str, str]:
        encoding = (getattr(self.stream, "encoding", None) or "").lower()
        return ("━", "╌") if "utf" in encoding else ("#", "-")

    def columns(self) -> int:
        return self.width or shutil.get_terminal_size((100, 24)).columns


# ---------------------------------------------------------------------- stage headings


def _percent(value: float) -> str:
    return f"{100 * value:.4g}"


def describe_method(name: str, options: Any) -> str:
    """One phrase for a method's goal: `magnitude 0 → 80 %`, `structured ratio 0.5`."""
    from keras_lean.pipeline.recipe import method_class

    target = getattr(options, "target_sparsity", None)
    schedule = getattr(options, "schedule", None)
    initial = getattr(schedule, "initial_sparsity", None)
    if isinstance(target, float) and isinstance(initial, float):
        return f"{name} {_percent(initial)} → {_percent(target)} %"
    option = getattr(method_class(name), "target_option", None)
    value = getattr(options, option, None) if option else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "sparsity" in option and 0 <= value < 1:
            return f"{name} → {_percent(value)} %"
        return f"{name} {option.replace('_', ' ')} {value:g}"
    return name


def describe_finetune(recipe: Any) -> str:
    """`magnitude 0 → 80 % over 4 epochs` (with guard stages where the recipe has them)."""
    parts = [describe_method(n, recipe.method_options.get(n)) for n in recipe.methods]
    epochs = recipe.finetune.epochs
    text = " + ".join(parts) or "no method"
    guard = getattr(recipe, "guard", None)
    if guard is not None and getattr(guard, "enabled", False):
        stages = ", ".join(f"{s:g}" for s in guard.stages)
        return f"{text} in guarded stages {stages}, {guard.epochs_per_stage} epoch(s) each"
    return f"{text} over {epochs} epoch{'s' if epochs != 1 else ''}"


def describe_stage(stage: str, run_dir: str | os.PathLike, **context: Any) -> str:
    """What a step is about to do, from the run folder (recipe, manifest) and the CLI's options.

    Args:
        stage: one of the five steps.
        run_dir: the run folder.
        **context: the command's options that the folder does not hold yet (baseline: `arch`,
            `model_path`, `data`, `epochs`; deploy: `quantization`).
    """
    from keras_lean.pipeline.recipe import load_recipe

    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if stage == "baseline":
        data = context.get("data") or "digits"
        model_path = context.get("model_path")
        from keras_lean.pipeline.text import describe_text_model

        # Text data: the task model built from the preset (or the tiny decoder), not --arch.
        built = describe_text_model(data, model_path)
        if model_path and built is None:
            return f"adopt {model_path} and evaluate it on {data}"
        epochs = context.get("epochs")
        plural = "s" if epochs != 1 else ""
        return f"train {built or context.get('arch') or 'cnn'} on {data}" + (
            f" for {epochs} epoch{plural}" if epochs else ""
        )
    if stage == "configure":
        return f"write {recipe_path}"
    if stage == "dense_reference":
        return "fine-tune the baseline with no method, as the fine-tune trained (the comparison)"
    if not recipe_path.exists():
        return ""
    recipe = load_recipe(recipe_path)
    if stage == "finetune":
        return describe_finetune(recipe)
    if stage == "validate":
        if _is_causal_lm_run(recipe_path.parent):
            return f"perplexity gate, largest allowed rise {recipe.max_perplexity_rise:.0%}"
        return f"accuracy gate, largest allowed drop {recipe.max_accuracy_drop:g}"
    if stage == "deploy":
        quantization = context.get("quantization") or recipe.export.quantization
        from keras_lean.pipeline.steps.deploy import describe_formats  # tflite: TF only

        formats = describe_formats(recipe.export)
        return f"strip, export {formats} (quantization {quantization}), check, measure"
    return ""


def _is_causal_lm_run(folder: Path) -> bool:
    """Whether the run in `folder` trains a causal LM (its manifest's `text.task`)."""
    import json

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and (manifest.get("text") or {}).get("task") == "causal_lm"


# ---------------------------------------------------------------------- the progress bar


def _current_sparsity(model: Any) -> float | None:
    """Zero fraction of the pruning masks (None when the model has no pruning wrapper)."""
    from keras_lean.sparsity import get_masks

    try:
        masks = get_masks(model)
    except (ValueError, TypeError):
        return None
    total = sum(m.size for m in masks.values())
    if not total:
        return None
    return 1.0 - float(sum(m.sum() for m in masks.values())) / total


def _figures(epoch_logs: dict, batch_logs: dict, sparsity: float | None, joules: float) -> str:
    """`loss 0.412  acc 0.912  sparsity 41.2 %  37.5 J  val 0.951`: what matters first, so a
    narrow terminal cuts the validation figure before the others."""
    parts = []
    for key, label in (("loss", "loss"), ("accuracy", "acc")):
        value = batch_logs.get(key, epoch_logs.get(key))
        if value is not None:
            parts.append(f"{label} {float(value):.3f}")
    if sparsity is not None:
        parts.append(f"sparsity {100 * sparsity:.1f} %")
    parts.append(f"{joules:.1f} J")
    if epoch_logs.get("val_accuracy") is not None:
        parts.append(f"val {float(epoch_logs['val_accuracy']):.3f}")
    return "  ".join(parts)


def progress_bar(console: Console, stage: str) -> Any:
    """One bar for a stage's whole `fit`: epoch, loss, accuracy, sparsity, energy so far.

    Energy comes from the stage's energy callback (`energy_j` in the epoch logs), which runs after
    this one, so an epoch's figures are shown when the next epoch begins or training ends.
    """
    import keras

    class StageProgress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.stage = stage
            self.lines: list[str] = []

        def on_train_begin(self, logs=None):
            self._epochs = int(self.params.get("epochs") or 1)
            self._steps = self.params.get("steps")
            self._joules = 0.0
            self._pending: dict | None = None
            self._epoch = 0
            self._initial = None
            self._drawn = 0.0
            self._sparsity: float | None = None
            self._epoch_logs: dict = {}
            # The widest the figures get (validation and sparsity shown), so the bar keeps one
            # width for the whole stage.
            pruned = _current_sparsity(self.model) is not None
            widest = _figures({"val_accuracy": 0.0}, {"loss": 0, "accuracy": 0}, 1.0, 99999.9)
            self._figures_width = len(widest) - (0 if pruned else len("sparsity 100.0 %  "))

        def on_epoch_begin(self, epoch, logs=None):
            self._flush_epoch()
            if self._initial is None:
                self._initial = epoch
            self._epoch = epoch
            self._sparsity = _current_sparsity(self.model)

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            if console.interactive and now - self._drawn >= 0.1:
                self._drawn = now
                self._draw(batch + 1, dict(logs or {}))

        def on_epoch_end(self, epoch, logs=None):
            self._pending = logs if logs is not None else {}
            self._sparsity = _current_sparsity(self.model)

        def on_train_end(self, logs=None):
            self._flush_epoch()
            if console.interactive and self.lines:
                console.write("\n")

        def _flush_epoch(self) -> None:
            if self._pending is None:
                return
            logs, self._pending = self._pending, None
            self._joules += float(logs.get("energy_j") or 0.0)
            self._epoch_logs = dict(logs)
            text = self._text(self._steps, {})
            self.lines.append(text)
            if console.interactive:
                self._redraw(text)
            else:
                console.write(text + "\n")

        def _draw(self, step: int, batch_logs: dict) -> None:
            self._redraw(self._text(step, batch_logs))

        def _redraw(self, text: str) -> None:
            console.write("\r" + text[: max(console.columns() - 1, 20)] + "\x1b[K")

        def _text(self, step: int | None, batch_logs: dict) -> str:
            epoch = f"epoch {self._epoch + 1}/{self._epochs}"
            figures = _figures(self._epoch_logs, batch_logs, self._sparsity, self._joules)
            if not console.interactive:
                return f"  {epoch}  {figures}"
            count = f"{step or 0}/{self._steps or '?'}"
            full, empty = console.glyphs()
            first = self._initial or 0
            span = max(self._epochs - first, 1)
            frac = (self._epoch - first + (step or 0) / max(self._steps or 1, 1)) / span
            longest = max(len(figures), self._figures_width)
            room = console.columns() - len(f"  {epoch}   {count}  ") - longest - 1
            width = max(6, min(24, room))
            filled = min(width, int(round(frac * width)))
            return f"  {epoch} {full * filled}{empty * (width - filled)} {count}  {figures}"

    return StageProgress()


# ---------------------------------------------------------------------- CLI glue


def verbosity_options(fn: Callable) -> Callable:
    """`--quiet/-q` and `--verbose/-v` for a click command; read back with `current_console()`."""
    import click

    def store(key: str) -> Callable:
        def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
            if value:
                root = ctx.find_root()
                root.obj = root.obj if isinstance(root.obj, dict) else {}
                root.obj[key] = True

        return callback

    fn = click.option(
        "--verbose",
        "-v",
        is_flag=True,
        expose_value=False,
        callback=store("verbose"),
        help="Print everything: TensorFlow's logs and Keras' own progress bars.",
    )(fn)
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        expose_value=False,
        callback=store("quiet"),
        help="Print only the table (or the step's one-line summary).",
    )(fn)


def current_console() -> Console:
    """The `Console` of the running click command (its `-v` / `--quiet` flags)."""
    import click

    ctx = click.get_current_context(silent=True)
    obj = (ctx.find_root().obj if ctx is not None else None) or {}
    return Console.from_flags(verbose=bool(obj.get("verbose")), quiet=bool(obj.get("quiet")))


def interrupted_message(error: BaseException, command: str, run_dir: Any | None) -> str:
    """What the CLI says after Ctrl-C: where it stopped, and the command that resumes."""
    from keras_lean.pipeline.interrupt import TrainingInterrupted

    text = "Interrupted; earlier stages' files are intact."
    if isinstance(error, TrainingInterrupted):
        text = f"Interrupted: {error.describe()}."
    if command not in ("finetune", "run") or run_dir is None:
        return text
    text += f" resume with `keras-lean finetune --out {run_dir} --resume`"
    if command == "run":
        text += (
            f", then `keras-lean validate --out {run_dir}` and `keras-lean deploy --out {run_dir}`"
        )
    return text + "."


__all__ = [
    "MODES",
    "Console",
    "describe_finetune",
    "describe_method",
    "current_console",
    "describe_stage",
    "interrupted_message",
    "progress_bar",
    "silence_libraries",
    "verbosity_options",
]
