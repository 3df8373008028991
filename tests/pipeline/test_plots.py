"""The run plot (`keras-lean report RUN --plot`) and the plotting helpers the sweep shares."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("matplotlib")

from keras_lean.pipeline.plots import (  # noqa: E402
    layer_sparsity,
    layer_widths,
    new_figure,
    plot_run,
    save_png,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class _Report:
    run: str
    stages: tuple


def _stage(stage, energy_j, accuracy=None, details=None):
    return {
        "stage": stage,
        "duration_s": 1.0,
        "energy_j": energy_j,
        "energy_method": "estimated:cpu-tdp",
        "accuracy": accuracy,
        "details": details or {},
    }


_MAGNITUDE = {"magnitude": {"final": {"sparsity": 0.8, "layers": {"conv1": 0.79, "dense1": 0.8}}}}
_STRUCTURED = {
    "structured": {
        "structure": {
            "layers": [
                {"name": "conv1", "width_before": 32, "width_after": 16},
                {"name": "dense1", "width_before": 128, "width_after": 64},
                {"name": "output", "width_before": 10, "width_after": None},
            ]
        }
    }
}


def _report(methods):
    return _Report(
        "demo",
        (
            _stage("baseline", 20.0, 0.97),
            _stage("configure", 0.5),
            _stage("finetune", 70.0, 0.96, {"methods": methods}),
            _stage(
                "validate",
                3.0,
                0.96,
                {
                    "baseline_accuracy": 0.97,
                    "finetuned_accuracy": 0.96,
                    "accuracy_drop": 0.01,
                    "max_accuracy_drop": 0.01,
                    "passed": True,
                },
            ),
            _stage("deploy", 10.0, 0.96, {"methods": methods}),
        ),
    )


def _axes_titles(png_path):
    from matplotlib.image import imread

    return imread(png_path).shape


@pytest.mark.parametrize(
    ("methods", "panels"),
    [({}, 2), (_MAGNITUDE, 3), (_STRUCTURED, 3), ({**_MAGNITUDE, **_STRUCTURED}, 4)],
    ids=["no-method-report", "sparsity", "widths", "both"],
)
def test_plot_run_draws_one_panel_per_figure_it_has(tmp_path, methods, panels, monkeypatch):
    import matplotlib.figure

    drawn = []
    real = matplotlib.figure.Figure.subplots

    def spy(self, nrows=1, ncols=1, **kw):
        drawn.append(nrows)
        return real(self, nrows, ncols, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "subplots", spy)
    path = plot_run(_report(methods), tmp_path / "run.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert drawn == [panels]
    height, width, _ = _axes_titles(path)
    assert height > width * 0.6 * panels / 2  # taller with every panel


def test_per_layer_figures_come_from_the_method_reports():
    rep = _report({**_MAGNITUDE, **_STRUCTURED})
    assert layer_sparsity(rep) == {"magnitude": {"conv1": 0.79, "dense1": 0.8}}
    # A layer without a measured width after (not shrunk) is left out.
    assert layer_widths(rep) == {"conv1": (32, 16), "dense1": (128, 64)}
    assert layer_sparsity(_report({})) == {} and layer_widths(_report({})) == {}


def test_plot_run_of_a_report_without_stages_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="report of run 'empty' has no stages"):
        plot_run(_Report("empty", ()), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_save_png_writes_atomically_into_a_new_folder(tmp_path):
    fig = new_figure((2, 2))
    fig.subplots(1, 1).plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "sub" / "f.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]  # no temporary file left


def test_the_sweep_uses_the_shared_plot_code():
    from keras_lean.pipeline import plots, sweep

    assert sweep.plot_sweep is plots.plot_sweep


def test_keras_lean_report_plot_writes_the_png(tmp_path):
    import json

    from click.testing import CliRunner

    from keras_lean.cli import cli

    run = tmp_path / "run"
    run.mkdir()
    stages = []
    for s in _report(_MAGNITUDE).stages:
        stages.append(
            {
                **s,
                "started_at": None,
                "energy_kwh": s["energy_j"] / 3.6e6,
                "emissions_kg": 0.0,
            }
        )
    (run / "report.json").write_text(json.dumps({"version": 1, "run": "run", "stages": stages}))
    png = tmp_path / "plot.png"
    r = CliRunner().invoke(cli, ["report", str(run), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == PNG_MAGIC and f"-> {png}" in r.output
    assert "finetune" in r.output  # the table is still printed
