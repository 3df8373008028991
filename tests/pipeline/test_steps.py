from __future__ import annotations

import importlib
import json

import keras
import numpy as np
import pytest
import yaml

from keras_lean.pipeline import (
    MissingStepError,
    RunDir,
    build_model,
    configure,
    decide_jit_compile,
    deploy,
    finetune,
    load_data,
    load_recipe,
    report,
    train_baseline,
    validate,
)
from keras_lean.pipeline.methods import FinetunePlan
from keras_lean.pipeline.steps import checkpoint as checkpoint_mod
from keras_lean.pipeline.steps.finetune import pruning_end_epoch

# The step functions shadow their modules' names on the package: reach the module itself.
configure_mod = importlib.import_module("keras_lean.pipeline.steps.configure")

STAGE_KEYS = {
    "stage",
    "started_at",
    "duration_s",
    "energy_j",
    "energy_kwh",
    "energy_method",
    "emissions_kg",
    "flops",
    "accuracy",
    "params",
    "nonzero_params",
    "gzip_bytes",
    "details",
}


def _configure_tiny(run, **kw):
    opts = dict(epochs=2, batch_size=32, jit_compile="off", target_sparsity=0.7, force=True)
    opts.update(kw)
    return configure(run, **opts)


def test_baseline_writes_model_manifest_and_report(trained_run, tiny_npz):
    run = RunDir(trained_run)
    model = keras.models.load_model(run.baseline)
    assert model.output_shape == (None, 10)
    manifest = run.read_manifest()
    assert manifest["data"] == str(tiny_npz) and manifest["arch"] == "cnn"
    assert manifest["from_logits"] is False
    (entry,) = run.read_report()
    assert set(entry) == STAGE_KEYS and entry["stage"] == "baseline"
    assert entry["energy_j"] > 0 and entry["energy_method"].startswith(("estimated", "measured"))
    assert entry["flops"] > 0 and entry["accuracy"] > 0.5
    assert entry["params"] == model.count_params() and entry["gzip_bytes"] > 0
    assert (run.energy_dir("baseline") / "energy.json").exists()


def test_five_steps_then_report(trained_run):
    run = RunDir(trained_run)
    _configure_tiny(run)
    rec = load_recipe(run.recipe)
    assert rec.method_options["magnitude"].target_sparsity == 0.7
    assert "#   - dense1 (Dense, 131200 params)" in run.recipe.read_text()
    ft = finetune(run, verbose=0)
    assert not run.checkpoint.exists() and run.finetuned.exists()
    details = ft.entry["details"]
    assert details["epochs_run"] == 2 and details["jit_compile"]["jit_compile"] is False
    final = details["methods"]["magnitude"]["final"]
    assert final["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert ft.entry["nonzero_params"] < 0.35 * ft.entry["params"]
    v = validate(run)
    assert json.loads(run.validation.read_text())["passed"] == v.passed
    assert v.accuracy_drop == pytest.approx(v.baseline_accuracy - v.finetuned_accuracy)
    d = deploy(run, quantization="dynamic")
    exp = d.entry["details"]["export"]
    assert exp["quantization"] == "dynamic" and exp["max_abs_diff"] < 0.05
    assert d.entry["details"]["tflite_gzip_ratio"] < 0.6
    plain = keras.models.load_model(d.artifacts["keras"])
    from keras_lean.sparsity import PruneLowMagnitude

    assert not any(isinstance(layer, PruneLowMagnitude) for layer in plain.layers)
    rep = report(run)
    assert [s["stage"] for s in rep.stages] == [
        "baseline",
        "configure",
        "finetune",
        "validate",
        "deploy",
    ]
    table = rep.table()
    # Each stage's row names how its energy was obtained (its own column, not anywhere).
    rows = {line.split()[0]: line for line in table.splitlines()[2:7]}
    assert list(rows) == ["baseline", "configure", "finetune", "validate", "deploy"]
    for stage, entry in zip(rows, rep.entries, strict=True):
        assert entry.energy_method.startswith(("estimated", "measured"))
        assert entry.energy_method in rows[stage], (stage, rows[stage])
    assert rep.summary()["sparsity"] > 0.65


def test_missing_inputs_name_the_step(tmp_path, trained_run):
    with pytest.raises(MissingStepError, match=r"run `keras-lean baseline --out"):
        configure(tmp_path / "empty")
    with pytest.raises(MissingStepError, match=r"run `keras-lean configure --out"):
        finetune(trained_run, verbose=0)
    with pytest.raises(MissingStepError, match=r"run `keras-lean finetune --out"):
        deploy(trained_run)
    with pytest.raises(MissingStepError, match=r"report.json not found"):
        report(tmp_path / "empty")


def test_configure_keeps_hand_edits_without_force(trained_run):
    run = RunDir(trained_run)
    _configure_tiny(run)
    with pytest.raises(FileExistsError, match="pass force=True"):
        configure(run, epochs=3)
    with pytest.raises(ValueError, match=r"finetune\.epochs: must be an int >= 1"):
        configure(run, epochs=0, force=True)


def test_validate_fails_the_gate_for_a_worse_model(trained_run):
    run = RunDir(trained_run)
    _configure_tiny(run)
    keras.utils.set_random_seed(1)
    build_model("cnn", (8, 8, 1), 10).save(run.finetuned)  # untrained: about 10 % accuracy
    v = validate(run)
    assert not v.passed and v.accuracy_drop > 0.3
    assert v.entry["details"]["passed"] is False


def test_failed_stage_leaves_earlier_files_intact(trained_run, monkeypatch):
    run = RunDir(trained_run)
    _configure_tiny(run)
    energy_file = run.energy_dir("configure") / "energy.json"
    before = (
        run.baseline.read_bytes(),
        run.recipe.read_bytes(),
        run.report_file.read_text(),
        energy_file.read_text(),
    )

    def boom(*a, **k):
        raise RuntimeError("crash in the middle of the stage")

    monkeypatch.setattr(keras.Model, "fit", boom)
    with pytest.raises(RuntimeError, match="crash in the middle"):
        finetune(run, verbose=0)
    assert not run.finetuned.exists()
    # A configure that fails after a good one keeps the good one's energy record; the failed
    # attempt's spent energy is kept beside it.
    monkeypatch.setattr(configure_mod, "recipe_to_yaml", boom)
    with pytest.raises(RuntimeError, match="crash in the middle"):
        _configure_tiny(run)
    after = (
        run.baseline.read_bytes(),
        run.recipe.read_bytes(),
        run.report_file.read_text(),
        energy_file.read_text(),
    )
    assert after == before
    failed_dir = run.energy_dir("configure").with_name("configure.failed")
    failed = json.loads((failed_dir / "energy.json").read_text())
    assert [r["name"] for r in failed["records"]] == ["configure"]
    assert not run.energy_dir("finetune").exists()
    assert (run.energy_dir("finetune").with_name("finetune.failed") / "energy.json").exists()


def test_resume_after_an_interruption(trained_run, monkeypatch):
    from keras_lean.sparsity import get_masks

    run = RunDir(trained_run)
    _configure_tiny(run, epochs=2, target_sparsity=0.6)
    real = checkpoint_mod.epoch_checkpoint

    def interrupting(run_, state):
        cb = real(run_, state)
        save = cb.on_epoch_end

        def on_epoch_end(epoch, logs=None):
            save(epoch, logs)
            raise KeyboardInterrupt

        cb.on_epoch_end = on_epoch_end
        return cb

    monkeypatch.setattr(checkpoint_mod, "epoch_checkpoint", interrupting)
    with pytest.raises(KeyboardInterrupt):
        finetune(run, verbose=0)
    monkeypatch.setattr(checkpoint_mod, "epoch_checkpoint", real)
    assert json.loads(run.checkpoint_state.read_text())["epoch"] == 1
    ckpt = keras.models.load_model(run.checkpoint)
    wrapper = next(layer for layer in ckpt.layers if hasattr(layer, "pruning_step"))
    steps_per_epoch = 13  # ceil(400 / 32)
    assert int(wrapper.pruning_step.numpy()) == steps_per_epoch
    masks_at_checkpoint = get_masks(ckpt)
    assert any(m.mean() < 1 for m in masks_at_checkpoint.values())  # pruning had begun

    result = finetune(run, resume=True, verbose=0)
    details = result.entry["details"]
    assert details["resumed_from_epoch"] == 1 and details["epochs_run"] == 1
    assert details["methods"]["magnitude"]["final"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    done = keras.models.load_model(run.finetuned)
    wrapper = next(layer for layer in done.layers if hasattr(layer, "pruning_step"))
    assert int(wrapper.pruning_step.numpy()) == 2 * steps_per_epoch
    assert not run.checkpoint.exists()


def test_resume_refuses_a_changed_recipe(trained_run, monkeypatch):
    run = RunDir(trained_run)
    _configure_tiny(run)
    run.checkpoint.write_bytes(run.baseline.read_bytes())
    run.checkpoint_state.write_text(json.dumps({"recipe": "other", "epoch": 1}))
    with pytest.raises(ValueError, match="made with a different recipe.yaml"):
        finetune(run, resume=True, verbose=0)


# Heavy (XLA compiles): slow-marked. The default suite measures jit_compile auto in
# tests/pipeline/test_sweep.py (decided once per sweep).
@pytest.mark.slow
def test_jit_auto_measures_restores_weights_and_caches(trained_run):
    run = RunDir(trained_run)
    _configure_tiny(run, jit_compile="auto", epochs=1)
    data = load_data(run.read_manifest()["data"])
    model = keras.models.load_model(run.baseline)
    before = [w.copy() for w in model.get_weights()]
    d = decide_jit_compile(
        model,
        data,
        batch_size=32,
        total_steps=13,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        steps=2,
    )
    assert d.step_ms_off > 0 and d.compile_s_off > 0 and d.reason
    assert isinstance(d.jit_compile, bool)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    first = finetune(run, verbose=0)
    cached = json.loads(run.jit_decision.read_text())
    assert cached["key"]["batch_size"] == 32
    probe = first.entry["details"]["jit_probe"]
    assert 0 < probe["duration_s"] < first.entry["duration_s"]
    records = json.loads((run.energy_dir("finetune") / "energy.json").read_text())["records"]
    assert [r["parent"] for r in records if r["name"] == "jit_probe"] == ["finetune"]
    assert "jit_compile auto: measured XLA" in report(run).table()
    second = finetune(run, verbose=0)
    assert second.entry["details"]["jit_compile"]["reason"].startswith("cached:")
    assert second.entry["details"]["jit_probe"] is None


def test_mirrored_strategy_uses_two_replicas(trained_run):
    run = RunDir(trained_run)
    _configure_tiny(run, epochs=1)
    result = finetune(run, strategy="mirrored", verbose=0)
    assert result.entry["details"]["replicas"] == 2
    assert result.entry["details"]["methods"]["magnitude"]["final"]["sparsity"] == pytest.approx(
        0.7, abs=0.01
    )


@pytest.mark.parametrize("after_pruning", [True, False], ids=["after-pruning", "from-start"])
def test_early_stopping_waits_for_the_schedule(trained_run, after_pruning):
    run = RunDir(trained_run)
    _configure_tiny(run, epochs=4)
    text = yaml.safe_load(run.recipe.read_text())
    text["finetune"]["early_stopping"] = {
        "enabled": True,
        "patience": 0,
        "min_delta": 1.0,
        "after_pruning": after_pruning,
    }
    run.recipe.write_text(yaml.safe_dump(text))
    result = finetune(run, verbose=0)
    details = result.entry["details"]
    # min_delta 1.0: no epoch ever counts as an improvement. The schedule (end 0.7 of 52 steps,
    # aligned to step 40) ends in the last epoch, so after_pruning never lets it stop early.
    assert details["methods"]["magnitude"]["schedule"]["end_step"] == 40
    if after_pruning:
        assert details["epochs_run"] == 4
        final = details["methods"]["magnitude"]["final"]["sparsity"]
        assert final == pytest.approx(0.7, abs=0.01)
    else:
        assert details["epochs_run"] < 4


def test_early_stopping_waits_for_the_structured_masks(trained_run):
    """Issue 11 item 6: `after_pruning` holds for gradual structured pruning too."""
    from keras_lean.structured import shrink

    run = RunDir(trained_run)
    configure(run, methods=["structured"], epochs=4, batch_size=32, jit_compile="off", force=True)
    text = yaml.safe_load(run.recipe.read_text())
    text["structured"]["ratio"] = 0.5
    text["finetune"]["early_stopping"] = {
        "enabled": True,
        "patience": 0,
        "min_delta": 1.0,
        "after_pruning": True,
    }
    run.recipe.write_text(yaml.safe_dump(text))
    methods = load_recipe(run.recipe).ordered_methods()
    plan = FinetunePlan(epochs=4, steps_per_epoch=13, batch_size=32)  # ceil(400 / 32) = 13
    # The default schedule ends at 0.7 of 52 steps (step 40, in the fourth epoch): no epoch
    # before it may stop the run, though min_delta 1.0 makes every epoch "no improvement".
    assert pruning_end_epoch(methods, plan) == 4
    result = finetune(run, verbose=0)
    assert result.entry["details"]["epochs_run"] == 4
    # The masks reached their target: half the channels of every group are gone.
    small = shrink(keras.models.load_model(run.finetuned))
    assert small.get_layer("conv1").filters == 16 and small.get_layer("dense1").units == 64


def test_adopting_a_user_model_with_logits(tmp_path, tiny_npz):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(10, name="logits")(keras.layers.Dense(32, "relu")(x))
    user = keras.Model(inputs, outputs)
    user.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    d = load_data(tiny_npz)
    user.fit(d.x_train, d.y_train, epochs=10, verbose=0)
    user.save(tmp_path / "user.keras")
    result = train_baseline(
        tmp_path / "run", data=tiny_npz, model_path=tmp_path / "user.keras", verbose=0
    )
    assert result.entry["details"]["from_logits"] is True
    assert result.entry["accuracy"] > 0.5
    assert RunDir(tmp_path / "run").read_manifest()["arch"] is None


def test_bad_baseline_arguments(tmp_path, tiny_npz):
    with pytest.raises(ValueError, match="strategy must be one of default, mirrored"):
        train_baseline(tmp_path, data=tiny_npz, strategy="tpu")
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        train_baseline(tmp_path, data=tiny_npz, epochs=0)
    wrong = build_model("mlp", (28, 28, 1), 10)
    wrong.save(tmp_path / "wrong.keras")
    with pytest.raises(ValueError, match=r"Data shape \(8, 8, 1\).*\(None, 28, 28, 1\)"):
        train_baseline(tmp_path / "r", data=tiny_npz, model_path=tmp_path / "wrong.keras")
    assert not (tmp_path / "r" / "baseline.keras").exists()


def test_mixed_precision_finetune_deploys_as_float32_int8(trained_run):
    run = RunDir(trained_run)
    _configure_tiny(run, epochs=1, mixed_precision=True, quantization="int8")
    finetune(run, verbose=0)
    tuned = keras.models.load_model(run.finetuned)
    policies = {layer.name: layer.dtype_policy.name for layer in tuned.layers}
    assert policies["pool"] == "mixed_float16"
    d = deploy(run)
    plain = keras.models.load_model(d.artifacts["keras"])
    assert {layer.dtype_policy.name for layer in plain.layers} == {"float32"}
    exp = d.entry["details"]["export"]
    assert exp["quantization"] == "int8" and exp["max_abs_diff"] < 0.1
    baseline_raw = d.entry["details"]["baseline_export"]["weights_raw_bytes"]
    assert exp["tflite_raw_bytes"] < 0.4 * baseline_raw
    summary = report(run).summary()
    assert summary["pruned_sparsity"]["magnitude"] == pytest.approx(0.7, abs=0.01)
