"""The core transforms, written with keras.ops only: CI runs this file under TensorFlow and again
under `KERAS_BACKEND=jax` (tests/conftest.py JAX_SUITE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_lean as kl
from keras_lean.energy import EnergyTracker
from keras_lean.sparsity import ConstantSparsity, PolynomialDecay, get_masks
from keras_lean.structured import prune_structured, prune_structured_gradually, shrink

BACKEND = keras.backend.backend()
OTHER = "tensorflow" if BACKEND == "jax" else "jax"


def _cnn(classes=3):
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(classes, name="out"),
        ]
    )


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype="float32"), rng.integers(0, 3, n).astype("int32")


def _compile(model, jit=True):
    model.compile(
        keras.optimizers.Adam(1e-2, weight_decay=1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


def _pruned_weights_zero(model):
    for wrapper in kl.sparsity.pruning_wrappers(model):
        for w, mask in zip(wrapper.pruned_weights, wrapper.mask_variables, strict=True):
            value = keras.ops.convert_to_numpy(w.variable.value)
            m = keras.ops.convert_to_numpy(mask.value)
            assert np.all(value[m == 0] == 0), f"{w.name}: pruned weights are not zero"
            yield float(np.mean(m == 0))


KINDS = {
    "magnitude": {},
    "n_by_m": {"sparsity_m_by_n": (2, 4), "filters": ["hidden", "out"]},
    "blocks": {"block_size": (2, 2), "filters": ["hidden", "out"]},
}


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
def test_masks_update_in_the_train_step_and_pruned_weights_stay_zero(kind):
    x, y = _data()
    pruned = _compile(
        kl.prune_low_magnitude(
            _cnn(), PolynomialDecay(0.0, 0.5, begin_step=0, end_step=3, frequency=1), **KINDS[kind]
        )
    )
    sparsities = []
    for step in range(4):  # each call is one jitted train step; weights read after each
        pruned.train_on_batch(x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8])
        sparsities.append(list(_pruned_weights_zero(pruned)))
    assert [int(w.pruning_step.value) for w in kl.sparsity.pruning_wrappers(pruned)][0] == 4
    final = sparsities[-1]
    assert all(s == pytest.approx(0.5, abs=0.05) for s in final), final
    if kind == "n_by_m":  # 2 zeros in every 4 weights from the first pruning step on
        assert all(s == 0.5 for s in sparsities[0]), sparsities[0]
    else:  # the masks moved with the schedule
        assert np.mean(sparsities[0]) < np.mean(final)
    stripped = kl.strip_pruning(pruned)
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    report = kl.sparsity_report(stripped)
    assert report.prunable_nonzero == pytest.approx(report.prunable_params * 0.5, rel=0.05)


def test_fit_prunes_like_train_on_batch_and_keeps_the_callers_model():
    x, y = _data(64)
    model = _cnn()
    before = [w.copy() for w in model.get_weights()]
    pruned = _compile(kl.prune_low_magnitude(model, ConstantSparsity(0.75, 0, frequency=2)))
    pruned.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert all(s == pytest.approx(0.75, abs=0.02) for s in _pruned_weights_zero(pruned))
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_file_round_trip_keeps_training(tmp_path):
    x, y = _data()
    pruned = _compile(kl.prune_low_magnitude(_cnn(), ConstantSparsity(0.5, 0, frequency=1)))
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )
    for name, mask in get_masks(pruned).items():
        np.testing.assert_array_equal(get_masks(loaded)[name], mask)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(s == pytest.approx(0.5, abs=0.02) for s in _pruned_weights_zero(loaded))


_SAVE_IN_OTHER_BACKEND = """
import numpy as np, keras, keras_lean as kl
from keras_lean.sparsity import ConstantSparsity
rng = np.random.default_rng(0)
x = rng.random((32, 8, 8, 1), dtype="float32"); y = rng.integers(0, 3, 32).astype("int32")
m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, name="conv"),
                      keras.layers.Flatten(), keras.layers.Dense(3, name="out")])
p = kl.prune_low_magnitude(m, ConstantSparsity(0.5, 0, frequency=1))
p.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
p.fit(x, y, batch_size=8, epochs=1, verbose=0)
p.save({path!r})
np.save({out!r}, p.predict(x, verbose=0))
"""


def test_keras_file_saved_under_the_other_backend_loads_and_trains(tmp_path):
    path, out = str(tmp_path / "other.keras"), str(tmp_path / "other.npy")
    env = {**os.environ, "KERAS_BACKEND": OTHER, "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = textwrap.dedent(_SAVE_IN_OTHER_BACKEND).format(path=path, out=out)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    x, y = _data()
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.load(out), rtol=1e-4, atol=1e-5)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(s == pytest.approx(0.5, abs=0.02) for s in _pruned_weights_zero(loaded))


def test_lottery_ticket_rounds_keep_fixed_masks():
    x, y = _data(48)
    model = _cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    result = kl.find_lottery_ticket(
        model,
        (x, y, x[:16], y[:16]),
        rounds=2,
        rate=0.5,
        epochs_per_round=1,
        batch_size=16,
        metrics=(),
    )
    assert result.rounds[-1].sparsity == pytest.approx(0.75, abs=0.02)
    assert all(s == pytest.approx(0.75, abs=0.02) for s in _pruned_weights_zero(result.model))


def test_structured_one_shot_and_gradual():
    x, y = _data()
    model = _cnn()
    small = prune_structured(model, 0.5)
    assert small.get_layer("conv").filters == 4 and small.get_layer("hidden").units == 8
    _compile(small).fit(x, y, batch_size=8, epochs=1, verbose=0)
    masked = _compile(prune_structured_gradually(model, ConstantSparsity(0.5, 0, frequency=1)))
    masked.fit(x, y, batch_size=8, epochs=1, verbose=0)
    shrunk = shrink(masked)
    assert shrunk.get_layer("conv").filters == 4
    np.testing.assert_allclose(
        shrunk.predict(x, verbose=0), masked.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )


def test_factorize_and_lora():
    x, y = _data()
    model = _cnn()
    model(x[:1])
    low, report = kl.factorize(model, rank=2)
    assert report.params_after < report.params_before
    _compile(low).fit(x, y, batch_size=8, epochs=1, verbose=0)
    lora = kl.apply_lora(model, rank=2, targets=["hidden"])
    _compile(lora).fit(x, y, batch_size=8, epochs=1, verbose=0)
    merged = kl.merge_lora(lora)
    np.testing.assert_allclose(
        merged.predict(x, verbose=0), lora.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )


def test_count_flops_matches_across_backends():
    report = kl.count_flops(_cnn())
    # conv: 6*6*8 outputs x 9 MACs x 2 + dense 288x16 x 2 + 16x3 x 2 (plus bias/BN terms)
    assert report.total >= 2 * (6 * 6 * 8 * 9 + 288 * 16 + 16 * 3)
    assert report.params == _cnn().count_params()


def test_energy_windows_wait_for_dispatched_work(tmp_path):
    tracker = EnergyTracker(output_dir=tmp_path)
    x = keras.random.normal((256, 256))
    with tracker.window("matmul"):
        for _ in range(5):
            x = keras.ops.tanh(keras.ops.matmul(x, x))
    record = tracker.records[-1]
    assert record.duration_s > 0 and record.energy_j >= 0
    assert json.loads((tmp_path / "energy.json").read_text())


@pytest.mark.skipif(BACKEND != "jax", reason="refused only under JAX")
def test_tfmot_schedule_subclass_is_refused_under_jax():
    from keras_lean.sparsity.schedules import import_tfmot

    tfmot = import_tfmot()

    class Every(tfmot.sparsity.keras.ConstantSparsity):
        pass

    with pytest.raises(ValueError, match="cannot run inside JAX's jitted train step"):
        kl.prune_low_magnitude(_cnn(), Every(0.5, 0))
    # TFMOT's own schedules become their native twins (same trajectory).
    native = kl.sparsity.as_schedule(tfmot.sparsity.keras.PolynomialDecay(0.1, 0.6, 0, 10))
    assert isinstance(native, PolynomialDecay)


def test_pruning_steps_count_in_a_dtype_the_backend_has():
    """JAX without x64 has no int64: asking for it warns ("Explicitly requested dtype int64")."""
    import warnings

    x, _ = _data(n=8)
    expected = "int32" if BACKEND == "jax" else "int64"  # TensorFlow keeps TFMOT's int64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = kl.prune_low_magnitude(_cnn(), PolynomialDecay(0.0, 0.5, 0, 4, frequency=1))
        gradual = prune_structured_gradually(_cnn(), ConstantSparsity(0.5, 0, frequency=1))
        for model in (pruned, gradual):  # a training call: step + 1, schedule, mask update
            model(x, training=True)
            model(x, training=True)
    assert not [w for w in caught if "int64" in str(w.message)], [str(w.message) for w in caught]
    steps = [v for m in (pruned, gradual) for v in m.weights if "pruning_step" in v.path]
    assert len(steps) >= 4 and {str(v.dtype) for v in steps} == {expected}
    assert {int(keras.ops.convert_to_numpy(v.value)) for v in steps} == {2}


def test_deploy_heading_names_the_formats_this_backend_exports(tmp_path):
    from keras_lean.console import describe_stage
    from keras_lean.pipeline.recipe import Recipe, recipe_to_yaml

    (tmp_path / "recipe.yaml").write_text(recipe_to_yaml(Recipe()))
    heading = describe_stage("deploy", tmp_path)
    if BACKEND == "tensorflow":
        assert heading.startswith("strip, export saved_model + tflite (quantization")
    else:  # Keras' LiteRT export needs TensorFlow: the heading must not promise it
        assert "saved_model + tflite" not in heading
        assert "export saved_model (tflite skipped: needs KERAS_BACKEND=tensorflow)" in heading
