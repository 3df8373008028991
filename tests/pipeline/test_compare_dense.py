"""`run(compare_dense=True)` / `keras-lean run --compare-dense`: the dense reference stage."""

from __future__ import annotations

import importlib
import json
import re
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from keras_lean.cli import cli
from keras_lean.pipeline import (
    DenseReferenceError,
    RecipeOverrides,
    RunDir,
    configure,
    dense_reference,
    finetune,
    report,
    run,
)
from keras_lean.pipeline.methods import method_names
from keras_lean.pipeline.steps.dense_reference import compare, comparison_line
from keras_lean.pipeline.steps.stage import StageEntry

# The module (the steps package's `dense_reference` is the function).
dense_mod = importlib.import_module("keras_lean.pipeline.steps.dense_reference")

#: The line `run` and `report` end with (U+2212 before a saving, + before an extra cost).
LINE = re.compile(
    r"^fine-tune energy: (\d+\.\d) J vs dense (\d+\.\d) J \(([\u2212+])(\d+\.\d) %\), "
    r"accuracy (\d\.\d{4}) vs dense (\d\.\d{4})$"
)


def _finetuned(folder, *settings, methods=("magnitude",), epochs=1):
    configure(
        folder,
        overrides=RecipeOverrides(
            methods=methods, epochs=epochs, jit_compile="off", settings=settings or None
        ),
        force=True,
    )
    return finetune(folder, verbose=0)


@pytest.fixture(scope="module")
def _magnitude_run(_trained_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "magnitude"
    shutil.copytree(_trained_run, folder)
    _finetuned(folder)
    return folder


@pytest.fixture
def magnitude_run(_magnitude_run, tmp_path):
    """A run folder after a 1-epoch magnitude fine-tune (copied per test)."""
    dest = tmp_path / "run"
    shutil.copytree(_magnitude_run, dest)
    return RunDir(dest)


@pytest.fixture(scope="module")
def _compared_run(_magnitude_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "compared"
    shutil.copytree(_magnitude_run, folder)
    return RunDir(folder), dense_reference(folder, verbose=0)


def _snapshot(run: RunDir) -> tuple:
    return run.finetuned.read_bytes(), run.baseline.read_bytes(), run.report_file.read_text()


def test_dense_reference_records_its_stage_beside_the_untouched_pruned_run(
    _magnitude_run, _compared_run
):
    run, result = _compared_run
    pruned = RunDir(_magnitude_run)
    ft = report(pruned).entry("finetune")
    entry = result.record
    assert entry.stage == "dense_reference" and entry.energy_j > 0 and entry.duration_s > 0
    assert 0.0 <= entry.accuracy <= 1.0
    d = entry.details
    assert d["epochs"] == ft.details["epochs_run"] == 1
    assert (d["batch_size"], d["learning_rate"], d["seed"], d["optimizer"]) == (32, 1e-3, 0, "Adam")
    assert d["jit_compile"] is False and d["finetune_methods"] == ["magnitude"]
    assert [row["epoch"] for row in d["epoch_log"]] == [1] and d["epoch_log"][0]["energy_j"] > 0
    # The pruned artifacts are the same files; the dense model is its own, and dense.
    assert run.finetuned.read_bytes() == pruned.finetuned.read_bytes()
    assert run.baseline.read_bytes() == pruned.baseline.read_bytes()
    assert report(run).entry("finetune") == ft
    # It saved every epoch as the fine-tune's checkpoint does, to a scratch file now gone.
    assert not (run.root / "dense_reference.checkpoint.keras").exists()
    dense_model = keras.models.load_model(result.artifacts["dense_reference"])
    assert dense_model.count_params() == entry.params
    assert entry.nonzero_params > 0.99 * entry.params > ft.nonzero_params
    # report.json holds the entry and its comparison, and the comparison adds up.
    stored = json.loads(run.report_file.read_text())["stages"][-1]
    assert stored["stage"] == "dense_reference"
    c = stored["details"]["comparison"]
    assert c["finetune_energy_j"] == pytest.approx(ft.energy_j)
    assert c["dense_energy_j"] == pytest.approx(stored["energy_j"])
    assert c["energy_saving"] == pytest.approx(1 - ft.energy_j / stored["energy_j"])
    assert c["accuracy_delta"] == pytest.approx(ft.accuracy - stored["accuracy"])
    assert c["dense_epochs"] == c["finetune_epochs"] == 1


def test_the_report_and_its_json_end_with_the_comparison(_compared_run):
    run_, _ = _compared_run
    rep = report(run_)
    lines = rep.table().splitlines()
    assert sum(line.startswith("fine-tune energy:") for line in lines) == 1
    m = LINE.match(lines[-1])
    assert m is not None, lines[-1]
    c = rep.summary()["dense_reference"]
    assert float(m[1]) == pytest.approx(c["finetune_energy_j"], abs=0.05)
    assert float(m[2]) == pytest.approx(c["dense_energy_j"], abs=0.05)
    assert (m[3] == "\u2212") == (c["energy_saving"] > 0) and c["stale"] is False
    assert float(m[5]) == pytest.approx(rep.entry("finetune").accuracy, abs=5e-5)
    r = CliRunner().invoke(cli, ["report", str(run_.root)])
    assert r.exit_code == 0 and r.output.rstrip().splitlines()[-1] == lines[-1]
    r = CliRunner().invoke(cli, ["report", str(run_.root), "--json"])
    payload = json.loads(r.output)
    assert payload["summary"]["dense_reference"]["dense_accuracy"] == pytest.approx(
        rep.entry("dense_reference").accuracy
    )


def test_a_failed_dense_run_records_nothing_and_keeps_the_run(magnitude_run, monkeypatch):
    before = _snapshot(magnitude_run)

    def boom(*a, **k):
        raise RuntimeError("out of memory in the dense run")

    monkeypatch.setattr(dense_mod, "load_model", boom)
    with pytest.raises(RuntimeError, match="out of memory in the dense run"):
        dense_reference(magnitude_run, verbose=0)
    assert _snapshot(magnitude_run) == before
    assert not (magnitude_run.root / "dense_reference.keras").exists()
    assert not magnitude_run.energy_dir("dense_reference").exists()
    assert (magnitude_run.root / "energy" / "dense_reference.failed" / "energy.json").exists()
    assert report(magnitude_run).dense_line() is None


def test_run_turns_a_dense_failure_into_a_clear_error_after_the_other_steps(
    magnitude_run, tiny_npz, monkeypatch
):
    run_mod = importlib.import_module("keras_lean.pipeline.steps.run")

    # The five steps are the real ones elsewhere; here they are the finished ones on disk.
    done = {"stage": "x", "entry": {}, "artifacts": {}}
    for step in ("train_baseline", "configure", "finetune", "deploy"):
        monkeypatch.setattr(run_mod, step, lambda *a, **k: done)
    monkeypatch.setattr(run_mod, "validate", lambda *a, **k: type("V", (), {"passed": True})())

    def boom(*a, **k):
        raise RuntimeError("dense crashed")

    monkeypatch.setattr(dense_mod, "PipelineFit", boom)
    before = _snapshot(magnitude_run)
    with pytest.raises(
        DenseReferenceError,
        match=r"dense reference failed \(RuntimeError: dense "
        r"crashed\); the other steps' artifacts in .* are complete and kept",
    ) as e:
        run(magnitude_run, data=tiny_npz, compare_dense=True, verbose=0, epochs=1)
    assert e.value.result.finetune is done and e.value.result.dense_reference is None
    assert _snapshot(magnitude_run) == before


def test_the_command_prints_the_run_then_the_dense_error_and_exits_1(magnitude_run, monkeypatch):
    import types

    import keras_lean.pipeline as pipeline

    def fake_run(folder, **kwargs):
        assert kwargs["compare_dense"] is True
        raise DenseReferenceError(
            "dense reference failed (RuntimeError: oom); the other steps' artifacts are kept",
            types.SimpleNamespace(passed=True),
        )

    monkeypatch.setattr(pipeline, "run", fake_run)
    r = CliRunner().invoke(cli, ["run", "--out", str(magnitude_run.root), "--compare-dense", "-q"])
    assert r.exit_code == 1
    assert "finetune " in r.output  # the table of what did run
    assert r.output.rstrip().splitlines()[-1] == (
        "Error: dense reference failed (RuntimeError: oom); the other steps' artifacts are kept"
    )


@pytest.mark.slow
def test_the_guard_is_compared_with_all_its_stages(trained_run):
    run_ = RunDir(trained_run)
    ft = _finetuned(
        run_, "guard.stages=[0.3, 0.5]", "guard.epochs_per_stage=1", "max_accuracy_drop=1.0"
    )
    assert len(ft.entry["details"]["guard"]["stages"]) == 2
    dense = dense_reference(run_, verbose=0)
    c = dense.entry["details"]["comparison"]
    assert dense.entry["details"]["epochs"] == ft.entry["details"]["epochs_run"] == 2
    assert c["finetune_energy_j"] == pytest.approx(ft.entry["energy_j"])  # every stage's window
    assert LINE.match(report(run_).table().splitlines()[-1])


def test_a_guarded_finetune_is_matched_epoch_for_epoch(magnitude_run):
    """What the dense reference reads of a guarded fine-tune (the slow test above runs one):
    the epochs of all stages together, and the energy of the one finetune window."""
    stages = json.loads(magnitude_run.report_file.read_text())["stages"]
    ft = next(s for s in stages if s["stage"] == "finetune")
    guard = {"stages": [{"stage": 1, "energy_j": 1.0}, {"stage": 2, "energy_j": 2.0}]}
    ft["details"].update(epochs_run=2, guard=guard)
    magnitude_run.record_stage(ft)
    dense = dense_reference(magnitude_run, verbose=0)
    assert dense.entry["details"]["epochs"] == 2
    assert [row["epoch"] for row in dense.entry["details"]["epoch_log"]] == [1, 2]
    c = dense.entry["details"]["comparison"]
    assert c["finetune_energy_j"] == pytest.approx(ft["energy_j"]) and c["finetune_epochs"] == 2


def test_progressive_structured_beside_its_dense_reference(trained_run, tmp_path):
    run_ = RunDir(trained_run)
    ft = _finetuned(
        run_,
        "structured.mode=progressive",
        "structured.ratio=0.3",
        "structured.schedule.frequency=4",
        methods=("structured",),
    )
    progressive = ft.entry["details"]["methods"]["structured"]["progressive"]
    assert progressive["shrinks_run"] >= 1
    dense_reference(run_, verbose=0)
    rep = report(run_)
    table = rep.table()
    # Per segment: width (units left), params, FLOPs, step time and J; then the comparison.
    seg_lines = [line for line in table.splitlines() if line.startswith("  steps ")]
    assert len(seg_lines) == len(progressive["segments"])
    assert all(
        re.search(r"units \d+ %, [\d,]+ params, [\d,]+ FLOPs, step ([\d.]+ ms|-), [\d.]+ J", line)
        for line in seg_lines
    ), seg_lines
    assert LINE.match(table.splitlines()[-1])
    assert re.search(r"energy per epoch:\n  finetune \(structured\): [\d.]+ J\n", table)
    assert re.search(r"\n  dense reference: +[\d.]+ J\n", table)
    assert rep.entry("dense_reference").params > rep.entry("finetune").params
    from keras_lean.pipeline.plots import epoch_series

    series = epoch_series(rep)  # what --plot draws per epoch
    assert set(series) == {"finetune (structured)", "dense reference"}
    assert all(p["energy_j"] > 0 and 0 <= p["accuracy"] <= 1 for s in series.values() for p in s)


def test_the_plot_draws_energy_and_accuracy_per_epoch(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from keras_lean.pipeline.plots import epoch_series, plot_run

    epochs = [
        {"epoch": e, "energy_j": j, "metrics": {"val_accuracy": a}}
        for e, j, a in ((1, 9.0, 0.9), (2, 6.0, 0.93), (3, 4.0, 0.94))
    ]
    methods = {"structured": {"progressive": {"epochs": epochs}}}
    log = [{"epoch": e, "energy_j": 9.0, "val_accuracy": 0.95} for e in (1, 2, 3)]
    rep = _FakeReport(
        "demo",
        (
            _entry("finetune", 19.0, 0.94, methods=methods).to_dict(),
            _entry("dense_reference", 27.0, 0.95, epoch_log=log).to_dict(),
        ),
    )
    series = epoch_series(rep)
    assert [p["energy_j"] for p in series["finetune (structured)"]] == [9.0, 6.0, 4.0]
    assert [p["accuracy"] for p in series["dense reference"]] == [0.95] * 3
    titles = []
    real = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        titles.extend(ax.get_title(loc="left") for ax in fig.axes)
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    assert plot_run(rep, tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    assert "energy (solid) and validation accuracy (dashed) per epoch" in titles


class _FakeReport:
    def __init__(self, run, stages):
        self.run, self.stages = run, stages


def _entry(stage, energy_j, accuracy, **details):
    return StageEntry(
        stage,
        "t0",
        10.0,
        energy_j,
        energy_j / 3.6e6,
        "measured",
        0.0,
        None,
        accuracy,
        details=details,
    )


@pytest.mark.parametrize(
    ("ft_j", "probe", "dense_j", "expected"),
    [
        (30.0, None, 40.0, "30.0 J vs dense 40.0 J (\u221225.0 %)"),
        (50.0, None, 40.0, "50.0 J vs dense 40.0 J (+25.0 %)"),
        (35.0, {"energy_j": 5.0, "duration_s": 1.0}, 40.0, "30.0 J vs dense 40.0 J (\u221225.0 %)"),
    ],
    ids=["saving", "extra-cost", "xla-probe-left-out"],
)
def test_comparison_line(ft_j, probe, dense_j, expected):
    ft = _entry("finetune", ft_j, 0.95, jit_probe=probe, epochs_run=2)
    dense = _entry("dense_reference", dense_j, 0.9612, epochs=2)
    c = compare(ft, dense)
    assert c["energy_saving"] == pytest.approx(1 - c["finetune_energy_j"] / dense_j)
    assert c["accuracy_delta"] == pytest.approx(0.95 - 0.9612)
    line = comparison_line(c)
    assert line == f"fine-tune energy: {expected}, accuracy 0.9500 vs dense 0.9612"
    assert LINE.match(line)


def test_a_stale_dense_reference_says_so(tmp_path):
    run_ = RunDir(tmp_path)
    run_.record_stage(_entry("finetune", 30.0, 0.95).to_dict())
    dense = _entry("dense_reference", 40.0, 0.96, finetune_started_at="t0")
    run_.record_stage(dense.to_dict())
    assert report(run_).dense_comparison()["stale"] is False
    run_.record_stage(
        StageEntry("finetune", "t1", 1.0, 20.0, 0.0, "measured", 0.0, accuracy=0.9).to_dict()
    )
    assert (
        report(run_).dense_line().endswith("(stale: finetune ran again after the dense reference)")
    )


def test_dense_reference_needs_a_finetune(trained_run):
    with pytest.raises(FileNotFoundError, match=r"dense_reference: .*recipe\.yaml not found"):
        dense_reference(trained_run)
    configure(trained_run, epochs=1, force=True)
    with pytest.raises(
        FileNotFoundError,
        match=r"finetuned\.keras not found; run `keras-lean "
        r"finetune",
    ):
        dense_reference(trained_run)
    with pytest.raises(ValueError, match=r"epochs must be an integer >= 1. Received: epochs=0"):
        dense_reference(trained_run, epochs=0)


def test_the_one_command_experiment_parses_to_progressive_structured_and_compare_dense(
    monkeypatch, tmp_path
):
    """`keras-lean run --method structured --target-sparsity 0.3 --set structured.mode=
    progressive --compare-dense`: the recipe and the flag `run` receives (training below)."""
    import keras_lean.pipeline as pipeline
    from keras_lean.pipeline.recipe import Recipe

    seen = {}

    def fake_run(folder, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline, "run", fake_run)
    r = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "x"), *EXPERIMENT, "-q"])
    assert r.exit_code == 2 and "stop here" in r.output
    assert seen["compare_dense"] is True
    options = seen["overrides"].apply(Recipe()).method_options["structured"]
    assert (options.mode, options.ratio) == ("progressive", 0.3)


EXPERIMENT = (
    "--method",
    "structured",
    "--target-sparsity",
    "0.3",
    "--set",
    "structured.mode=progressive",
    "--compare-dense",
)


@pytest.mark.slow
def test_the_one_command_experiment_on_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ("--baseline-epochs", "1", "--epochs", "1", "--jit-compile", "off")
    r = CliRunner().invoke(cli, ["run", *EXPERIMENT, *tiny, "-q"])
    assert r.exit_code == 0, r.output
    assert LINE.match(r.output.rstrip().splitlines()[-1]), r.output
    stages = json.loads((tmp_path / "savedmodels/default/report.json").read_text())["stages"]
    assert [s["stage"] for s in stages][-2:] == ["deploy", "dense_reference"]
    ft = stages[2]["details"]["methods"]["structured"]
    assert ft["options"]["mode"] == "progressive" and ft["options"]["ratio"] == 0.3


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in method_names() if m != "magnitude"], ids=str)
def test_every_method_gets_its_dense_reference(trained_run, method):
    ft = _finetuned(RunDir(trained_run), "max_accuracy_drop=1.0", methods=(method,))
    dense = dense_reference(trained_run, verbose=0)
    assert dense.entry["details"]["epochs"] == (ft.entry["details"]["epochs_run"] or 1)
    assert LINE.match(report(trained_run).table().splitlines()[-1])
    x = np.zeros((2, 8, 8, 1), "float32")
    assert keras.models.load_model(dense.artifacts["dense_reference"])(x).shape == (2, 10)


@pytest.mark.parametrize(
    ("default", "given", "expected"),
    [
        ("RECIPE_DEFAULTS", dict(epochs=1), ("magnitude", None, False)),
        ("STRUCTURED_30_PROGRESSIVE", dict(epochs=1), ("structured", "progressive", True)),
        (
            "STRUCTURED_30_PROGRESSIVE",
            dict(compare_dense=False),
            ("structured", "progressive", False),
        ),
        ("STRUCTURED_30_PROGRESSIVE", dict(methods=("magnitude",)), ("magnitude", None, False)),
        (
            "STRUCTURED_30_PROGRESSIVE",
            dict(settings=("structured.mode=gradual",)),
            ("structured", "gradual", True),
        ),
    ],
    ids=["today", "switched", "switched-no-dense", "method-named", "caller-settings-win"],
)
def test_the_default_experiment_is_one_constant(monkeypatch, default, given, expected):
    from keras_lean.pipeline.recipe import Recipe

    run_mod = importlib.import_module("keras_lean.pipeline.steps.run")
    monkeypatch.setattr(run_mod, "DEFAULT_EXPERIMENT", getattr(run_mod, default))
    compare_dense = given.pop("compare_dense", None)
    overrides, dense = run_mod._with_default_experiment(
        None, RecipeOverrides(**given), compare_dense
    )
    rec = overrides.apply(Recipe())
    method, mode, compare = expected
    assert rec.methods == (method,) and dense is compare
    if mode is not None:
        assert rec.method_options["structured"].mode == mode
        assert rec.method_options["structured"].ratio == 0.3
    assert rec.finetune.epochs == given.get("epochs", Recipe().finetune.epochs)
    # A recipe file is the caller's choice too: the default experiment stays out of it.
    assert run_mod._with_default_experiment("r.yaml", RecipeOverrides(), None) == (
        RecipeOverrides(),
        False,
    )


def test_the_stage_heading_says_what_the_dense_reference_does(tmp_path):
    from keras_lean.console import describe_stage

    assert describe_stage("dense_reference", tmp_path) == (
        "fine-tune the baseline with no method, as the fine-tune trained (the comparison)"
    )


# ------------------------------------------------------------------------------------------
# `--set KEY=VALUE` (RecipeOverrides.settings): what makes the experiment one command


@pytest.mark.parametrize(
    ("methods", "setting", "read", "expected"),
    [
        (
            ("structured",),
            "structured.mode=progressive",
            lambda r: r.method_options["structured"].mode,
            "progressive",
        ),
        (
            ("structured",),
            "structured.schedule.frequency=4",
            lambda r: r.method_options["structured"].schedule.frequency,
            4,
        ),
        (("magnitude",), "guard.stages=[0.3, 0.5]", lambda r: r.guard.stages, (0.3, 0.5)),
        (("magnitude",), "max_accuracy_drop=0.5", lambda r: r.max_accuracy_drop, 0.5),
        (("magnitude",), "max_metric_drop.accuracy=0.2", lambda r: r.max_accuracy_drop, 0.2),
    ],
    ids=["method-field", "nested", "section-list", "alias", "canonical"],
)
def test_set_writes_one_recipe_field_by_its_path(methods, setting, read, expected):
    from keras_lean.pipeline.recipe import Recipe

    rec = RecipeOverrides(methods=methods, settings=(setting,)).apply(Recipe())
    assert read(rec) == expected


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("structured", r"must be KEY=VALUE .* Received: 'structured'"),
        ("=1", r"must be KEY=VALUE"),
        ("structured.ratio.x=1", r"--set structured\.ratio\.x=1: structured\.ratio is a value"),
        ("structured.mode=sideways", r"--set: structured\.mode: .*sideways"),
        ("structured.bogus=1", r"--set: .*bogus"),
        ("magnitude.target_sparsity=0.5", r"'magnitude' is not in methods"),
        ("structured.exclude=[a", r"the value is not valid YAML"),
    ],
    ids=["no-equals", "no-key", "into-a-value", "bad-value", "unknown-key", "other-method", "yaml"],
)
def test_a_bad_setting_names_itself(setting, error):
    from keras_lean.pipeline.recipe import Recipe

    with pytest.raises(ValueError, match=error):
        RecipeOverrides(methods=("structured",), settings=(setting,)).apply(Recipe())
