"""The CLI end to end with click's CliRunner, on tiny settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_lean.cli import cli


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, digits):
    x_train, y_train, x_val, y_val = digits
    path = tmp_path_factory.mktemp("cli-data") / "tiny.npz"
    np.savez(
        path, x_train=x_train[:300], y_train=y_train[:300], x_val=x_val[:150], y_val=y_val[:150]
    )
    return path


@pytest.fixture(scope="module")
def cli_baseline(tmp_path_factory, tiny_data):
    """A run folder after `keras-lean baseline` (module-scoped: copied per test)."""
    out = tmp_path_factory.mktemp("cli-runs") / "base"
    result = CliRunner().invoke(
        cli, ["baseline", "--out", str(out), "--data", str(tiny_data), "--epochs", "3", "-q"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run_folder(cli_baseline, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(cli_baseline, dest)
    return dest


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_parsing_a_quantization_choice_does_not_import_tensorflow():
    # TensorFlow must be imported only after the console silenced it; a --quantization value
    # is validated while click parses, before the command body runs.
    code = (
        "import sys, click; from keras_lean.cli import cli\n"
        "deploy = cli.commands['deploy']\n"
        "ctx = deploy.make_context('deploy', ['--quantization', 'int8', '--out', 'x'])\n"
        "print(ctx.params['quantization'], 'tensorflow' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "int8 False", proc.stderr


def test_help_is_fast_and_does_not_import_tensorflow():
    code = "import sys, keras_lean.cli; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False False", proc.stderr
    result = invoke("--help")
    assert result.exit_code == 0
    for command in (
        "baseline",
        "configure",
        "finetune",
        "validate",
        "deploy",
        "run",
        "report",
        "measure",
        "sweep",
    ):
        assert command in result.output


def test_five_commands_and_every_artifact_loads(run_folder, tmp_path):
    out = run_folder
    assert (out / "baseline.keras").exists()
    r = invoke(
        "configure",
        "--out",
        out,
        "--epochs",
        "1",
        "--jit-compile",
        "off",
        "--target-sparsity",
        "0.7",
        "--max-accuracy-drop",
        "1",
    )
    assert r.exit_code == 0, r.output
    assert "recipe.yaml" in r.output
    r = invoke("finetune", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert "finetune: accuracy" in r.output and "zeros" in r.output
    # The gate is wide open (max drop 1): validate must pass and exit 0; the failing gate is
    # test_validate_gate_exits_1.
    r = invoke("validate", "--out", out)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].startswith("validate: PASS")
    assert json.loads((out / "validation.json").read_text())["passed"] is True
    r = invoke("deploy", "--out", out, "--quantization", "float16")
    assert r.exit_code == 0, r.output
    assert "TFLite vs Keras: max abs diff" in r.output

    # Every artifact loads: .keras files here, TFLite in the interpreter, SavedModel in a
    # fresh process.
    data = np.load(json.loads((out / "manifest.json").read_text())["data"])
    x = data["x_val"][:4]
    for name in ("baseline.keras", "finetuned.keras", "export/model.keras"):
        assert keras.models.load_model(out / name).predict(x, verbose=0).shape == (4, 10)
    expected = keras.models.load_model(out / "export/model.keras").predict(x, verbose=0)
    from keras_lean.export import TFLiteRunner

    np.testing.assert_allclose(TFLiteRunner(out / "export/model.tflite")(x), expected, atol=1e-2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", expected)
    script = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({str(out / "export/model_saved_model")!r})
        y = m.serve(tf.constant(np.load({str(tmp_path / "x.npy")!r}))).numpy()
        np.testing.assert_allclose(y, np.load({str(tmp_path / "y.npy")!r}), atol=1e-5)
        print("SAVEDMODEL OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "SAVEDMODEL OK" in proc.stdout, proc.stderr[-2000:]

    r = invoke("report", out)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["stage", "time", "s"]
    assert [ln.split()[0] for ln in lines[2:7]] == [
        "baseline",
        "configure",
        "finetune",
        "validate",
        "deploy",
    ]
    r = invoke("report", out, "--json")
    payload = json.loads(r.output)
    assert payload["stages"][-1]["stage"] == "deploy"
    assert payload["summary"]["sparsity"] > 0.6


# Heavy: slow-marked. The default suite runs `run` in tests/test_console.py and every step's
# command in test_five_commands_and_every_artifact_loads.
@pytest.mark.slow
def test_run_command_on_tiny_settings(tmp_path, tiny_data):
    out = tmp_path / "all"
    r = invoke(
        "run",
        "--out",
        out,
        "--data",
        tiny_data,
        "--arch",
        "mlp",
        "--baseline-epochs",
        "2",
        "--epochs",
        "1",
        "--jit-compile",
        "off",
        "--max-accuracy-drop",
        "1",
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert "validation:" in r.output and "PASS" in r.output
    assert (out / "export" / "model.tflite").exists()
    assert (out / "export" / "deploy.json").exists()


def test_validate_gate_exits_1(run_folder):
    assert (
        invoke(
            "configure",
            "--out",
            run_folder,
            "--epochs",
            "1",
            "--jit-compile",
            "off",
            "--max-accuracy-drop",
            "0",
        ).exit_code
        == 0
    )
    keras.utils.set_random_seed(3)
    from keras_lean.pipeline import build_model

    build_model("cnn", (8, 8, 1), 10).save(run_folder / "finetuned.keras")  # untrained
    r = invoke("validate", "--out", run_folder)
    assert r.exit_code == 1 and "validate: FAIL" in r.output


def _bad_inputs(tmp_path, tiny_data, run_folder):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"\0garbage")
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF")
    wrong = tmp_path / "wrong.keras"
    inputs = keras.Input((28, 28, 1))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(wrong)
    five = tmp_path / "five.keras"
    inputs = keras.Input((8, 8, 1))
    keras.Model(inputs, keras.layers.Dense(5)(keras.layers.Flatten()(inputs))).save(five)
    d = np.load(tiny_data)
    nan = tmp_path / "nan.npz"
    x = d["x_train"].copy()
    x[3, 2, 2, 0] = np.nan
    np.savez(nan, x_train=x, y_train=d["y_train"], x_val=d["x_val"], y_val=d["y_val"])
    bad_recipe = tmp_path / "recipe.yaml"
    bad_recipe.write_text("version: 1\nfinetune:\n  epochs: 2\n  learning_rat: 0.1\n")
    out = tmp_path / "r"
    return {
        "missing-model": (
            ["baseline", "--out", out, "--model", tmp_path / "nope.keras"],
            "Model file not found",
        ),
        "corrupt-model": (
            ["baseline", "--out", out, "--model", corrupt],
            "not a valid .keras file",
        ),
        "non-keras-file": (["baseline", "--out", out, "--model", h5], "is not a Keras model file"),
        "shape-mismatch": (
            ["baseline", "--out", out, "--data", tiny_data, "--model", wrong],
            r"Data shape (8, 8, 1) (per sample) does not match",
        ),
        "labels-out-of-range": (
            ["baseline", "--out", out, "--data", tiny_data, "--model", five],
            "Labels out of range",
        ),
        "nan-data": (["baseline", "--out", out, "--data", nan], "contains 1 NaN/infinite"),
        "unknown-recipe-key": (
            ["configure", "--out", run_folder, "--recipe", bad_recipe],
            "finetune.learning_rat: unknown key",
        ),
        "missing-step": (["deploy", "--out", tmp_path / "empty"], "run `keras-lean finetune --out"),
        "missing-report": (["report", tmp_path / "empty"], "report.json not found"),
    }


CASES = [
    "missing-model",
    "corrupt-model",
    "non-keras-file",
    "shape-mismatch",
    "labels-out-of-range",
    "nan-data",
    "unknown-recipe-key",
    "missing-step",
    "missing-report",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_data, run_folder, case):
    args, message = _bad_inputs(tmp_path, tiny_data, run_folder)[case]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert message in lines[0]
    assert not isinstance(r.exception, (ValueError, TypeError, FileNotFoundError))


@pytest.mark.parametrize("where", ["group", "command"])
def test_debug_shows_the_exception(tmp_path, where):
    args = ["baseline", "--out", tmp_path / "r", "--model", tmp_path / "nope.keras"]
    args = ["--debug", *args] if where == "group" else [*args, "--debug"]
    r = invoke(*args)
    assert r.exit_code == 1
    assert isinstance(r.exception, FileNotFoundError)
    assert "Model file not found" in str(r.exception)


def test_measure_passes_the_exit_code_and_writes_energy(tmp_path):
    out = tmp_path / "energy"
    r = invoke(
        "measure",
        "--out",
        out,
        "--",
        sys.executable,
        "-c",
        "import sys; sum(range(10**6)); sys.exit(3)",
    )
    assert r.exit_code == 3, r.output
    assert "measure: exit 3" in r.output
    (record,) = json.loads((out / "energy.json").read_text())["records"]
    assert record["name"].startswith(sys.executable) and record["parent"] is None
    assert record["energy_j"] > 0 and record["duration_s"] > 0
    # The line printed is the record written.
    assert f"{record['energy_j']:.2f} J" in r.output
    r = invoke("measure", "--", "definitely-not-a-command-xyz")
    assert r.exit_code == 2 and "cannot run 'definitely-not-a-command-xyz'" in r.output


def test_interrupted_finetune_then_resume(run_folder, monkeypatch):
    from keras_lean.pipeline.steps import checkpoint

    r = invoke("configure", "--out", run_folder, "--epochs", "2", "--jit-compile", "off")
    assert r.exit_code == 0, r.output
    real = checkpoint.epoch_checkpoint

    def interrupting(run, state):
        cb = real(run, state)
        save = cb.on_epoch_end

        def on_epoch_end(epoch, logs=None):
            save(epoch, logs)
            raise KeyboardInterrupt

        cb.on_epoch_end = on_epoch_end
        return cb

    monkeypatch.setattr(checkpoint, "epoch_checkpoint", interrupting)
    r = invoke("finetune", "--out", run_folder, "-q")
    assert r.exit_code == 130
    assert f"resume with `keras-lean finetune --out {run_folder} --resume`" in r.output
    assert (run_folder / "checkpoint.keras").exists()
    assert not (run_folder / "finetuned.keras").exists()
    monkeypatch.setattr(checkpoint, "epoch_checkpoint", real)
    r = invoke("finetune", "--out", run_folder, "-q", "--resume")
    assert r.exit_code == 0, r.output
    entry = json.loads((run_folder / "report.json").read_text())["stages"][-1]
    assert entry["stage"] == "finetune" and entry["details"]["resumed_from_epoch"] == 1


@pytest.mark.slow
def test_default_run_meets_the_targets(tmp_path, monkeypatch):
    """`keras-lean run` with no options: >= 95 % accuracy, >= 80 % sparsity, gzip <= 1/3."""
    monkeypatch.chdir(tmp_path)
    r = invoke("run", "-q")
    assert r.exit_code == 0, r.output
    payload = json.loads((tmp_path / "savedmodels/default/report.json").read_text())
    deploy = payload["stages"][-1]
    assert deploy["stage"] == "deploy"
    assert deploy["accuracy"] >= 0.95
    assert deploy["details"]["methods"]["magnitude"]["final"]["sparsity"] >= 0.8 - 1e-6
    assert deploy["details"]["tflite_gzip_ratio"] <= 1 / 3
    assert sum(s["duration_s"] for s in payload["stages"]) < 180


def test_help_lists_the_five_steps_in_order_then_the_others():
    r = invoke("--help")
    assert r.exit_code == 0
    lines = r.output.split("Commands:", 1)[1].splitlines()
    commands = [ln.split()[0] for ln in lines if ln.startswith("  ") and ln.split()]
    assert set(commands) == set(cli.commands)
    steps = ["baseline", "configure", "finetune", "validate", "deploy"]
    assert commands[:5] == steps
    assert sorted(commands[5:]) == sorted(set(cli.commands) - set(steps))
    assert commands[5:] == sorted(commands[5:])


def test_method_and_target_help_come_from_the_registry():
    from keras_lean.pipeline.methods import method_classes

    r = invoke("configure", "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for cls in method_classes():
        assert cls.name in text
        if cls.target_option is not None:
            assert cls.target_option in text and " ".join(cls.target_help.split()) in text


def test_target_sparsity_sets_the_structured_ratio(run_folder):
    import yaml

    r = invoke(
        "configure", "--out", run_folder, "--method", "structured", "--target-sparsity", "0.5"
    )
    assert r.exit_code == 0, r.output
    recipe = yaml.safe_load((run_folder / "recipe.yaml").read_text())
    assert recipe["methods"] == ["structured"] and recipe["structured"]["ratio"] == 0.5


def test_an_unknown_quantization_is_a_usage_error(run_folder):
    r = invoke("deploy", "--out", run_folder, "--quantization", "int4")
    assert r.exit_code == 2
    assert "'int4' is not one of 'none', 'dynamic', 'float16', 'int8'" in r.output


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_a_type_error_is_a_bug_not_bad_input(tmp_path, monkeypatch, debug):
    import keras_lean.pipeline as pipeline

    def broken(*a, **k):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(pipeline, "report", broken)
    r = invoke(*(["--debug"] if debug else []), "report", tmp_path)
    assert r.exit_code == 1
    if debug:
        assert isinstance(r.exception, TypeError)
    else:
        assert "Error: TypeError: unsupported operand" in r.output
        assert "This is a bug" in r.output and "--debug" in r.output
        assert not isinstance(r.exception, TypeError)
