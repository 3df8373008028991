"""`keras_lean.pipeline.sweep` and `keras-lean sweep`, on tiny data and one fine-tune epoch."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys

import pytest
from click.testing import CliRunner

from keras_lean.cli import cli
from keras_lean.pipeline import Recipe, load_recipe
from keras_lean.pipeline import sweep as sweep_mod
from keras_lean.pipeline.sweep import (
    CSV_COLUMNS,
    SweepPoint,
    default_methods,
    mark_sweet_spot,
    plot_sweep,
    point_recipe,
    sweep,
    sweep_points,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def num(cell):
    return None if cell == "" else float(cell)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, _trained_run):
    """A 2-point magnitude sweep from the shared tiny baseline; the first point fails.

    Also records the CSV as it stood after each point (the progress callback runs after the
    rewrite).
    """
    root = tmp_path_factory.mktemp("sweep")
    baseline = root / "base"
    shutil.copytree(_trained_run, baseline)
    real_validate = sweep_mod.validate
    seen = []

    def failing_validate(run, **kw):
        if run.root.name == "magnitude-0.5":
            raise RuntimeError("injected\nfailure")
        return real_validate(run, **kw)

    def progress(point, i, n):
        seen.append((i, n, point.status, read_csv(root / "out" / "sweep.csv")[1]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "validate", failing_validate)
        result = sweep(
            root / "out",
            methods=["magnitude"],
            targets=[0.5, 0.7],
            epochs=1,
            baseline_run=baseline,
            jit_compile="off",
            progress=progress,
        )
    return result, baseline, seen


def test_sweep_csv_matches_each_points_report(swept):
    result, baseline, _ = swept
    header, rows = read_csv(result.csv_path)
    assert tuple(header) == CSV_COLUMNS
    assert [(r["method"], r["target"]) for r in rows] == [
        ("magnitude", "0.5"),
        ("magnitude", "0.7"),
    ]
    base_entry = json.loads((baseline / "report.json").read_text())["stages"][0]
    for row in rows:
        folder = result.out / row["folder"]
        stages = {s["stage"]: s for s in json.loads((folder / "report.json").read_text())["stages"]}
        # Each point is a complete run folder starting from the same baseline.
        assert stages["baseline"] == base_entry
        assert (folder / "baseline.keras").read_bytes() == (
            baseline / "baseline.keras"
        ).read_bytes()
        assert "target_sparsity: " + row["target"] in (folder / "recipe.yaml").read_text()
        ft = stages["finetune"]
        assert num(row["finetune_energy_j"]) == pytest.approx(ft["energy_j"], rel=1e-5)
        assert num(row["finetune_energy_kwh"]) == pytest.approx(ft["energy_kwh"], rel=1e-5)
        assert num(row["finetune_duration_s"]) == pytest.approx(ft["duration_s"], rel=1e-5)
        assert row["energy_method"] == ft["energy_method"]
    failed, ok = rows
    assert failed["status"] == "failed" and failed["sweet_spot"] == "False"
    assert failed["error"] == "validate: RuntimeError: injected failure"
    assert failed["accuracy"] == failed["sparsity"] == failed["tflite_latency_ms"] == ""

    assert ok["status"] == "ok" and ok["error"] == ""
    stages = {
        s["stage"]: s
        for s in json.loads((result.out / ok["folder"] / "report.json").read_text())["stages"]
    }
    v, d = stages["validate"]["details"], stages["deploy"]
    assert num(ok["accuracy"]) == pytest.approx(v["finetuned_accuracy"], rel=1e-5)
    assert num(ok["baseline_accuracy"]) == pytest.approx(v["baseline_accuracy"], rel=1e-5)
    assert num(ok["accuracy_drop"]) == pytest.approx(v["accuracy_drop"], rel=1e-4, abs=1e-6)
    assert ok["passed"] == str(v["passed"])
    assert int(ok["params"]) == d["params"] and int(ok["nonzero_params"]) == d["nonzero_params"]
    assert int(ok["baseline_params"]) == base_entry["params"]
    assert num(ok["sparsity"]) == pytest.approx(1 - d["nonzero_params"] / base_entry["params"])
    assert num(ok["param_fraction"]) == pytest.approx(1.0)
    assert num(ok["pruned_sparsity"]) == pytest.approx(0.7, abs=0.01)
    exp = d["details"]["export"]
    assert num(ok["tflite_latency_ms"]) == pytest.approx(exp["tflite_latency_ms"], rel=1e-5)
    assert num(ok["keras_latency_ms"]) == pytest.approx(exp["keras_latency_ms"], rel=1e-5)
    assert int(ok["latency_batch_size"]) == exp["latency_batch_size"]
    # The only point that can be the sweet spot is the one that worked, if it passed the gate.
    assert ok["sweet_spot"] == ok["passed"]
    assert (result.sweet_spot is not None) == v["passed"]


def test_failed_point_does_not_stop_the_sweep_and_csv_is_rewritten_each_point(swept):
    result, _, seen = swept
    assert [p.status for p in result.points] == ["failed", "ok"]
    assert result.failed == (result.points[0],)
    # After point 1 the CSV already held it; after point 2, both.
    assert [(i, n, status, len(rows)) for i, n, status, rows in seen] == [
        (1, 2, "failed", 1),
        (2, 2, "ok", 2),
    ]
    assert not list(result.out.glob(".sweep.csv.*"))  # no temporary file left behind
    # The failed point's folder is kept for inspection.
    assert (result.out / "magnitude-0.5" / "finetuned.keras").exists()
    assert "validate: RuntimeError" in result.table()


def test_sweep_png_is_a_valid_png(swept):
    result = swept[0]
    assert result.png_path == result.out / "sweep.png" and result.plot_message is None
    assert result.png_path.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    height, width, _ = imread(result.png_path).shape
    assert height > 500 and width > 500


def test_sweep_refuses_a_folder_holding_a_sweep_and_deletes_nothing(swept):
    result, baseline, _ = swept
    before = sorted(p.name for p in result.out.iterdir())
    with pytest.raises(FileExistsError, match="already holds a sweep"):
        sweep(result.out, methods=["magnitude"], targets=[0.9], baseline_run=baseline)
    assert sorted(p.name for p in result.out.iterdir()) == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": ["nope"]}, r"methods: unknown method 'nope'"),
        ({"methods": ["lora"]}, r"methods: 'lora' has no sparsity target"),
        ({"methods": []}, r"methods must name at least one method"),
        ({"targets": [0.5, 1.5]}, r"targets must be numbers in \(0, 1\)\. Received: targets="),
        ({"targets": [0.0]}, r"targets must be numbers in \(0, 1\)"),
        ({"targets": []}, r"targets must hold at least one value"),
        ({"targets": {"movement": [0.5]}, "methods": ["magnitude"]}, r"targets names method"),
        ({"epochs": 0}, r"epochs must be an int >= 1"),
    ],
    ids=[
        "unknown-method",
        "method-without-target",
        "no-methods",
        "target-above-1",
        "target-0",
        "no-targets",
        "targets-for-other-method",
        "epochs-0",
    ],
)
def test_bad_options_fail_before_any_training(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_unavailable_method_gets_the_registry_error_and_leaves_the_defaults(monkeypatch):
    from keras_lean.pipeline.methods import METHODS

    before = default_methods()
    assert "lottery" in before
    monkeypatch.setitem(METHODS, "lottery", "keras_lean.pipeline.methods.not_here:LotteryMethod")
    # Every other default stays (methods added later, e.g. oneshot, follow the built-ins).
    assert default_methods() == [m for m in before if m != "lottery"]
    assert default_methods()[:3] == ["magnitude", "movement", "structured"]
    with pytest.raises(ValueError, match="method 'lottery' is not available in this install"):
        sweep_points(["lottery"])


def test_default_points_and_per_method_targets():
    points = sweep_points()
    methods = list(dict.fromkeys(m for m, _ in points))
    assert methods == default_methods()
    assert methods[:3] == ["magnitude", "movement", "structured"]
    assert [t for m, t in points if m == "structured"] == [0.25, 0.5]
    assert sweep_points(["structured", "magnitude"], {"structured": [0.3, 0.3]}) == [
        ("structured", 0.3),
        ("magnitude", 0.5),
        ("magnitude", 0.7),
        ("magnitude", 0.8),
        ("magnitude", 0.9),
    ]


def _point(method, target, sparsity, passed, status="ok", accuracy=0.9):
    return SweepPoint(
        method,
        target,
        "target_sparsity",
        f"{method}-{target:g}",
        status=status,
        accuracy=accuracy if status == "ok" else None,
        baseline_accuracy=0.92,
        accuracy_drop=0.92 - accuracy if status == "ok" else None,
        max_accuracy_drop=0.02,
        passed=passed if status == "ok" else None,
        sparsity=sparsity if status == "ok" else None,
        finetune_energy_j=10.0 * target if status == "ok" else None,
        tflite_latency_ms=0.2 if status == "ok" else None,
        error=None if status == "ok" else "finetune: ValueError: x",
    )


def test_sweet_spot_is_the_sparsest_point_that_passed_and_plot_draws_it(tmp_path):
    points = mark_sweet_spot(
        [
            _point("magnitude", 0.5, 0.5, True),
            _point("magnitude", 0.8, 0.8, True, accuracy=0.905),
            _point("magnitude", 0.9, 0.9, False, accuracy=0.8),
            _point("structured", 0.5, None, None, status="failed"),
            _point("structured", 0.25, 0.4, True),
        ]
    )
    assert [p.sweet_spot for p in points] == [False, True, False, False, False]
    # A few stray zeros more do not outrank accuracy: near-equal sparsities tie.
    tie = mark_sweet_spot(
        [
            _point("magnitude", 0.8, 0.7988, True, accuracy=0.975),
            _point("lottery", 0.8, 0.7990, True, accuracy=0.97),
        ]
    )
    assert [p.method for p in tie if p.sweet_spot] == ["magnitude"]
    assert not any(p.sweet_spot for p in mark_sweet_spot([_point("magnitude", 0.9, 0.9, False)]))
    path = plot_sweep(points, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_sweep_trains_a_baseline_and_writes_the_csv_without_matplotlib(
    tmp_path, tiny_npz, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "sw"
    r = invoke(
        "sweep",
        "--out",
        out,
        "--data",
        tiny_npz,
        "--baseline-epochs",
        "1",
        "--epochs",
        "1",
        "--methods",
        "structured",
        "--targets",
        "0.25",
    )
    assert r.exit_code == 0, r.output
    assert (out / "baseline" / "baseline.keras").exists()
    # jit_compile: auto is decided once, before the points, so no point's energy pays for it.
    assert "jit_compile auto, decided once on the baseline" in r.output
    point_recipe = load_recipe(out / "structured-0.25" / "recipe.yaml")
    assert point_recipe.finetune.jit_compile in ("on", "off")
    assert point_recipe.method_options["structured"].ratio == 0.25
    header, rows = read_csv(out / "sweep.csv")
    assert tuple(header) == CSV_COLUMNS and len(rows) == 1
    row = rows[0]
    assert (row["method"], row["target_option"], row["status"]) == ("structured", "ratio", "ok")
    # Channels were physically removed: fewer parameters, and the sparsity axis counts them.
    fraction = num(row["param_fraction"])
    assert fraction < 0.9
    assert num(row["sparsity"]) == pytest.approx(
        1 - int(row["nonzero_params"]) / int(row["baseline_params"])
    )
    assert row["pruned_sparsity"] == ""
    assert math.isfinite(num(row["tflite_latency_ms"]))
    assert not (out / "sweep.png").exists()
    assert 'pip install "keras_lean[plot]"' in r.output
    assert "[1/1] structured 0.25: accuracy" in r.output
    assert "structured  0.25" in r.output  # the table


@pytest.mark.parametrize(
    "args, option, match",
    [
        (["--methods", "nope"], "'--methods'", "unknown method 'nope'"),
        (["--methods", "magnitude", "--targets", "0.5,1"], "'--targets'", r"in (0, 1)"),
        (["--targets", "0.5,abc"], "'--targets'", "expected numbers"),
    ],
    ids=["unknown-method", "target-1", "target-not-a-number"],
)
def test_cli_bad_options_exit_2_naming_the_option(tmp_path, args, option, match):
    r = invoke("sweep", "--out", tmp_path / "sw", *args)
    assert r.exit_code == 2, r.output
    assert option in r.output and match in r.output
    assert not (tmp_path / "sw").exists()


def test_lottery_target_is_its_final_sparsity():
    from keras_lean.pipeline.methods import get_method_class

    try:
        get_method_class("lottery")
    except ImportError:
        pytest.skip("the lottery method is not in this install")
    assert "lottery" in default_methods()
    rec = point_recipe(Recipe(), "lottery", 0.8)
    assert rec.methods == ("lottery",)
    assert rec.method_options["lottery"].final_sparsity == pytest.approx(0.8)
