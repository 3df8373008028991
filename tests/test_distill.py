from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.distill import (
    DistillConfig,
    ProbabilityDistillation,
    compile_distiller,
    distill_fit,
    distillation_loss,
    make_distiller,
)
from keras_lean.lowrank import apply_lora
from keras_lean.sparsity import ConstantSparsity, prune_low_magnitude, sparsity_report


def _mlp(units: int, softmax: bool = True, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,))
    x = keras.layers.Dense(units, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax" if softmax else None, name="out")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def teacher(digits):
    x_train, y_train, _, _ = digits
    model = _mlp(64)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train.reshape(len(x_train), -1), y_train, epochs=8, batch_size=32, verbose=0)
    return model


def _flat(digits):
    x_train, y_train, x_val, y_val = digits
    return x_train.reshape(len(x_train), -1), y_train, x_val.reshape(len(x_val), -1), y_val


@pytest.mark.parametrize(
    "alpha, temperature, match",
    [(1.5, 2.0, r"alpha must be in \[0, 1\]"), (0.5, 0.0, "temperature must be > 0")],
    ids=["alpha", "temperature"],
)
def test_config_errors(alpha, temperature, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(alpha=alpha, temperature=temperature)


def test_config_type_errors(teacher):
    with pytest.raises(TypeError, match="alpha must be a number"):
        DistillConfig(alpha="high")
    with pytest.raises(TypeError, match="config must be a DistillConfig"):
        make_distiller(teacher, teacher, {"alpha": 0.5}, from_logits=False)
    with pytest.raises(TypeError, match="teacher must be a keras.Model"):
        distill_fit(teacher, "baseline", np.zeros((4, 64)), np.zeros(4))


def test_probability_loss_equals_logits_loss():
    """On softmax outputs, ProbabilityDistillation is LogitsDistillation on the logits."""
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(16, 10)).astype("float32"), rng.normal(size=(16, 10)).astype("float32")
    cfg = DistillConfig(temperature=3.0)
    on_logits = distillation_loss(cfg, from_logits=True).compute_loss(t, s)
    on_probs = distillation_loss(cfg, from_logits=False).compute_loss(
        keras.ops.softmax(t), keras.ops.softmax(s)
    )
    np.testing.assert_allclose(float(on_probs), float(on_logits), rtol=1e-4)
    assert float(on_logits) > 0
    same = ProbabilityDistillation(3.0).compute_loss(keras.ops.softmax(t), keras.ops.softmax(t))
    assert abs(float(same)) < 1e-5
    assert (
        ProbabilityDistillation.from_config(ProbabilityDistillation(2.0).get_config()).temperature
        == 2.0
    )


def _student_kinds():
    def pruned(m):
        return prune_low_magnitude(m, ConstantSparsity(0.8, begin_step=0, frequency=1))

    def lora(m):
        return apply_lora(m, rank=4, keep_trainable=["out"])

    return {"plain": lambda m: m, "pruned": pruned, "lora": lora}


@pytest.mark.parametrize("kind", ["plain", "pruned", "lora"])
def test_distillation_trains_wrapped_students(digits, teacher, kind):
    x_train, y_train, x_val, y_val = _flat(digits)
    student = _student_kinds()[kind](_mlp(16, seed=1))
    before = [np.array(w) for w in student.trainable_weights]
    teacher_weights = [np.array(w) for w in teacher.get_weights()]
    res = distill_fit(
        student,
        teacher,
        x_train[:512],
        y_train[:512],
        config=DistillConfig(alpha=0.7, temperature=3.0),
        epochs=2,
        batch_size=64,
        verbose=0,
    )
    assert res.student is student and res.from_logits is False
    hist = res.history.history
    assert hist["distillation_loss"][-1] < hist["distillation_loss"][0]
    assert any(
        not np.allclose(a, np.array(b))
        for a, b in zip(before, student.trainable_weights, strict=True)
    )
    # The teacher is untouched: same weights, trainable restored.
    assert teacher.trainable
    for a, b in zip(teacher_weights, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert res.samples_seen == 2 * 512
    assert res.teacher_forward_flops and res.teacher_flops == res.teacher_forward_flops * 1024
    if kind == "pruned":
        assert sparsity_report(student).sparsity > 0.7


def test_distillation_beats_labels_alone(digits, teacher):
    """Same student, same epochs: the teacher's soft targets reach a higher accuracy."""
    x_train, y_train, x_val, y_val = _flat(digits)
    n = 100  # few labels: where soft targets help most (about +7 points here)

    def accuracy(m):
        return float(np.mean(m.predict(x_val, verbose=0).argmax(-1) == y_val))

    plain = _mlp(16, seed=2)
    plain.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    plain.fit(x_train[:n], y_train[:n], epochs=20, batch_size=32, verbose=0)
    student = _mlp(16, seed=2)
    distill_fit(
        student,
        teacher,
        x_train[:n],
        y_train[:n],
        config=DistillConfig(alpha=0.7, temperature=2.0),
        optimizer=keras.optimizers.Adam(0.01),
        epochs=20,
        batch_size=32,
        verbose=0,
    )
    assert accuracy(student) > accuracy(plain) + 0.02


def test_logits_models_are_detected(digits):
    x_train, y_train, _, _ = _flat(digits)
    teacher = _mlp(32, softmax=False)
    student = _mlp(8, softmax=False, seed=3)
    res = distill_fit(student, teacher, x_train[:128], y_train[:128], epochs=1, verbose=0)
    assert res.from_logits is True
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x_train[:64], y_train[:64])).batch(32)
    with pytest.raises(ValueError, match="from_logits=None can only be detected"):
        distill_fit(student, teacher, ds)


def test_saved_student_keeps_the_optimizer_state(tmp_path, digits, teacher):
    """A checkpoint of the student (not the distiller) resumes with the trained optimizer."""
    x_train, y_train, x_val, _ = _flat(digits)
    student = _mlp(16, seed=4)
    distiller = compile_distiller(
        student, teacher, DistillConfig(), from_logits=False, optimizer="adam"
    )
    distiller.fit(x_train[:256], y_train[:256], epochs=1, batch_size=64, verbose=0)
    assert int(student.optimizer.iterations) == 4
    student.save(tmp_path / "student.keras")
    restored = keras.saving.load_model(tmp_path / "student.keras", compile=True)
    assert int(restored.optimizer.iterations) == 4
    np.testing.assert_allclose(
        restored.predict(x_val[:8], verbose=0), student.predict(x_val[:8], verbose=0), atol=1e-6
    )
    again = compile_distiller(
        restored, teacher, DistillConfig(), from_logits=False, optimizer=restored.optimizer
    )
    again.fit(x_train[:128], y_train[:128], epochs=1, batch_size=64, verbose=0)
    assert int(restored.optimizer.iterations) == 6
