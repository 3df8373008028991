"""Soft movement that follows the schedule (`threshold=None`): it reaches the target sparsity."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity import (
    PolynomialDecay,
    PruneLowMagnitude,
    get_masks,
    prune_low_magnitude,
    pruning_wrappers,
    sparsity_report,
    strip_pruning,
)
from keras_lean.sparsity.masks import keep_count
from keras_lean.sparsity.movement import (
    DEFAULTS,
    FIXED_THRESHOLD_DEFAULTS,
    MovementSettings,
    movement_scores,
)

from ._sparsity_models import compile_model, random_data, small_cnn

_SCHEDULE = PolynomialDecay(0.0, 0.9, 2, 12, frequency=2)


class _MasksPerStep(keras.callbacks.Callback):
    def __init__(self, model):
        super().__init__()
        self.pruned = model
        self.seen: dict[int, dict] = {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(pruning_wrappers(self.pruned)[0].pruning_step.numpy())
        self.seen[step] = get_masks(self.pruned)


def _train(epochs=4):
    keras.utils.set_random_seed(0)
    x, y = random_data(64)
    pruned = compile_model(
        prune_low_magnitude(small_cnn(), _SCHEDULE, criterion="soft_movement"),
        keras.optimizers.Adam(0.01),
    )
    record = _MasksPerStep(pruned)
    pruned.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False, callbacks=[record])
    return pruned, record.seen


def test_soft_movement_without_threshold_keeps_the_schedules_fraction():
    # (the TopK path under XLA is test_movement.py's hard-movement test)
    pruned, seen = _train()
    for step in (2, 6, 12, 16):
        _, sparsity = _SCHEDULE(step)
        for key, mask in seen[step].items():
            assert int(mask.sum()) == int(keep_count(mask.size, sparsity)), (step, key)
    stripped = strip_pruning(pruned)
    for row in sparsity_report(stripped).layers:
        # exactly keep_count weights: the target up to rounding to whole weights
        assert row.sparsity == pytest.approx(0.9, abs=0.5 / row.params + 1e-9), row.name
    np.testing.assert_allclose(
        stripped.predict(random_data(8)[0], verbose=0),
        pruned.predict(random_data(8)[0], verbose=0),
        atol=1e-5,
    )


def test_the_l1_penalty_is_still_added_to_the_loss():
    from keras import ops

    wrapper = PruneLowMagnitude(
        keras.layers.Dense(4),
        PolynomialDecay(0.0, 0.5, 0, 4, frequency=1),
        criterion="soft_movement",
        l1_coefficient=3.0,
    )
    wrapper(np.ones((2, 8), "float32"), training=True)  # step 1: a pruning step
    ramp = float(wrapper._movement_ramp.numpy())
    assert 0 < ramp < 1  # the schedule's s_1 / s_final
    (score,) = movement_scores(wrapper)
    expected = 3.0 * ramp * float(np.mean(ops.convert_to_numpy(ops.sigmoid(score))))
    (loss,) = wrapper.losses
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert wrapper.movement.follows_schedule


@pytest.mark.parametrize(
    "given,expected",
    [
        ({}, {**DEFAULTS["soft_movement"]}),
        ({"threshold": 0.3}, {**DEFAULTS["soft_movement"], **FIXED_THRESHOLD_DEFAULTS}),
        (
            {"threshold": 0.3, "score_init": "magnitude", "score_lr_multiplier": 7.0},
            {"score_init": "magnitude", "score_lr_multiplier": 7.0},
        ),
    ],
    ids=["follows-schedule", "fixed-threshold", "fixed-threshold-explicit"],
)
def test_soft_defaults_depend_on_whether_a_threshold_is_given(given, expected):
    settings = MovementSettings.resolve("soft_movement", **given)
    assert settings.follows_schedule is (given.get("threshold") is None)
    for key, value in expected.items():
        if key != "threshold":
            assert getattr(settings, key) == value, key
    assert settings.threshold == given.get("threshold")
    assert MovementSettings.resolve("movement").follows_schedule
