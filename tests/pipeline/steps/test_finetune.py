"""The finetune step's pieces that need no training: early stopping's start, the context."""

from __future__ import annotations

import pytest

from keras_lean.pipeline.methods import FinetunePlan
from keras_lean.pipeline.steps.finetune import pruning_end_epoch


class _Prunes:
    name = "fake"

    def __init__(self, end_step):
        self.end_step = end_step

    def pruning_end_step(self, plan):
        return self.end_step


PLAN = FinetunePlan(epochs=5, steps_per_epoch=10, batch_size=8)


@pytest.mark.parametrize(
    "end_steps, expected",
    [
        ((), 0),
        ((None,), 0),
        ((0,), 1),  # the update at step 0 happens in the first epoch
        ((9,), 1),  # the last step of epoch 1
        ((10,), 2),  # the first step of epoch 2
        ((39, None, 12), 4),  # the latest of several methods
    ],
    ids=["no-methods", "not-pruning", "step-0", "epoch-end", "epoch-start", "max-of-methods"],
)
def test_pruning_end_epoch_is_the_epoch_of_the_last_mask_update(end_steps, expected):
    assert pruning_end_epoch([_Prunes(s) for s in end_steps], PLAN) == expected
