"""`Method.pruning_end_step(plan)`: the step where gradual pruning reaches its target (issue 11).

Early stopping with `after_pruning` waits for it, so for every gradual method the test trains
step by step and checks the target is reached exactly at that step, not before; methods that do
not prune during the pipeline's fit return None.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.pipeline.methods import get_method_class
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.sparsity import sparsity_report, strip_pruning

PLAN = FinetunePlan(epochs=2, steps_per_epoch=6, batch_size=8)  # 12 steps
# Linear growth, a mask update every 2 steps: steps(12) -> begin 0, end 8.
SCHEDULE = {"power": 1.0, "frequency": 2, "end": 0.7}


def _model():
    inputs = keras.Input((16,))
    x = keras.layers.Dense(32, activation="relu", name="h")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="out")(x))


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(PLAN.batch_size * PLAN.steps_per_epoch, 16)).astype("float32")
    y = rng.integers(0, 4, size=len(x)).astype("int32")
    return Data(x, y, x[:16], y[:16], 4)


def _kernel_sparsity(model) -> float:
    rows = {r.name: r.sparsity for r in sparsity_report(strip_pruning(model)).layers}
    return rows["h"]


def _channel_sparsity(model) -> float:
    masks = [np.asarray(layer.mask) for layer in model.layers if hasattr(layer, "pruning_step")]
    assert masks, "the gradual structured model has channel masks"
    return float(np.mean(np.concatenate(masks) == 0))


GRADUAL = {
    "magnitude": ({"target_sparsity": 0.8, "schedule": SCHEDULE}, 0.8, _kernel_sparsity),
    "movement": ({"target_sparsity": 0.8, "schedule": SCHEDULE}, 0.8, _kernel_sparsity),
    "structured": (
        {"ratio": 0.5, "mode": "gradual", "schedule": SCHEDULE},
        0.5,
        _channel_sparsity,
    ),
}


@pytest.mark.parametrize("name", sorted(GRADUAL))
def test_gradual_methods_reach_their_target_exactly_at_the_end_step(name):
    section, target, measure = GRADUAL[name]
    cls = get_method_class(name)
    method = cls(cls.options_class.from_dict(section))
    end = method.pruning_end_step(PLAN)
    assert end == 8
    data = _data()
    model = method.prepare(_model(), data, PLAN)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(True))
    b = PLAN.batch_size

    def train(steps):
        for i in range(steps):
            j = (i % PLAN.steps_per_epoch) * b
            model.train_on_batch(data.x_train[j : j + b], data.y_train[j : j + b])

    # The last mask update is the schedule's step `end`: one frequency interval before it the
    # target is not reached, and after `end + 1` optimizer steps it is. (The unstructured
    # wrapper counts its step from 1 and gets there one step sooner than the channel masks,
    # so "at `end`" is only exact to one step; early stopping waits for `end + 1` steps.)
    train(end - 1)
    before = measure(model)
    assert before < target - 0.1, f"{name} reached {before:.3f} before its end step"
    train(2)  # steps end-1 and end
    assert measure(model) == pytest.approx(target, abs=0.02)
    train(PLAN.total_steps - end - 1)  # and it stays there to the end of the fine-tune
    assert measure(model) == pytest.approx(target, abs=0.02)


@pytest.mark.parametrize(
    "name, section",
    [
        ("structured", {"mode": "oneshot"}),
        ("lottery", {}),
        ("lowrank", {}),
        ("lora", {}),
    ],
    ids=["structured-oneshot", "lottery", "lowrank", "lora"],
)
def test_methods_that_do_not_prune_during_fit_have_no_end_step(name, section):
    cls = get_method_class(name)
    assert cls(cls.options_class.from_dict(section)).pruning_end_step(PLAN) is None


def test_end_step_follows_the_schedule_and_plan():
    cls = get_method_class("structured")
    method = cls(cls.options_class.from_dict({"schedule": {"end": 1.0, "frequency": 5}}))
    long = FinetunePlan(epochs=10, steps_per_epoch=10, batch_size=8)
    assert method.pruning_end_step(long) == 95  # the last multiple of 5 within 99 steps
    assert method.pruning_end_step(long) == method.options.schedule.steps(long.total_steps)[1]
