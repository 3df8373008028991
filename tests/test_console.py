"""What the CLI prints: headings, one bar per stage, quiet/verbose, silenced TensorFlow noise."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_lean.console import Console, describe_finetune, describe_method, progress_bar
from keras_lean.pipeline.recipe import Recipe


class _Tty(io.StringIO):
    encoding = "utf-8"

    def isatty(self):
        return True


def _fit(console, epochs=3, energy=True, prune=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 2, 40)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    if prune:
        from keras_lean.sparsity import ConstantSparsity, prune_low_magnitude

        model = prune_low_magnitude(model, pruning_schedule=ConstantSparsity(0.5, 0, frequency=1))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class FakeEnergy(keras.callbacks.Callback):  # the stage's energy callback runs after the bar
        def on_epoch_end(self, epoch, logs=None):
            logs["energy_j"] = 2.5

    bar = progress_bar(console, "finetune")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        validation_data=(x, y),
        callbacks=[bar, *([FakeEnergy()] if energy else [])],
        verbose=console.keras_verbose,
    )
    return bar


def test_a_pipe_gets_one_plain_line_per_epoch_with_the_figures():
    out = io.StringIO()
    console = Console("normal", stream=out)
    assert not console.interactive and console.keras_verbose == 0
    _fit(console, epochs=3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]
    for i, ln in enumerate(lines, start=1):
        assert "loss " in ln and "acc " in ln and ln.split()[-2] == "val"
        assert f"  {2.5 * i:.1f} J  " in ln  # energy so far, summed over the epochs


def test_a_terminal_gets_one_bar_redrawn_in_place():
    out = _Tty()
    console = Console("normal", stream=out, width=120)
    assert console.interactive
    _fit(console, epochs=2)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line for the whole stage
    frames = [f for f in text.split("\r") if f]
    assert len(frames) >= 2 and all(f.startswith("  epoch ") for f in frames)
    assert "epoch 2/2" in frames[-1] and "━" * 6 in frames[-1] and "5.0 J" in frames[-1]
    assert all(len(f.replace("\x1b[K", "")) < 120 for f in frames)  # fits the terminal


def test_a_narrow_terminal_keeps_the_figures_and_shortens_the_bar():
    out = _Tty()
    _fit(Console("normal", stream=out, width=80), epochs=1)
    last = out.getvalue().split("\r")[-1].replace("\x1b[K", "").rstrip("\n")
    assert len(last) <= 79 and last.endswith(tuple("0123456789")) and " J  val " in last


def test_the_bar_shows_the_current_sparsity_of_a_pruned_model():
    out = io.StringIO()
    _fit(Console("normal", stream=out), epochs=1, energy=False, prune=True)
    assert "sparsity 50.0 %" in out.getvalue()


@pytest.mark.parametrize(
    ("flags", "mode", "bars", "keras_verbose"),
    [
        ({}, "normal", 1, 0),
        ({"quiet": True}, "quiet", 0, 0),
        ({"verbose": True}, "verbose", 0, 2),
        ({"verbose": True, "quiet": True}, "verbose", 0, 2),
    ],
    ids=["default", "quiet", "verbose", "verbose-wins"],
)
def test_modes_decide_bars_headings_and_keras_output(flags, mode, bars, keras_verbose):
    out = io.StringIO()
    console = Console.from_flags(stream=out, **flags)
    assert console.mode == mode
    assert len(console.callbacks("finetune")) == bars
    assert console.keras_verbose == keras_verbose
    console.heading("finetune", "magnitude 0 → 80 % over 4 epochs")
    console.result("the table")
    expected = "" if mode == "quiet" else "[3/5] finetune: magnitude 0 → 80 % over 4 epochs\n"
    assert out.getvalue() == expected + "the table\n"


def test_a_bad_mode_is_an_error():
    with pytest.raises(ValueError, match="mode must be one of quiet, normal, verbose"):
        Console("loud")


def test_the_finetune_heading_says_method_target_and_epochs():
    rec = Recipe()
    assert describe_finetune(rec) == "magnitude 0 → 80 % over 4 epochs"
    rec = rec.replace(finetune=rec.finetune.__class__(epochs=1))
    assert describe_finetune(rec).endswith("over 1 epoch")


def test_methods_without_a_schedule_are_described_by_their_target_option():
    from keras_lean.pipeline.recipe import method_class

    cls = method_class("structured")
    text = describe_method("structured", cls.options_class())
    assert text.startswith("structured ") and text != "structured"
    lora = method_class("lora")
    assert describe_method("lora", lora.options_class()) == "lora"


_NATIVE = textwrap.dedent(
    """
    import os, sys
    from keras_lean.console import Console
    console = Console({mode!r})
    with console.native_quiet():
        os.write(2, b"I0000 native C++ line\\n")
        print("python stderr line", file=sys.stderr)
    print("after", file=sys.stderr)
    print(repr(console.captured))
    """
)


@pytest.mark.parametrize(
    ("mode", "native_shown"), [("normal", False), ("verbose", True)], ids=["normal", "verbose"]
)
def test_native_stderr_lines_are_captured_but_python_stderr_is_not(mode, native_shown):
    r = subprocess.run(
        [sys.executable, "-c", _NATIVE.format(mode=mode)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert ("I0000 native C++ line" in r.stderr) is native_shown
    assert "python stderr line" in r.stderr and "after" in r.stderr
    if not native_shown:
        assert "I0000 native C++ line" in r.stdout  # kept in Console.captured


# ---------------------------------------------------------------------- the real CLI

# What TensorFlow printed before the CLI silenced it (issue 12, item 7).
_NOISE = ("oneDNN", "cuda", "cuInit", "fully_quantize", "retracing", "I0000", "E0000", "WARNING")


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, digits):
    x_train, y_train, x_val, y_val = digits
    path = tmp_path_factory.mktemp("console") / "small.npz"
    np.savez(
        path, x_train=x_train[:300], y_train=y_train[:300], x_val=x_val[:100], y_val=y_val[:100]
    )
    return path


def _cli(args, **kw):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user has it
    return subprocess.run(
        [sys.executable, "-m", "keras_lean.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kw,
    )


def test_run_into_a_pipe_prints_headings_plain_lines_and_the_table(tmp_path, small_npz):
    r = _cli(
        ["run", "--out", tmp_path / "run", "--data", small_npz, "--baseline-epochs", "1"]
        + ["--epochs", "1", "--jit-compile", "off", "--max-accuracy-drop", "1"]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(n in r.stderr for n in _NOISE), r.stderr
    assert r.stderr.strip() == ""
    lines = r.stdout.splitlines()
    headings = [ln for ln in lines if ln.startswith("[")]
    assert [h.split(":")[0] for h in headings] == [
        "[1/5] baseline",
        "[2/5] configure",
        "[3/5] finetune",
        "[4/5] validate",
        "[5/5] deploy",
    ]
    assert headings[2] == "[3/5] finetune: magnitude 0 → 80 % over 1 epoch"
    epochs = [ln for ln in lines if ln.startswith("  epoch 1/1")]
    assert len(epochs) == 2 and "sparsity 80.0 %" in epochs[1]  # baseline, then finetune
    assert "\r" not in r.stdout and "Epoch 1/1" not in r.stdout  # no redraws, no Keras bars
    table = lines.index(next(ln for ln in lines if ln.startswith("stage ")))
    assert table > lines.index(headings[-1]) and "deployed:" in r.stdout


def test_a_terminal_gets_the_bar_and_nothing_from_tensorflow(tmp_path, small_npz):
    import os
    import pty

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_lean.cli", "baseline", "--out", str(tmp_path / "run")]
        + ["--data", str(small_npz), "--epochs", "2"],
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0, err
    shown = b"".join(chunks).decode()
    assert err.strip() == "" and not any(n in shown for n in _NOISE), err + shown
    assert shown.startswith("[1/5] baseline: train cnn on ")
    bar = shown.split("\n")[1]  # one line, redrawn in place
    frames = [f for f in bar.split("\r") if f.strip()]
    assert len(frames) >= 2 and "epoch 2/2" in frames[-1] and "━" in frames[-1]
    assert shown.split("\n")[2].startswith("baseline: accuracy ")


@pytest.mark.parametrize(
    ("flag", "keras_lines", "our_lines"),
    [("-v", True, True), ("--quiet", False, False)],
    ids=["verbose", "quiet"],
)
def test_verbose_brings_back_keras_and_quiet_prints_only_the_summary(
    tmp_path, small_npz, flag, keras_lines, our_lines
):
    r = _cli(["baseline", "--out", tmp_path / "run", "--data", small_npz, "--epochs", "1", flag])
    assert r.returncode == 0, r.stderr
    assert ("ms/step" in r.stdout) is keras_lines  # Keras' own per-epoch line
    assert r.stdout.startswith("[1/5] baseline") is our_lines
    assert any(n in r.stderr for n in _NOISE) is keras_lines  # TensorFlow's own lines
    if flag == "--quiet":
        assert r.stdout.splitlines() == [next(ln for ln in r.stdout.splitlines())]
        assert r.stdout.startswith("baseline: accuracy ")


@pytest.mark.parametrize(
    ("error", "command", "expected"),
    [
        (
            "training",
            "finetune",
            "Interrupted: interrupted in epoch 3 after step 7; a resume continues from the "
            "checkpoint of epoch 2. resume with `keras-lean finetune --out RUN --resume`.",
        ),
        (
            "training",
            "run",
            "Interrupted: interrupted in epoch 3 after step 7; a resume continues from the "
            "checkpoint of epoch 2. resume with `keras-lean finetune --out RUN --resume`, then "
            "`keras-lean validate --out RUN` and `keras-lean deploy --out RUN`.",
        ),
        (
            "plain",
            "finetune",
            "Interrupted; earlier stages' files are intact. resume with "
            "`keras-lean finetune --out RUN --resume`.",
        ),
        ("plain", "deploy", "Interrupted; earlier stages' files are intact."),
    ],
    ids=["finetune", "run", "outside-fit", "other-command"],
)
def test_the_interrupt_message_names_the_resume_command(error, command, expected):
    from keras_lean.console import interrupted_message
    from keras_lean.pipeline.interrupt import TrainingInterrupted

    exc = (
        TrainingInterrupted(epoch=2, step=7, completed_epochs=2)
        if error == "training"
        else KeyboardInterrupt()
    )
    assert interrupted_message(exc, command, "RUN") == expected


def test_stage_descriptions_come_from_the_run_folder(tmp_path):
    from keras_lean.console import describe_stage
    from keras_lean.pipeline import recipe_to_yaml

    context = {"arch": "mlp", "data": "d.npz", "epochs": 1}
    assert describe_stage("baseline", tmp_path, **context) == "train mlp on d.npz for 1 epoch"
    assert describe_stage("baseline", tmp_path, model_path="m.keras") == (
        "adopt m.keras and evaluate it on digits"
    )
    assert describe_stage("finetune", tmp_path) == ""  # no recipe yet: no claim
    (tmp_path / "recipe.yaml").write_text(recipe_to_yaml(Recipe()))
    gate = Recipe().max_accuracy_drop
    assert describe_stage("validate", tmp_path) == f"accuracy gate, largest allowed drop {gate:g}"
    deploy = describe_stage("deploy", tmp_path, quantization="int8")
    assert "(quantization int8)" in deploy and "tflite" in deploy
