"""Causal LMs under the guard and early stopping: judged by perplexity, as `validate` gates them.

The decoder is a tiny keras-hub `GPT2Backbone` (1 layer, hidden 8) built from a config; its
corpus is the first lines of the Python standard library's own `textwrap.py`.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from keras_lean.pipeline.guard import StageGate, run_stages
from keras_lean.pipeline.methods.magnitude import MagnitudeMethod, PruningOptions
from keras_lean.pipeline.recipe import GuardOptions, Recipe
from keras_lean.pipeline.text import (
    CAUSAL_LM,
    build_causal_lm,
    gate_metric,
    lm_perplexity,
    load_causal_lm_data,
    prepare_causal_lm_data,
)

keras_hub = pytest.importorskip("keras_hub")

LENGTH = 16


def _tiny_backbone(vocabulary_size, sequence_length):
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=sequence_length,
    )


@pytest.fixture
def lm(tmp_path, monkeypatch):
    """(data, model, fit): the stdlib corpus in next-token windows and a tiny decoder."""
    from keras_lean.pipeline import text as text_module

    lines = Path(textwrap.__file__).read_text(encoding="utf-8").splitlines()
    corpus = tmp_path / "texts.jsonl"
    rows = [json.dumps({"text": t}) for t in lines if t.strip()][:40]
    corpus.write_text("\n".join(rows) + "\n")
    prepare_causal_lm_data(corpus, None, tmp_path / "lm.npz", sequence_length=LENGTH)
    data = load_causal_lm_data(tmp_path / "lm.npz")
    monkeypatch.setattr(text_module, "tiny_decoder", _tiny_backbone)
    keras.utils.set_random_seed(0)
    model = build_causal_lm(None, LENGTH, 259)

    def fit(m, epochs=None, callbacks=()):
        m.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,  # XLA's compile time would dominate these few steps
        )
        return m.fit(
            data.x_train,
            data.y_train,
            batch_size=16,
            epochs=epochs,
            callbacks=list(callbacks),
            verbose=0,
        )

    return data, model, fit


@pytest.mark.parametrize(
    ("metric", "baseline", "value", "change"),
    [("accuracy", 0.9, 0.85, 0.05), ("perplexity", 20.0, 23.0, 0.15)],
    ids=["accuracy-drop", "perplexity-rise"],
)
def test_stage_gate_measures_the_change_the_validate_gate_uses(metric, baseline, value, change):
    gate = StageGate(metric, lambda m: value, baseline, 0.1)
    assert gate.change(value) == pytest.approx(change)
    assert gate.budget_name == (
        "max_accuracy_drop" if metric == "accuracy" else "max_perplexity_rise"
    )


@pytest.mark.parametrize(
    ("metric", "baseline", "at_budget", "over"),
    [("accuracy", 0.9, 0.8, 0.7999), ("perplexity", 20.0, 22.0, 22.001)],
    ids=["accuracy", "perplexity"],
)
def test_stage_gate_within_passes_a_change_equal_to_the_budget(metric, baseline, at_budget, over):
    # The one verdict of guard stages, the validate step and sweep points: a change equal to the
    # budget (0.9 - 0.8 is 0.09999999999999998 or 0.1 depending on rounding) passes, above fails.
    gate = StageGate(metric, None, baseline, 0.1)
    assert gate.within(at_budget)
    assert not gate.within(over)
    better = 0.95 if metric == "accuracy" else 19.0
    assert gate.within(better)


@pytest.mark.parametrize(
    ("metric", "baseline", "match"),
    [
        ("loss", 1.0, r"metric must be 'accuracy' or 'perplexity'\. Received: metric='loss'"),
        ("perplexity", 0.0, r"positive baseline perplexity\. Received: baseline=0\.0"),
    ],
    ids=["unknown-metric", "zero-perplexity"],
)
def test_stage_gate_errors(metric, baseline, match):
    with pytest.raises(ValueError, match=match):
        StageGate(metric, lambda m: 1.0, baseline, 0.1)


def _steps(data) -> int:
    return int(np.ceil(len(data.x_train) / 16))


@pytest.mark.parametrize(
    ("perplexity", "accuracy", "kept", "reason"),
    [
        (10.5, 0.0, 1, r"all 1 stages within max_perplexity_rise 0\.1; kept the last"),
        (
            12.0,
            0.9,
            None,
            r"no stage within budget: stage 1 \(sparsity 0\.3\) raised perplexity by 0\.2000 > "
            r"max_perplexity_rise 0\.1; rolled back to the baseline weights",
        ),
    ],
    ids=["rise-within-accuracy-over", "rise-over-accuracy-within"],
)
def test_run_stages_keeps_what_the_perplexity_gate_allows(lm, perplexity, accuracy, kept, reason):
    """The perplexity gate (rise <= 10 % of 10.0) decides, whatever the token accuracy's drop
    against its own budget (0.01) says."""
    data, model, fit = lm
    seen = []

    def measure(m):
        seen.append(m)
        return perplexity

    out = run_stages(
        model,
        MagnitudeMethod(PruningOptions()),
        data,
        guard=GuardOptions(stages=(0.3,), epochs_per_stage=1),
        steps_per_epoch=_steps(data),
        batch_size=16,
        fit=fit,
        evaluate=lambda m: accuracy,
        baseline_accuracy=0.9,
        max_accuracy_drop=0.01,
        gate=StageGate("perplexity", measure, 10.0, 0.1),
    )
    (row,) = out.stages
    assert row["val_perplexity"] == perplexity
    assert row["perplexity_rise"] == pytest.approx(perplexity / 10.0 - 1)
    assert row["within_budget"] is (kept == 1)
    assert row["accuracy_drop"] == pytest.approx(0.9 - accuracy)  # recorded, not deciding
    assert out.kept_stage == kept
    assert out.model is (seen[0] if kept else model)
    assert re.search(reason, out.reason), out.reason
    d = out.to_dict()
    assert (d["metric"], d["baseline_perplexity"], d["max_perplexity_rise"]) == (
        "perplexity",
        10.0,
        0.1,
    )


@pytest.mark.slow
def test_run_stages_judges_a_trained_causal_lm_by_its_real_perplexity(lm):
    """Accuracy would pass every stage (budget 1.0); the perplexity measured on the pruned
    decoder stops the run at the stage whose relative rise is over 10 %."""
    data, model, fit = lm
    fit(model, epochs=3)  # a baseline that has learnt something: pruning it costs perplexity
    base = lm_perplexity(model, data)
    measured = []

    def perplexity(m):
        measured.append(lm_perplexity(m, data))
        return measured[-1]

    out = run_stages(
        model,
        MagnitudeMethod(PruningOptions()),
        data,
        guard=GuardOptions(stages=(0.2, 0.98), epochs_per_stage=1),
        steps_per_epoch=_steps(data),
        batch_size=16,
        fit=fit,
        evaluate=lambda m: 0.0,
        baseline_accuracy=0.0,
        max_accuracy_drop=1.0,
        gate=StageGate("perplexity", perplexity, base, 0.1),
    )
    rows = out.stages
    assert len(rows) == len(measured) == 2
    for row, ppl in zip(rows, measured, strict=True):
        assert row["perplexity_rise"] == pytest.approx((ppl - base) / base)
        assert row["within_budget"] is (row["perplexity_rise"] <= 0.1)
    assert rows[0]["within_budget"] and not rows[1]["within_budget"]
    assert out.kept_stage == 1


@pytest.mark.parametrize(
    ("task", "metric"), [(CAUSAL_LM, "perplexity"), ("classifier", "accuracy")], ids=["lm", "cls"]
)
def test_finetune_builds_the_stage_gate_from_the_baseline(lm, task, metric):
    from keras_lean.pipeline.steps.common import classification_loss, evaluate
    from keras_lean.pipeline.steps.finetune import _stage_gate

    data, model, _ = lm
    recipe = Recipe.from_dict(
        {"version": 1, "max_metric_drop": {"accuracy": 0.02, "perplexity": 0.25}}
    )
    ctx = SimpleNamespace(
        recipe=recipe,
        data=data,
        loss=classification_loss(True),
        gate_metric=gate_metric({"text": {"task": task}}),
    )
    gate = _stage_gate(ctx, model, 0.5)
    assert gate.metric == metric
    if metric == "perplexity":
        assert gate.baseline == pytest.approx(lm_perplexity(model, data))
        assert gate.evaluate(model) == pytest.approx(gate.baseline)
        assert gate.budget == 0.25
    else:
        assert (gate.baseline, gate.budget) == (0.5, 0.02)
        assert gate.evaluate(model) == evaluate(model, data)


@pytest.mark.parametrize(
    ("task", "monitor", "mode"),
    [
        (CAUSAL_LM, "val_loss", "min"),
        ("classifier", "val_accuracy", "max"),
        (None, "val_accuracy", "max"),
    ],
    ids=["causal-lm", "text-classifier", "not-text"],
)
def test_early_stopping_watches_the_gate_metric(task, monitor, mode):
    from keras_lean.pipeline.methods.base import FinetunePlan
    from keras_lean.pipeline.steps.finetune import _early_stopping

    manifest = {"text": {"task": task}} if task else {}
    recipe = Recipe.from_dict({"version": 1, "finetune": {"early_stopping": {"enabled": True}}})
    ctx = SimpleNamespace(
        recipe=recipe,
        methods=[],
        plan=FinetunePlan(epochs=2, steps_per_epoch=1, batch_size=1),
        gate_metric=gate_metric(manifest),
    )
    early = _early_stopping(ctx)
    assert (early.monitor, early.mode) == (monitor, mode)


def test_baseline_heading_names_the_text_model(tmp_path):
    """`[1/5] baseline: train causal LM (tiny GPT-2) on texts.jsonl`, not `train cnn`."""
    from keras_lean.console import describe_stage

    corpus = tmp_path / "texts.jsonl"
    corpus.write_text(json.dumps({"text": "def f(): pass"}) + "\n")
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("text,label\ngood,1\nbad,0\n")
    preset = tmp_path / "all-MiniLM-L6-v2"
    preset.mkdir()
    (preset / "config.json").write_text("{}")
    cases = [
        (
            dict(data=str(corpus), epochs=2),
            f"train causal LM (tiny GPT-2) on {corpus} for 2 epochs",
        ),
        (
            dict(data=str(corpus), model_path=str(preset), epochs=1),
            f"train causal LM (all-MiniLM-L6-v2) on {corpus} for 1 epoch",
        ),
        (
            dict(data=str(labelled), model_path=str(preset), epochs=3),
            f"train text classifier (all-MiniLM-L6-v2) on {labelled} for 3 epochs",
        ),
        (dict(data="d.npz", arch="mlp"), "train mlp on d.npz"),
        (dict(model_path="m.keras"), "adopt m.keras and evaluate it on digits"),
    ]
    for context, expected in cases:
        assert describe_stage("baseline", tmp_path, **{"arch": "cnn", **context}) == expected


def test_report_shows_a_perplexity_guard_in_perplexity():
    from keras_lean.pipeline.steps.report import _guard_lines

    row = dict(stage=1, target_sparsity=0.3, sparsity=0.3, val_accuracy=0.2, accuracy_drop=0.1)
    guard = {
        "metric": "perplexity",
        "baseline_accuracy": 0.3,
        "max_accuracy_drop": 0.01,
        "baseline_perplexity": 10.0,
        "max_perplexity_rise": 0.1,
        "stages": [{**row, "val_perplexity": 10.5, "perplexity_rise": 0.05, "kept": True}],
        "reason": "all 1 stages within max_perplexity_rise 0.1; kept the last (sparsity 0.3)",
    }
    text = "\n".join(_guard_lines(guard))
    assert "guard stages (baseline perplexity 10.000, max_perplexity_rise 0.1):" in text
    assert "val ppl" in text and "10.500" in text and "+5.00%" in text
    assert "val acc" not in text


def test_report_summary_names_the_perplexity_gate():
    from keras_lean.pipeline.steps.report import RunReport
    from keras_lean.pipeline.steps.stage import StageEntry

    details = {
        "metric": "perplexity",
        "baseline_accuracy": 0.13,
        "finetuned_accuracy": 0.12,
        "accuracy_drop": 0.01,
        "max_accuracy_drop": 0.01,
        "baseline_perplexity": 20.0,
        "finetuned_perplexity": 21.0,
        "perplexity_rise": 0.05,
        "max_perplexity_rise": 0.1,
        "passed": True,
    }
    entry = StageEntry("validate", None, 1.0, 2.0, 2.0 / 3.6e6, "estimated", 0.0, details=details)
    lines = RunReport("run", (entry,))._summary_lines()
    assert lines[0] == (
        "validation: perplexity baseline 20.000 -> fine-tuned 21.000 (rise +5.00%, max 10.00%): "
        "PASS"
    )
