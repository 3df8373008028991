"""Hidden-state distillation (keras_lean.distill_features) and the kept-channel record it uses."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.distill import DistillConfig, distill_fit, distilled_layers, make_distiller
from keras_lean.distill_features import (
    HiddenStateDistillation,
    feature_losses,
    feature_pairs,
    teacher_for_features,
)
from keras_lean.structured import kept_output_channels, prune_structured
from tests._model_shapes import GRAPH_SHAPES, IN_DIM, SHAPES


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, IN_DIM)).astype("float32"), rng.integers(0, 4, n)


def _layer_out(model, name, x):
    flat = teacher_for_features(model)
    extractor = keras.Model(flat.inputs, flat.get_layer(name).output)
    return np.asarray(extractor.predict(x, verbose=0))


def _nmse(teacher, student, name, x, channels=None):
    t, s = _layer_out(teacher, name, x), _layer_out(student, name, x)
    if channels is not None:
        t = t[..., channels]
    return float(HiddenStateDistillation(name).compute_loss(t, s))


@pytest.mark.parametrize("shape", GRAPH_SHAPES)
def test_kept_channels_map_back_to_the_teachers(shape):
    """fc1's surviving neurons compute exactly the teacher's neurons the record names, also
    after a second prune (the record composes) and for a nested teacher (flattened)."""
    keras.utils.set_random_seed(0)
    teacher = SHAPES[shape]()
    x, _ = _data()
    once = prune_structured(teacher, 0.5, "l1", exclude=("head",))
    twice = prune_structured(once, 0.5, "l1", exclude=("head",))
    t = _layer_out(teacher, "fc1", x)
    for student, width in ((once, 8), (twice, 4)):
        kept = kept_output_channels(student)
        # fc2 feeds the excluded head, so its width is kept: only fc1 is narrowed
        assert set(kept) == {"fc1"} and len(kept["fc1"]) == width
        assert np.all(np.diff(kept["fc1"]) > 0) and kept["fc1"].max() < 16
        np.testing.assert_array_equal(_layer_out(student, "fc1", x), t[..., kept["fc1"]])
    assert set(kept_output_channels(twice)["fc1"]) <= set(kept_output_channels(once)["fc1"])
    assert kept_output_channels(teacher) == {}


@pytest.mark.parametrize("shape", GRAPH_SHAPES)
def test_pairs_and_an_exact_copy_has_zero_hidden_loss(shape):
    """Auto pairs: every weighted layer but the output one, a narrowed one with its channels.
    A student equal to the teacher (ratio 0) has a zero distillation loss (KL and hidden);
    a perturbed one has not."""
    keras.utils.set_random_seed(0)
    teacher = SHAPES[shape]()
    x, y = _data()
    pruned = prune_structured(teacher, 0.5, "l1", exclude=("head",))
    flat, losses, pairs = feature_losses(teacher, pruned)
    assert [(p.name, None if p.channels is None else len(p.channels)) for p in pairs] == [
        ("fc1", 8),
        ("fc2", None),
    ]
    assert [d.teacher_layer_name for d in losses] == ["fc1", "fc2"]
    assert _nmse(teacher, pruned, "fc1", x, pairs[0].channels) < 1e-12
    assert _nmse(teacher, pruned, "fc2", x) > 1e-3  # fc2 lost half its inputs

    copy = prune_structured(teacher, 0.0, exclude=("head",))
    config = DistillConfig(alpha=1.0, hidden=1.0)
    result = distill_fit(copy, teacher, x, y, config=config, from_logits=True,
                         optimizer=keras.optimizers.SGD(0.0), epochs=1, batch_size=16,
                         verbose=0)  # fmt: skip
    assert result.distilled_layers == [
        {"layer": "fc1", "channels": None},
        {"layer": "fc2", "channels": None},
    ]
    assert result.history.history["distillation_loss"][-1] < 1e-6
    kernel = copy.get_layer("fc1").kernel
    kernel.assign(kernel.numpy() + 0.5)
    assert _nmse(teacher, copy, "fc1", x) > 1e-2


def test_hidden_term_pulls_the_layers_towards_the_teachers(digits):
    """Same pruned start, same steps: with the hidden term the narrowed layers end closer to
    the teacher's than with logits only (fc2 keeps its width; its inputs were narrowed)."""
    x_train, y_train, _, _ = digits
    x = x_train.reshape(len(x_train), -1)[:512]
    y = y_train[:512]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    h = keras.layers.Dense(32, activation="relu", name="fc1")(inputs)
    h = keras.layers.Dense(32, activation="relu", name="fc2")(h)
    teacher = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    teacher.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(True))
    teacher.fit(x, y, epochs=5, batch_size=32, verbose=0)
    errors = {}
    for hidden in (0.0, 20.0):
        keras.utils.set_random_seed(1)
        student = prune_structured(teacher, 0.75, "l1", exclude=("head",))
        assert len(kept_output_channels(student)["fc1"]) == 8
        if hidden == 0.0:
            start = _nmse(teacher, student, "fc2", x)
        distill_fit(student, teacher, x, y, config=DistillConfig(alpha=0.9, hidden=hidden),
                    from_logits=True, optimizer=keras.optimizers.Adam(1e-3), epochs=3,
                    batch_size=32, verbose=0)  # fmt: skip
        errors[hidden] = _nmse(teacher, student, "fc2", x)
    assert errors[20.0] < 0.85 * errors[0.0], (start, errors)
    assert errors[20.0] < start


def test_hub_blocks_are_the_auto_pairs():
    """A keras-hub classifier (its backbone nested): the teacher is flattened for Keras'
    extractor, the pairs are the transformer blocks (hidden width kept: no channel index),
    and a distilled fit of the pruned student runs."""
    from tests.structured._hub_models import bert_classifier

    teacher = bert_classifier(vocab=50, heads=4, hidden=16, ff=32, max_len=8, dropout=0.0)
    student = prune_structured(teacher, 0.5, "l1", exclude=("logits",))
    flat, _, pairs = feature_losses(teacher, student)
    assert flat is not teacher and [p.name for p in pairs] == [
        "transformer_layer_0",
        "transformer_layer_1",
    ]
    assert all(p.channels is None for p in pairs)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, 50, (32, 8)).astype("int32"),
        "segment_ids": np.zeros((32, 8), "int32"),
        "padding_mask": np.ones((32, 8), bool),
    }
    np.testing.assert_allclose(flat.predict(x, verbose=0), teacher.predict(x, verbose=0), atol=1e-6)
    # one eager loss evaluation (a traced fit of this graph takes seconds; the fits above
    # cover training through the same Distiller)
    distiller = make_distiller(student, teacher, DistillConfig(alpha=1.0, hidden=1.0),
                               from_logits=True)  # fmt: skip
    assert [d["layer"] for d in distilled_layers(distiller)] == [p.name for p in pairs]
    distiller.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = float(distiller.compute_loss(x, rng.integers(0, 3, 32)))
    # alpha 1: the loss is the KL plus the mean block NMSE, both > 0 for a pruned student
    kl = float(distiller.distillation_losses[0].compute_loss(teacher(x), student(x)))
    assert np.isfinite(loss) and loss > max(kl, 0.0)


def test_a_frozen_teacher_stays_frozen():
    """A teacher already frozen (as a first Distiller leaves it) is flattened from configs that
    say `trainable: False`; its block sublayers still hold trainable variables, which the
    distiller must not train (it did: the teacher's copy was trained towards the student)."""
    from tests.structured._hub_models import bert_classifier

    sizes = dict(vocab=50, heads=4, hidden=16, ff=32, max_len=8, dropout=0.0)
    teacher = bert_classifier(**sizes)
    student = prune_structured(bert_classifier(**sizes), 0.5, "l1", exclude=("logits",))
    teacher.trainable = False
    distiller = make_distiller(student, teacher, DistillConfig(hidden=1.0), from_logits=True)
    assert {id(v) for v in distiller.trainable_variables} == {
        id(v) for v in student.trainable_variables
    }
    assert len(student.trainable_variables) > 0


def test_refusals(tmp_path):
    keras.utils.set_random_seed(0)
    teacher = SHAPES["functional"]()
    pruned = prune_structured(teacher, 0.5, "l1", exclude=("head",))
    with pytest.raises(ValueError, match=r"no top-level layer 'fc9' in the student"):
        feature_pairs(teacher, pruned, ["fc9"])
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    reloaded = keras.models.load_model(path)
    assert kept_output_channels(reloaded) == {}
    with pytest.raises(ValueError, match=r"layer 'fc1'.*widths differ \(8 vs the teacher's 16\)"):
        feature_pairs(teacher, reloaded, ["fc1"])
    # auto leaves out the narrowed layer it cannot index, keeps the one of equal width
    assert [p.name for p in feature_pairs(teacher, reloaded)] == ["fc2"]
    inputs = keras.Input((IN_DIM,))
    other = keras.Model(inputs, keras.layers.Dense(4, name="head")(keras.layers.Dense(16)(inputs)))
    with pytest.raises(ValueError, match="no layer of the student matches the teacher"):
        make_distiller(other, teacher, DistillConfig(hidden=1.0), from_logits=True)
    with pytest.raises(ValueError, match="needs alpha > 0"):
        DistillConfig(alpha=0.0, hidden=1.0)
    with pytest.raises(ValueError, match="hidden must be >= 0"):
        DistillConfig(hidden=-1.0)
    with pytest.raises(TypeError, match="hidden must be a number"):
        DistillConfig(hidden="lots")
    with pytest.raises(ValueError, match="hidden_layers must be None or a non-empty list"):
        DistillConfig(hidden=1.0, hidden_layers=[])
    config = DistillConfig(hidden=2.0, hidden_layers="fc1")
    assert config.hidden_layers == ("fc1",)
    assert DistillConfig.from_dict(config.to_dict()) == config


def test_loss_serializes():
    loss = HiddenStateDistillation("fc1", [0, 2])
    again = HiddenStateDistillation.from_config(loss.get_config())
    assert again.channels == [0, 2] and again.teacher_layer_name == "fc1"
    t = np.arange(12, dtype="float32").reshape(2, 2, 3)
    assert float(again.compute_loss(t, t[..., [0, 2]])) == 0.0
    assert float(again.compute_loss(t, t[..., [0, 1]])) > 0.0
