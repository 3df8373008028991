"""The `structured` recipe method, driven directly through the Method contract."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.pipeline.methods import get_method_class
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.methods.structured import StructuredMethod, StructuredOptions

L = keras.layers


def _cnn():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(16, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    y = L.Conv2D(16, 3, padding="same", name="c2")(x)
    y = L.BatchNormalization(name="bn2")(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(24, activation="relu", name="d1")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def _data(digits, n=256):
    x_train, y_train, x_val, y_val = digits
    return Data(x_train[:n], y_train[:n], x_val[:64], y_val[:64], 10)


def _fit(model, data, plan):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model.fit(
        data.x_train, data.y_train, batch_size=plan.batch_size, epochs=plan.epochs, verbose=0
    )


def test_registered_and_ordered():
    assert get_method_class("structured") is StructuredMethod
    assert StructuredMethod.order == 10 and StructuredMethod.options_class is StructuredOptions


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_gradual_prepare_fit_finalize_shrinks(digits, importance):
    data = _data(digits)
    plan = FinetunePlan(epochs=2, steps_per_epoch=8, batch_size=32)
    options = StructuredOptions.from_dict(
        {"ratio": 0.5, "importance": importance, "schedule": {"frequency": 2}, "round_to": 4}
    )
    method = StructuredMethod(options)
    model = _cnn()
    masked = method.prepare(model, data, plan)
    assert masked is not model
    _fit(masked, data, plan)
    # Every channel group reached the ratio by the end of fit (then shrink removes them).
    masks = [np.asarray(layer.mask) for layer in masked.layers if hasattr(layer, "pruning_step")]
    assert masks and all(np.mean(m == 0) == 0.5 for m in masks)
    small = method.finalize(masked)
    np.testing.assert_allclose(small(data.x_val), masked(data.x_val), rtol=1e-4, atol=1e-4)
    widths = {
        layer.name: getattr(layer, "filters", getattr(layer, "units", None))
        for layer in small.layers
    }
    assert widths["c1"] == widths["c2"] == 8 and widths["d1"] == 12 and widths["logits"] == 10
    report = method.report()
    assert report["structure"]["flops_after"] < report["structure"]["flops_before"]
    assert report["schedule_steps"]["end_step"] <= plan.total_steps - 1
    assert report["options"]["ratio"] == 0.5


def test_oneshot_prepare_is_small_and_finalize_keeps_it(digits):
    data = _data(digits)
    plan = FinetunePlan(epochs=1, steps_per_epoch=8, batch_size=32)
    method = StructuredMethod(StructuredOptions.from_dict({"ratio": 0.25, "mode": "oneshot"}))
    model = _cnn()
    small = method.prepare(model, data, plan)
    assert small.count_params() < model.count_params()
    assert method.report()["round_to"] == 1
    _fit(small, data, plan)
    final = method.finalize(small)
    assert final.count_params() == small.count_params()


@pytest.mark.parametrize(
    "section, match",
    [
        ({"ratoi": 0.5}, r"structured\.ratoi: unknown key"),
        ({"ratio": 1.0}, r"structured\.ratio: must be in \[0, 1\)"),
        ({"importance": "l3"}, r"structured\.importance: must be one of"),
        ({"mode": "fast"}, r"structured\.mode: must be one of gradual, oneshot"),
        ({"round_to": 0}, r"structured\.round_to: must be an int >= 1"),
        ({"round_to": "fast"}, r"structured\.round_to: must be an int >= 1 or 'auto'"),
        ({"exclude": [1]}, r"structured\.exclude\[0\]: must be a string"),
        ({"schedule": {"kind": "cubic"}}, r"structured\.schedule\.kind: must be one of"),
        ({"schedule": {"bogus": 1}}, r"structured\.schedule\.bogus: unknown key"),
        ({"global_ranking": 3}, r"structured\.global_ranking: must be on or off"),
    ],
    ids=[
        "unknown-key",
        "ratio",
        "importance",
        "mode",
        "round_to",
        "round_to-word",
        "exclude",
        "schedule-kind",
        "schedule-key",
        "global",
    ],
)
def test_options_errors(section, match):
    with pytest.raises(ValueError, match=match):
        StructuredOptions.from_dict(section)


def test_options_round_trip():
    options = StructuredOptions.from_dict({"ratio": 0.3, "exclude": "logits", "mode": "oneshot"})
    assert StructuredOptions.from_dict(options.to_dict()) == options
    assert options.exclude == ("logits",)


def test_round_to_auto_resolves_to_this_cpus_lanes_and_is_reported(digits, monkeypatch):
    import keras_lean.structured.hardware as hardware

    monkeypatch.setattr(hardware, "simd_lanes", lambda: 4)
    options = StructuredOptions.from_dict({"ratio": 0.7, "mode": "oneshot", "round_to": "Auto"})
    assert options.round_to == "auto" and StructuredOptions.from_dict(options.to_dict()) == options
    method = StructuredMethod(options)
    small = method.prepare(_cnn(), _data(digits), FinetunePlan(1, 8, 32))
    widths = [layer.filters for layer in small.layers if isinstance(layer, L.Conv2D)]
    assert widths == [8, 8]  # 16 * 0.3 = 4.8 -> keep 5 -> rounded up to 8
    assert method.report()["round_to"] == 4


def test_deploy_folds_batchnorm_of_a_user_model(tmp_path, tiny_npz):
    from keras_lean.pipeline import configure, deploy, finetune, train_baseline

    path = tmp_path / "user.keras"
    _cnn().save(path)
    run = tmp_path / "run"
    train_baseline(run, data=tiny_npz, model_path=path, epochs=1, verbose=0)
    configure(run, methods=["structured"], epochs=1, jit_compile="off", force=True)
    finetune(run, verbose=0)
    d = deploy(run)
    assert sorted(d.entry["details"]["folded_batchnorm"]) == ["bn1", "bn2"]
    plain = keras.models.load_model(d.artifacts["keras"])
    assert not any(isinstance(layer, L.BatchNormalization) for layer in plain.layers)
    exp = d.entry["details"]["export"]
    assert exp["max_abs_diff"] < 1e-3 and exp["keras_accuracy"] == exp["tflite_accuracy"]
