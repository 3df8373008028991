from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.distill import (
    DistillConfig,
    ProbabilityDistillation,
    Teacher,
    TransferConfig,
    TransferData,
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


# --- the transfer set (DistillConfig.transfer) ---------------------------------------------


def _image_model(kind: str, seed: int = 0) -> keras.Model:
    """A tiny digits CNN as a Sequential, a functional or a nested (functional over a
    Sequential) model."""
    keras.utils.set_random_seed(seed)

    def body():
        return [
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(10, activation="softmax", name="out"),
        ]

    if kind == "sequential":
        return keras.Sequential([keras.Input((8, 8, 1)), *body()])
    inputs = keras.Input((8, 8, 1))
    if kind == "functional":
        x = inputs
        for layer in body():
            x = layer(x)
        return keras.Model(inputs, x)
    inner = keras.Sequential([keras.Input((8, 8, 1)), *body()], name="inner")
    return keras.Model(inputs, inner(inputs))


_IMAGES = TransferConfig(shift=1, noise=0.05, mixup=0.4)


@pytest.mark.parametrize("kind", ["sequential", "functional", "nested"])
def test_teacher_sees_the_perturbed_inputs(digits, kind):
    """Student = a copy of the teacher, frozen by lr 0, alpha 1: the distillation loss is 0
    only if the teacher runs on the very batch the student sees. Fed the clean batch instead,
    it would be the KL between the teacher on clean and on perturbed inputs (checked large)."""
    x_train, y_train, _, _ = digits
    x, y = x_train[:128], y_train[:128]
    teacher = _image_model(kind)
    student = keras.models.clone_model(teacher)
    student.set_weights(teacher.get_weights())
    cfg = DistillConfig(alpha=1.0, transfer=TransferConfig(shift=1, noise=0.3))
    res = distill_fit(
        student, teacher, x, y, config=cfg, from_logits=False, transfer_seed=5,
        optimizer=keras.optimizers.SGD(0.0), epochs=2, batch_size=32, verbose=0,
    )  # fmt: skip
    assert max(res.history.history["distillation_loss"]) < 1e-6
    assert res.samples_seen == 2 * 128
    # The control: what the loss would be with the teacher on the clean batches.
    data = TransferData(x, y, config=cfg.transfer, batch_size=32, epochs=1, seed=5)
    (xa, _), (xc, _) = data[0], data._clean_batch(0)
    clean_kl = distillation_loss(cfg, from_logits=False).compute_loss(
        teacher.predict(xc, verbose=0), teacher.predict(xa, verbose=0)
    )
    assert float(clean_kl) > 1e-2


@pytest.mark.parametrize("kind", ["sequential", "functional", "nested"])
def test_transfer_distillation_trains(digits, kind):
    x_train, y_train, x_val, y_val = digits
    teacher = _image_model(kind, seed=1)  # untrained: any teacher gives soft targets to fit
    student = _image_model(kind, seed=2)
    before = [np.array(w) for w in student.trainable_weights]
    res = distill_fit(
        student, teacher, x_train[:128], y_train[:128], config=DistillConfig(transfer=_IMAGES),
        optimizer=keras.optimizers.Adam(0.01), epochs=2, batch_size=64, verbose=0,
        validation_data=(x_val[:64], y_val[:64]),
    )  # fmt: skip
    hist = res.history.history
    assert len(hist["val_accuracy"]) == 2 and hist["total_loss"][-1] < hist["total_loss"][0]
    assert any(
        not np.allclose(a, np.array(b))
        for a, b in zip(before, student.trainable_weights, strict=True)
    )
    assert res.to_dict()["transfer"] == _IMAGES.to_dict()


def test_transfer_fit_refusals(digits):
    import tensorflow as tf

    x_train, y_train, _, _ = digits
    model = _image_model("sequential")
    cfg = DistillConfig(transfer=TransferConfig(noise=0.1))
    with pytest.raises(ValueError, match="cannot take validation_split"):
        distill_fit(model, model, x_train[:64], y_train[:64], config=cfg, validation_split=0.2)
    ds = tf.data.Dataset.from_tensor_slices((x_train[:64], y_train[:64])).batch(32)
    with pytest.raises(ValueError, match="takes arrays"):
        distill_fit(model, model, ds, config=cfg, from_logits=False)
    with pytest.raises(ValueError, match="needs labels y"):
        TransferData(x_train[:64], config=cfg.transfer)
    with pytest.raises(TypeError, match="config must be a TransferConfig"):
        TransferData(x_train[:64], y_train[:64], config={"noise": 0.1})


def test_teacher_transfer_data_is_off_by_default(digits):
    x_train, y_train, _, _ = digits
    batches = [(x_train[:32], y_train[:32])] * 2
    off = Teacher(_image_model("sequential"), DistillConfig(), from_logits=False)
    assert off.transfer_data(batches, seed=0) is batches
    on = Teacher(off.model, DistillConfig(transfer=_IMAGES), from_logits=False)
    data = on.transfer_data(batches, seed=0, first_step=1)
    assert isinstance(data, TransferData) and data.first_step == 1 and len(data) == 2
    assert on.to_dict()["transfer"] == _IMAGES.to_dict()


def test_transfer_config_round_trips_and_validates():
    cfg = DistillConfig(alpha=0.7, temperature=2.0, transfer=_IMAGES)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    assert DistillConfig.from_dict(DistillConfig().to_dict()) == DistillConfig()
    tokens = TransferConfig(token_mask=0.15, mask_token_id=103, keep_token_ids=[101, 102])
    assert tokens.keep_token_ids == (101, 102)
    assert TransferConfig.from_dict(tokens.to_dict()) == tokens
    assert DistillConfig(transfer=tokens.to_dict()).transfer == tokens
    assert not TransferConfig().enabled and tokens.enabled
    with pytest.raises(ValueError, match="unknown transfer key 'shfit'"):
        TransferConfig.from_dict({"shfit": 1})
    with pytest.raises(ValueError, match="unknown distill key 'augment'"):
        DistillConfig.from_dict({"augment": {}})
    with pytest.raises(TypeError, match="transfer must be a TransferConfig"):
        DistillConfig(transfer="shift")


@pytest.mark.parametrize(
    "section, match",
    [
        ({"teacher": "baseline", "transfer": {"noise": -1}}, r"distill\.transfer\.noise: must"),
        ({"teacher": "baseline", "transfer": {"shfit": 1}}, r"distill\.transfer\.shfit: unknown"),
        (
            {"teacher": "baseline", "transfer": {"token_mask": 0.2}},
            r"distill\.transfer\.mask_token_id: is needed",
        ),
        ({"transfer": {"noise": 0.1}}, r"distill\.transfer: .*distill\.teacher is none"),
    ],
    ids=["noise", "typo", "mask-id", "no-teacher"],
)
def test_recipe_transfer_errors_name_the_field(section, match):
    from keras_lean.pipeline.options import parse_section
    from keras_lean.pipeline.recipe import DistillOptions, RecipeError

    with pytest.raises(RecipeError, match=match):
        parse_section(DistillOptions, section, "distill")


def test_recipe_transfer_round_trips_to_the_library_config():
    from keras_lean.pipeline.options import parse_section
    from keras_lean.pipeline.recipe import DistillOptions

    opts = parse_section(
        DistillOptions,
        {"teacher": "baseline", "transfer": {"token_mask": 0.1, "mask_token_id": 103,
                                             "keep_token_ids": [101, 102]}},
        "distill",
    )  # fmt: skip
    assert parse_section(DistillOptions, opts.to_dict(), "distill") == opts
    assert not parse_section(DistillOptions, {}, "distill").transfer.enabled
    lib = TransferConfig.from_dict(opts.transfer.to_dict())
    assert lib == TransferConfig(token_mask=0.1, mask_token_id=103, keep_token_ids=(101, 102))
