"""Report rendering from typed entries: the text-table helper, the stage table, method lines."""

from __future__ import annotations

import pytest

from keras_lean.pipeline.rundir import RunDir
from keras_lean.pipeline.steps.report import (
    RunReport,
    fmt,
    report,
    text_table,
    tflite_size_phrase,
)
from keras_lean.pipeline.steps.stage import StageEntry


def _entry(stage, **kw):
    base = dict(
        stage=stage,
        started_at=None,
        duration_s=2.0,
        energy_j=10.0,
        energy_kwh=10.0 / 3.6e6,
        energy_method="estimated:cpu-tdp",
        emissions_kg=1e-6,
    )
    return StageEntry(**{**base, **kw})


@pytest.mark.parametrize(
    "value, spec, expected",
    [(None, "{:.1f}", "-"), (0.0, "{:.1f}", "0.0"), (0.25, "{:.0%}", "25%")],
    ids=["missing", "zero-is-not-missing", "percent"],
)
def test_fmt(value, spec, expected):
    assert fmt(value, spec) == expected


def test_text_table_pads_aligns_and_rules():
    lines = text_table(("name", "n"), [("a", "1"), ("long", "100")], left=(0,), rule=True)
    assert lines == ["name    n", "----  ---", "a       1", "long  100"]
    indented = text_table(("x",), [("1",)], indent="  ")
    assert indented == ["  x", "  1"]


def test_table_has_one_row_per_stage_and_the_totals():
    rep = RunReport(
        "r",
        (
            _entry("baseline", accuracy=0.9, params=1000, nonzero_params=1000, gzip_bytes=2048),
            _entry("finetune", energy_method="measured:rapl", flops=1e6),
        ),
    )
    lines = rep.table().splitlines()
    assert lines[0].split()[:3] == ["stage", "time", "s"]
    base, ft = lines[2], lines[3]
    assert base.split()[0] == "baseline" and "estimated:cpu-tdp" in base and "1,000" in base
    assert "0.9000" in base and "2.0" in base  # accuracy, gzip KB
    assert ft.split()[0] == "finetune" and "measured:rapl" in ft
    assert ft.split()[-4:] == ["-"] * 4  # no accuracy, params, nonzero, gzip
    assert "total: 4.0 s, 20.0 J, 0.002 g CO2e" in rep.table()


@pytest.mark.parametrize(
    "ratio, quantization, expected",
    [
        (0.5, "none", "TFLite 2.00x smaller (gzip) than the baseline's float TFLite"),
        (0.11, "int8", "TFLite 9.09x smaller (gzip) than the baseline's int8 TFLite"),
        (0.25, "dynamic", "TFLite 4.00x smaller (gzip) than the baseline's dynamic-range TFLite"),
        (1.25, "float16", "TFLite 1.25x larger (gzip) than the baseline's float16 TFLite"),
        (None, "int8", None),
    ],
    ids=["float", "int8", "dynamic", "larger", "no-ratio"],
)
def test_tflite_size_phrase_says_what_it_compares(ratio, quantization, expected):
    assert tflite_size_phrase(ratio, quantization) == expected


def test_summary_line_names_the_baseline_export_it_compares_with():
    deploy = _entry(
        "deploy",
        params=100,
        nonzero_params=20,
        details={"tflite_gzip_ratio": 0.125, "export": {"quantization": "int8"}},
    )
    table = RunReport("r", (deploy,)).table()
    assert (
        "deployed: 80.0% of all parameters are zero; TFLite 8.00x smaller (gzip) than the "
        "baseline's int8 TFLite" in table
    )


def test_method_lines_come_from_the_method_class():
    structure = {
        "layers": [
            {"name": "conv1", "width_before": 32, "width_after": 16},
            {"name": "dense1", "width_before": 128, "width_after": 128},
        ]
    }
    rep = RunReport(
        "r",
        (
            _entry("finetune", details={"methods": {"structured": {"options": {}}}}),
            _entry("deploy", details={"methods": {"structured": {"structure": structure}}}),
        ),
    )
    # The deploy record completes the finetune record of the same method.
    assert rep.method_reports()["structured"] == {"options": {}, "structure": structure}
    assert "structured widths: conv1 32->16" in rep.table()
    assert "dense1" not in rep.table().split("structured widths:", 1)[1]


def test_an_unknown_method_in_an_old_report_prints_no_lines():
    rep = RunReport("r", (_entry("finetune", details={"methods": {"gone": {"x": 1}}}),))
    assert "gone" not in rep.table()


def test_report_reads_the_run_folder(tmp_path):
    run = RunDir(tmp_path)
    run.record_stage(_entry("baseline", accuracy=0.5).to_dict())
    rep = report(tmp_path)
    assert rep.entries == (_entry("baseline", accuracy=0.5),)
    assert rep.stages == (_entry("baseline", accuracy=0.5).to_dict(),)
    assert rep.to_dict()["stages"][0]["stage"] == "baseline"
