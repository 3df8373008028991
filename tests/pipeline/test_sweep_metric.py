"""The sweep judges each point by the metric its validate step gated on: accuracy drop for a
classifier, relative perplexity rise for a causal LM (`judge_point`, `validation_fields`)."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest

from keras_lean.pipeline import Recipe
from keras_lean.pipeline import sweep as sweep_mod
from keras_lean.pipeline.rundir import RunDir
from keras_lean.pipeline.steps.stage import StageEntry
from keras_lean.pipeline.sweep import (
    SweepPoint,
    SweepResult,
    judge_point,
    mark_sweet_spot,
    plot_sweep,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _entry(stage, details=None, **kw):
    return StageEntry(stage, None, 1.0, 2.0, 2.0 / 3.6e6, "estimated:cpu-tdp", 0.0, **kw)


def _lm_validation(base_ppl, ppl, base_acc=0.5, acc=0.2):
    """What validate records for a causal LM (token accuracy reported, perplexity gating)."""
    return {
        "baseline_accuracy": base_acc,
        "finetuned_accuracy": acc,
        "accuracy_drop": base_acc - acc,
        "metric": "perplexity",
        "baseline_perplexity": base_ppl,
        "finetuned_perplexity": ppl,
        "perplexity_rise": (ppl - base_ppl) / base_ppl,
    }


def _recorded_point(tmp_path, name, details, recipe):
    """A point read back from a run folder holding recorded stage entries."""
    run = RunDir(tmp_path / name)
    run.root.mkdir()
    run.record_stage(_entry("baseline", params=100).to_dict())
    run.record_stage(_entry("finetune").to_dict())
    entry = _entry("validate", accuracy=details["finetuned_accuracy"])
    run.record_stage({**entry.to_dict(), "details": details})
    run.record_stage(_entry("deploy", params=100, nonzero_params=60).to_dict())
    return sweep_mod._point_from_run(run, "structured", 0.5, recipe, None)


@pytest.mark.parametrize(
    ("ppl", "max_rise", "passed"),
    [(21.0, 0.1, True), (21.0, 0.04, False), (20.0, 0.0, True), (30.0, 0.4, False)],
    ids=["rise-5%-of-10%", "rise-5%-of-4%", "no-rise-zero-budget", "rise-50%-of-40%"],
)
def test_a_causal_lm_point_is_judged_by_its_perplexity_rise(tmp_path, ppl, max_rise, passed):
    """Token accuracy fell by 0.3 (over the 0.02 accuracy budget) in every case: only the
    perplexity rise decides, as in validate."""
    recipe = Recipe(methods=("structured",), max_accuracy_drop=0.02, max_perplexity_rise=max_rise)
    point = _recorded_point(tmp_path, "lm", _lm_validation(20.0, ppl), recipe)
    assert point.metric == "perplexity" and point.perplexity == ppl
    assert point.baseline_perplexity == 20.0 and point.max_perplexity_rise == max_rise
    assert point.change == pytest.approx((ppl - 20.0) / 20.0) and point.budget == max_rise
    assert point.passed is passed and judge_point(point) is passed
    assert point.accuracy_drop == pytest.approx(0.3)  # still reported


@pytest.mark.parametrize(
    ("acc", "passed"), [(0.91, True), (0.85, False)], ids=["drop-0.01", "drop-0.07"]
)
def test_a_classifier_point_is_still_judged_by_its_accuracy_drop(tmp_path, acc, passed):
    details = {"baseline_accuracy": 0.92, "finetuned_accuracy": acc, "accuracy_drop": 0.92 - acc}
    details["metric"] = "accuracy"
    recipe = Recipe(methods=("structured",), max_accuracy_drop=0.02, max_perplexity_rise=10.0)
    point = _recorded_point(tmp_path, "cls", details, recipe)
    assert point.metric == "accuracy" and point.perplexity is None
    assert point.value == acc and point.budget == 0.02
    assert point.passed is passed


def test_an_older_validation_without_metric_counts_as_accuracy(tmp_path):
    details = {"baseline_accuracy": 0.9, "finetuned_accuracy": 0.89, "accuracy_drop": 0.01}
    point = _recorded_point(tmp_path, "old", details, Recipe(methods=("structured",)))
    assert point.metric == "accuracy" and point.passed is True


def _lm_point(method, target, sparsity, ppl, acc, energy=1.0):
    point = SweepPoint(
        method,
        target,
        "ratio",
        f"{method}-{target:g}",
        status="ok",
        sparsity=sparsity,
        max_accuracy_drop=0.01,
        max_perplexity_rise=0.2,
        finetune_energy_j=energy,
        tflite_latency_ms=0.1,
        **sweep_mod.validation_fields(_lm_validation(10.0, ppl, acc=acc)),
    )
    return SweepPoint(**{**point.to_dict(), "passed": judge_point(point)})


def test_lm_sweet_spot_table_and_plot_follow_perplexity(tmp_path):
    points = mark_sweet_spot(
        [
            _lm_point("structured", 0.25, 0.2, ppl=10.5, acc=0.30),
            # same sparsity: the lower perplexity wins, not the higher token accuracy
            _lm_point("oneshot", 0.5, 0.4, ppl=11.0, acc=0.10),
            _lm_point("structured", 0.5, 0.4, ppl=11.5, acc=0.45),
            _lm_point("structured", 0.75, 0.6, ppl=15.0, acc=0.50),  # rise 50 % > 20 %
        ]
    )
    assert [p.passed for p in points] == [True, True, True, False]
    assert [(p.method, p.target) for p in points if p.sweet_spot] == [("oneshot", 0.5)]
    result = SweepResult(tmp_path, tmp_path, tuple(points), tmp_path / "s.csv", None)
    lines = result.table().splitlines()
    assert lines[0].split()[2:4] == ["perplexity", "rise"]
    assert "11.000" in lines[3] and "+10.00%" in lines[3] and lines[3].endswith("* sweet spot")
    assert lines[5].endswith("over max rise")
    pytest.importorskip("matplotlib")
    assert plot_sweep(points, tmp_path / "lm.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_a_causal_lm_sweep_reports_perplexity_end_to_end(tmp_path):
    """A tiny decoder trained one epoch on the standard library's textwrap.py, swept once."""
    pytest.importorskip("keras_hub")
    from keras_lean.pipeline import train_baseline
    from keras_lean.pipeline.sweep import sweep

    lines = Path(textwrap.__file__).read_text(encoding="utf-8").splitlines()
    rows = [json.dumps({"text": t}) for t in lines if t.strip()][:60]
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("\n".join(rows) + "\n")
    base = RunDir(tmp_path / "base")
    train_baseline(base, data=corpus, sequence_length=16, epochs=1, verbose=0)
    result = sweep(
        tmp_path / "out",
        methods=["structured"],
        targets=[0.25],
        epochs=1,
        baseline_run=base.root,
        jit_compile="off",
        plot=False,
    )
    (point,) = result.points
    assert point.ok, point.error
    validation = json.loads((result.out / point.folder / "validation.json").read_text())
    assert point.metric == validation["metric"] == "perplexity"
    assert point.perplexity == pytest.approx(validation["finetuned_perplexity"])
    assert point.perplexity_rise == pytest.approx(validation["perplexity_rise"])
    assert point.passed == validation["passed"]
    with open(result.csv_path, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["metric"] == "perplexity" and float(row["perplexity"]) == pytest.approx(
        point.perplexity, rel=1e-5
    )
    assert "perplexity" in result.table().splitlines()[0]
