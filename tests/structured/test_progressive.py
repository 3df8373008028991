"""prune_structured_progressively: dense when nothing goes, the masked trajectory otherwise."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.energy import EnergyTracker
from keras_lean.sparsity import ConstantSparsity, PolynomialDecay
from keras_lean.structured import prune_structured_gradually, shrink
from keras_lean.structured.progressive import prune_structured_progressively
from keras_lean.structured.progressive_plan import (
    StepTimes,
    default_schedule,
    events,
    targets,
)

from ._structured_models import (
    concat,
    dense_mlp,
    depthwise,
    flatten,
    make_input,
    nested,
    randomize_norms,
    residual,
    sequential_cnn,
    widths,
)

L = keras.layers
N, BS, EPOCHS = 48, 8, 2  # 6 steps per epoch, 12 in all
LOSS = "mse"


def _data(kind, seed=0):
    x = make_input(kind, n=N, seed=seed)
    y = np.random.default_rng(seed + 1).normal(size=(N, 3)).astype("float32")
    return x, y


def _model(builder):
    keras.utils.set_random_seed(0)
    return randomize_norms(builder())


def _fit_in_order(model, x, y, seed=0, epochs=EPOCHS):
    """What the documented training order is: epoch e visits the permutation of (seed, e)."""
    for e in range(epochs):
        order = np.random.default_rng([seed, e]).permutation(len(x))
        model.fit(x[order], y[order], batch_size=BS, epochs=1, shuffle=False, verbose=0)
    return model


def _run(model, x, y, ratio, **kw):
    kw.setdefault("optimizer", keras.optimizers.Adam(1e-2))
    return prune_structured_progressively(
        model, ratio, x, y, epochs=EPOCHS, batch_size=BS, loss=LOSS, **kw
    )


def _assert_close(a, b, atol):
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "ratio, schedule",
    [(0.0, None), (0.5, ConstantSparsity(0.5, begin_step=10**6, frequency=1))],
    ids=["ratio-0", "schedule-never-fires"],
)
def test_nothing_removed_is_dense_fine_tuning(ratio, schedule):
    x, y = _data("img8x1")
    model = _model(sequential_cnn)
    before = [w.copy() for w in model.get_weights()]
    small, report = _run(model, x, y, ratio, schedule=schedule)
    dense = keras.models.clone_model(model)
    dense.set_weights(model.get_weights())
    dense.compile(keras.optimizers.Adam(1e-2), LOSS, jit_compile=small.jit_compile)
    _fit_in_order(dense, x, y)
    _assert_close(small, dense, atol=1e-6)
    assert report.shrinks == () and len(report.segments) == 1
    assert int(small.optimizer.iterations.numpy()) == report.total_steps == 12
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the caller's model is not changed


CASES = {
    "sequential_cnn_bn-sgd": (sequential_cnn, "img8x1", "sgd"),
    "residual_add-sgd": (residual(L.Add), "img8x3", "sgd"),
    "concat-adam": (concat, "img6x2", "adam"),
    "depthwise_bn-sgd": (depthwise, "img6x2", "sgd"),
    "flatten-adam": (flatten, "img4x1", "adam"),  # no Dropout: its random masks would differ
}
# SGD with momentum where a bias feeds BatchNormalization: its gradient is zero up to float noise,
# which Adam would normalize into full steps that differ between any two implementations.
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(5e-2, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_shrinking_follows_the_masked_trajectory(case):
    """Same schedule, same ranking, same batches: shrunk step by step == masked then shrunk."""
    builder, kind, opt = CASES[case]
    x, y = _data(kind)
    schedule = PolynomialDecay(0.0, 0.5, begin_step=2, end_step=8, frequency=3, power=1)
    small, report = _run(
        _model(builder), x, y, 0.5, schedule=schedule, shrink_when="always",
        optimizer=OPTIMIZERS[opt](),
    )  # fmt: skip
    masked = prune_structured_gradually(_model(builder), schedule, "l1")
    masked.compile(OPTIMIZERS[opt](), LOSS, jit_compile=small.jit_compile)
    reference = shrink(_fit_in_order(masked, x, y))
    assert widths(small) == widths(reference)
    _assert_close(small, reference, atol=1e-5)
    assert len(report.shrinks) >= 2 and [s.step for s in report.shrinks] == [
        s.start_step for s in report.segments[1:]
    ]
    flops = [s.flops for s in report.segments]
    assert flops == sorted(flops, reverse=True) and flops[-1] < flops[0]
    assert report.segments[-1].params == small.count_params()
    assert int(small.optimizer.iterations.numpy()) == 12


def test_report_and_energy_windows():
    x, y = _data("vec10")
    tracker = EnergyTracker()
    small, report = _run(
        _model(dense_mlp),
        x,
        y,
        0.5,
        schedule=PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=3),
        shrink_when="always",
        tracker=tracker,
        validation_data=(x[:16], y[:16]),
        metrics=["mae"],
    )
    names = {r.name for r in tracker.records}
    assert {"progressive/epoch_1", "progressive/epoch_2", "progressive/shrink_1"} <= names
    assert all(s.energy_j is not None and s.energy_j >= 0 for s in report.segments)
    assert all(e.energy_j is not None and "val_mae" in e.metrics for e in report.epochs)
    assert all(s.cost_s >= s.surgery_s > 0 for s in report.shrinks)
    assert report.shrinks[0].retrace_s is not None
    assert report.segments[0].units_ratio == 1.0 > report.segments[-1].units_ratio
    assert report.segments[-1].widths["d1"] == small.get_layer("d1").units == 6
    data = report.to_dict()
    assert data["shrinks_run"] == len(report.shrinks) and data["structure"]["params_after"] == (
        small.count_params()
    )
    assert report.structure.params_after < report.structure.params_before


def test_cost_policy_defers_and_still_reaches_the_target():
    x, y = _data("vec10")
    schedule = PolynomialDecay(0.0, 0.5, begin_step=1, end_step=9, frequency=1, power=1)
    small, report = _run(_model(dense_mlp), x, y, 0.5, schedule=schedule, shrink_when="cost")
    # Tiny model: a step saves microseconds, a shrink costs a retrace, so most events wait.
    assert report.deferred and all(d["estimated_saving_s"] <= d["cost_s"] for d in report.deferred)
    assert len(report.shrinks) < 9
    assert report.shrinks[-1].step == 9  # the last event always runs
    assert small.get_layer("d1").units == 6 and small.get_layer("d2").units == 4


def test_one_fit_per_segment_and_epoch_records_across_a_mid_epoch_shrink(monkeypatch):
    x, y = _data("vec10")
    calls = []
    fit = keras.Model.fit

    def counting_fit(self, *args, **kwargs):
        calls.append(self)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", counting_fit)
    tracker = EnergyTracker()
    schedule = PolynomialDecay(0.0, 0.5, begin_step=3, end_step=3, frequency=1)  # mid epoch 1
    small, report = _run(_model(dense_mlp), x, y, 0.5, schedule=schedule, tracker=tracker)
    assert len(calls) == len(report.segments) == 2 and calls[-1] is small
    assert [e.epoch for e in report.epochs] == [1, 2]
    big, little = (s.flops for s in report.segments)
    # epoch 1: 3 steps (24 samples) before the shrink, 3 after; epoch 2: all 6 steps small
    assert report.epochs[0].flops == pytest.approx(3.0 * (big * 24 + little * 24))
    assert report.epochs[1].flops == pytest.approx(3.0 * little * N)
    names = [r.name for r in tracker.records]
    assert names.index("progressive/shrink_1") < names.index("progressive/epoch_1")
    assert {"progressive/segment_0/epoch_1", "progressive/segment_1/epoch_1",
            "progressive/segment_1/epoch_2"} <= set(names)  # fmt: skip


@pytest.mark.parametrize(
    "end, n_events, last_step",
    [(0.3, 3, 30), (0.5, 5, 50), (1.0, 1, 99)],
    ids=["default", "half-5", "whole-1"],
)
def test_default_schedule_reaches_the_target_early(end, n_events, last_step):
    fired = [(t, sp) for t, sp in events(default_schedule(0.5, 100, end, n_events), 100) if sp > 0]
    assert len(fired) == n_events and fired[-1] == (last_step, pytest.approx(0.5))
    if n_events > 1:  # cubic: most of the target at the first event
        assert fired[0][1] > 0.5 * (1 - (1 - 1 / n_events) ** 3) - 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prune_end": 0.0}, r"prune_end must be in \(0, 1\]"),
        ({"prune_end": 1.5}, r"prune_end must be in \(0, 1\]"),
        ({"prune_events": 0}, "prune_events must be an integer >= 1"),
    ],
    ids=["end-0", "end-above-1", "events-0"],
)
def test_bad_default_schedule_arguments(kwargs, match):
    x, y = _data("vec10")
    with pytest.raises(ValueError, match=match):
        _run(_model(dense_mlp), x, y, 0.5, **kwargs)


def test_step_time_model():
    times = StepTimes()
    assert times.saving(100.0, 50.0) is None
    times.add(100.0, 1.0)
    assert times.saving(100.0, 50.0) == pytest.approx(0.5)  # proportional with one point
    times.add(50.0, 0.75)  # affine: 0.5 s fixed + 0.005 s per FLOP
    assert times.saving(100.0, 50.0) == pytest.approx(0.25)


def test_targets_mark_the_last_growing_event():
    class Plan:
        def removed(self, s):
            return frozenset(range(int(10 * s)))

    t = targets([(0, 0.0), (2, 0.25), (4, 0.25), (6, 0.5), (8, 0.5)], Plan())
    assert sorted(t) == [2, 6] and t[6][2] and not t[2][2]


def test_nested_model_is_flattened_and_pruned():
    x, y = _data("vec10")
    small, report = _run(_model(nested), x, y, 0.5, shrink_when="always")
    assert small.get_layer("inner_d").units < 6
    assert report.structure.params_after < report.structure.params_before


def test_jit_compile_is_reused_per_segment():
    x, y = _data("vec10")
    schedule = PolynomialDecay(0.0, 0.5, begin_step=3, end_step=3, frequency=1)
    small, report = _run(_model(dense_mlp), x, y, 0.5, schedule=schedule, jit_compile=True)
    assert report.jit_compile is True and small.jit_compile is True
    assert len(report.shrinks) == 1 and small.get_layer("d1").units == 6


def test_mixed_precision_carries_the_loss_scale_optimizer():
    x, y = _data("vec10")
    keras.config.set_dtype_policy("mixed_float16")
    try:
        schedule = PolynomialDecay(0.0, 0.5, begin_step=3, end_step=3, frequency=1)
        small, report = _run(_model(dense_mlp), x, y, 0.5, schedule=schedule)
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(small.optimizer, keras.optimizers.LossScaleOptimizer)
    assert small.get_layer("d1").dtype_policy.name == "mixed_float16"
    assert int(small.optimizer.iterations.numpy()) == 12
    assert np.all(np.isfinite(small.predict(x, verbose=0)))
    assert len(report.shrinks) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"shrink_when": "sometimes"}, "shrink_when must be one of cost, always"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"ratio": 1.0}, r"ratio must be a float in \[0, 1\)"),
        ({"importance": "l3"}, "importance must be one of"),
        ({"schedule": ConstantSparsity(0.3)}, r"final sparsity \(0.3\) must equal ratio \(0.5\)"),
        ({"loss": None}, "loss is required"),
        ({"y": np.zeros((5, 3))}, "same number of samples"),
    ],
    ids=["epochs", "batch", "policy", "seed", "ratio", "importance", "schedule", "loss", "y"],
)
def test_bad_arguments(kwargs, match):
    x, y = _data("vec10")
    args = dict(ratio=0.5, x=x, y=y, epochs=1, batch_size=8, loss=LOSS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        prune_structured_progressively(dense_mlp(), **args)
