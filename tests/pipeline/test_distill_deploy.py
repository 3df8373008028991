"""The recipe's `distill` section and the deploy figures of issue 16, through the pipeline."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.distill import DistillConfig, Teacher
from keras_lean.export import make_interpreter
from keras_lean.flops import count_flops
from keras_lean.pipeline import (
    RunDir,
    configure,
    deploy,
    finetune,
    load_model,
    load_recipe,
    report,
)
from keras_lean.pipeline.recipe import Recipe, RecipeError
from keras_lean.pipeline.steps import checkpoint as checkpoint_mod


def _recipe(tmp_path, body: str):
    path = tmp_path / "in.yaml"
    path.write_text("version: 1\n" + body)
    return path


def test_magnitude_distilled_then_sparse_int8_and_keras_int8(trained_run, tmp_path):
    run = RunDir(trained_run)
    recipe = _recipe(
        tmp_path,
        "methods: [magnitude]\n"
        "magnitude: {target_sparsity: 0.8}\n"
        "finetune: {epochs: 2, jit_compile: off}\n"
        "distill: {teacher: baseline, alpha: 0.6, temperature: 3}\n"
        "export: {formats: [tflite], quantization: int8, latency_runs: 2,"
        " strip_tflite_names: true}\n",
    )
    configure(run, recipe=recipe, force=True)
    assert load_recipe(run.recipe).distill == load_recipe(run.recipe).distill.__class__(
        teacher="baseline", alpha=0.6, temperature=3.0
    )
    ft = finetune(run, verbose=0).entry
    d = ft["details"]["distill"]
    assert d["teacher"] == "baseline" and d["alpha"] == 0.6 and d["temperature"] == 3.0
    baseline = load_model(run.baseline)
    teacher_fwd = int(count_flops(baseline).total)
    assert d["teacher_forward_flops"] == teacher_fwd and d["from_logits"] is False
    # FLOPs: 3x the student's forward per sample (training) plus the teacher's forward.
    samples = 400 * 2
    student_fwd = (ft["flops"] - teacher_fwd * samples) / (3 * samples)
    assert 0 < student_fwd <= teacher_fwd
    assert ft["energy_j"] > 0

    dep = deploy(run, keras_quantization="int8").entry["details"]  # the override sets it
    exp = dep["export"]
    assert exp["sparse_tflite"] is True  # auto: 80 % of the weights are zero
    assert exp["tflite_raw_bytes"] < 0.8 * exp["dense_tflite_raw_bytes"]
    assert exp["sparse_vs_dense_max_abs_diff"] == 0.0
    assert dep["equivalence_passed"] and len(exp["equivalence"]) == 2
    assert "DENSIFY" in exp["sparse_latency_note"]
    assert (run.export_dir / "model_dense.tflite").exists()
    # strip_tflite_names: every .tflite written (model, dense twin, baselines) has no tensor names.
    assert exp["tflite_names_stripped"] is True
    for name in ("model", "model_dense", "baseline", "baseline_float"):
        details = make_interpreter(run.export_dir / f"{name}.tflite").get_tensor_details()
        assert details and all(not t["name"] for t in details), name
    kq = dep["keras_quantization"]
    assert kq["mode"] == "int8" and "dense1" in kq["quantized_layers"]
    assert kq["raw_bytes"] < kq["float_raw_bytes"] and kq["path"].startswith(str(run.export_dir))
    assert (run.export_dir / "model_int8.keras").exists()
    assert abs(kq["accuracy"] - kq["float_accuracy"]) <= 0.03
    # Ratios against the float baseline's .tflite (what the targets compare to).
    float_raw = dep["float_baseline_tflite"]["raw_bytes"]
    assert (run.export_dir / "baseline_float.tflite").stat().st_size == float_raw
    assert dep["tflite_raw_ratio_vs_float_baseline"] == pytest.approx(
        exp["tflite_raw_bytes"] / float_raw
    )
    assert dep["tflite_raw_ratio_vs_float_baseline"] < 0.25
    assert dep["tflite_raw_ratio"] < 1
    assert dep["float_baseline_tflite"]["latency_ms"] > 0
    # `keras-lean report` prints the deploy figures, with the sparse format's honest note.
    text = report(run).table()
    smaller = float_raw / exp["tflite_raw_bytes"]
    assert f"{smaller:.2f}x smaller raw" in text
    assert "no speed from sparse storage here: storage only" in text
    assert "Keras int8 .keras:" in text and "TFLite int8" in text


def test_structured_without_zeros_stays_dense(trained_run, tmp_path):
    run = RunDir(trained_run)
    recipe = _recipe(
        tmp_path,
        "methods: [structured]\n"
        "structured: {ratio: 0.5}\n"
        "finetune: {epochs: 1, jit_compile: off}\n"
        "distill: {teacher: baseline}\n"
        "export: {formats: [tflite], latency_runs: 2, compare_baseline: false}\n",
    )
    configure(run, recipe=recipe, force=True)
    assert finetune(run, verbose=0).entry["details"]["distill"]["alpha"] == 0.5
    dep = deploy(run).entry["details"]
    assert (
        dep["export"]["sparse_tflite"] is False and dep["export"]["dense_tflite_raw_bytes"] is None
    )
    assert dep["equivalence_passed"] and dep["export"]["max_abs_diff"] <= 1e-5
    assert "keras_quantization" not in dep and "float_baseline_tflite" not in dep


def test_checkpoint_of_a_distilled_fit_is_the_student(tmp_path, digits):
    x_train, y_train, _, _ = digits
    student = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    teacher = keras.models.clone_model(student)
    distiller = Teacher(teacher, DistillConfig(), from_logits=False).compile(student)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    cb = checkpoint_mod.epoch_checkpoint(run, {"recipe": "x"})
    distiller.fit(x_train[:64], y_train[:64], epochs=1, verbose=0, callbacks=[cb])
    saved = keras.saving.load_model(run.checkpoint, compile=True)
    assert [w.shape for w in saved.weights] == [w.shape for w in student.weights]
    assert int(saved.optimizer.iterations) == 2
    np.testing.assert_allclose(
        saved.predict(x_train[:4], verbose=0), student.predict(x_train[:4], verbose=0), atol=1e-6
    )


@pytest.mark.parametrize(
    "section, match",
    [
        ({"distill": {"teacher": "model.h5"}}, r"distill\.teacher: must be none, baseline or"),
        ({"distill": {"temperature": 0}}, r"distill\.temperature: must be"),
        ({"distill": {"teachr": "baseline"}}, r"distill\.teachr: unknown key"),
        ({"export": {"keras_quantization": "int2"}}, r"export\.keras_quantization: must be one"),
        ({"export": {"sparse_tflite": "always"}}, r"export\.sparse_tflite: must be one of auto"),
        (
            {"distill": {"teacher": "baseline", "alpha": 0, "hidden": 1}},
            r"distill\.hidden: is 1, and alpha is 0",
        ),
        ({"distill": {"hidden": -1}}, r"distill\.hidden: must be"),
    ],
    ids=[
        "teacher",
        "temperature",
        "typo",
        "keras-quantization",
        "sparse",
        "hidden-alpha",
        "hidden",
    ],
)
def test_recipe_errors(section, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"version": 1, "methods": ["magnitude"], **section})


def test_recipe_defaults_are_off():
    rec = Recipe.from_dict({"version": 1, "methods": ["magnitude"]})
    assert not rec.distill.enabled and rec.export.keras_quantization == "none"
    assert rec.export.sparse_tflite == "auto"
    assert (
        Recipe.from_dict(
            {"version": 1, "methods": ["magnitude"], "distill": {"teacher": None}}
        ).distill.teacher
        == "none"
    )


@pytest.mark.parametrize(
    "methods, match",
    [
        ({"methods": ["lottery"]}, "lottery trains, rewinds and retrains in its own loop"),
        (
            {"methods": ["structured"], "structured": {"mode": "progressive"}},
            "structured.mode progressive trains in its own loop",
        ),
    ],
    ids=["lottery", "progressive"],
)
def test_distill_refuses_methods_with_their_own_loop(methods, match):
    with pytest.raises(RecipeError, match=rf"distill\.teacher: cannot be combined .*{match}"):
        Recipe.from_dict({"version": 1, **methods, "distill": {"teacher": "baseline"}})
    # Without distill the same recipe is fine.
    assert Recipe.from_dict({"version": 1, **methods}).methods


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            "methods: [magnitude]\nguard: {stages: [0.4, 0.7], epochs_per_stage: 1}\n",
            marks=pytest.mark.slow,  # heavy: the lora/lowrank cases cover the distilled fit
        ),
        "methods: [lora]\nlora: {rank: 4}\nfinetune: {epochs: 1, jit_compile: off}\n",
        "methods: [lowrank]\nlowrank: {rank: 8}\nfinetune: {epochs: 1, jit_compile: off}\n",
    ],
    ids=["guard-stages", "lora", "lowrank"],
)
def test_distillation_reaches_every_fit(trained_run, tmp_path, body):
    run = RunDir(trained_run)
    configure(run, recipe=_recipe(tmp_path, body + "distill: {teacher: baseline}\n"), force=True)
    entry = finetune(run, verbose=0).entry
    assert entry["details"]["distill"]["teacher"] == "baseline"
    assert entry["accuracy"] > 0.3 and entry["energy_j"] > 0
    if "guard" in body:
        assert len(entry["details"]["guard"]["stages"]) >= 1


def test_recipe_hidden_states_reach_the_structured_fit(trained_run, tmp_path):
    """`distill.hidden` adds the hidden-state term to a one-shot structured fine-tune: the
    narrowed layers are compared with the baseline's channels they kept (the surgery's record
    survives into the fit), and `details.distill.distilled_layers` says which. (In the default
    gradual mode the layers keep their width until deploy and are compared whole.)"""
    run = RunDir(trained_run)
    body = (
        "methods: [structured]\nstructured: {ratio: 0.5, mode: oneshot}\n"
        "finetune: {epochs: 1, jit_compile: off}\n"
        "distill: {teacher: baseline, hidden: 2.0}\n"
    )
    configure(run, recipe=_recipe(tmp_path, body), force=True)
    entry = finetune(run, verbose=0).entry
    d = entry["details"]["distill"]
    assert d["hidden"] == 2.0 and d["hidden_layers"] is None
    layers = d["distilled_layers"]
    assert layers and any(la["channels"] for la in layers), layers
    baseline = load_model(run.baseline)
    names = {la.name for la in baseline.layers}
    assert {la["layer"] for la in layers} <= names
    assert entry["accuracy"] > 0.3


def test_recipe_transfer_set_reaches_the_fit(trained_run, tmp_path, monkeypatch):
    """`distill.transfer` feeds every distilled fit perturbed batches (the teacher's inputs
    too, since the Distiller runs it on the batch it gets); `details.distill` records it."""
    from keras_lean import distill as distill_mod

    fed = []
    original = distill_mod.TransferData.__getitem__
    monkeypatch.setattr(
        distill_mod.TransferData,
        "__getitem__",
        lambda self, i: fed.append(i) or original(self, i),
    )
    run = RunDir(trained_run)
    body = (
        "methods: [lowrank]\nlowrank: {rank: 8}\nfinetune: {epochs: 1, jit_compile: off}\n"
        "distill: {teacher: baseline, transfer: {noise: 0.05, mixup: 0.2}}\n"
    )
    configure(run, recipe=_recipe(tmp_path, body), force=True)
    assert load_recipe(run.recipe).distill.transfer.noise == 0.05
    entry = finetune(run, verbose=0).entry
    transfer = entry["details"]["distill"]["transfer"]
    assert transfer["noise"] == 0.05 and transfer["mixup"] == 0.2 and transfer["shift"] == 0
    assert fed and entry["accuracy"] > 0.3
