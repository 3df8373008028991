"""Every transform leaves your model untouched: the ones the shape table does not cover directly.

`find_lottery_ticket` (a compiled model, whose optimizer it reuses), `shrink` (a gradually masked
model, after training) and `strip_pruning` (a pruned model, after training), on every model shape
they accept. The shape table (tests/test_model_shapes.py) checks the same for the caller's model
of each forward transform.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_lean.lowrank import apply_lora, merge_lora
from keras_lean.sparsity import (
    ConstantSparsity,
    find_lottery_ticket,
    prune_low_magnitude,
    strip_pruning,
)
from keras_lean.structured import prune_structured_gradually, shrink
from tests._model_shapes import (
    GRAPH_SHAPES,
    OUT_DIM,
    SHAPES,
    assert_untouched,
    inputs,
    labels,
    snapshot,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit_once(model, x):
    model.compile("sgd", LOSS)
    model.fit(x, labels(len(x)), batch_size=len(x), epochs=1, verbose=0)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' and TFMOT's deprecation chatter
        yield


@pytest.mark.parametrize("shape", GRAPH_SHAPES)
def test_find_lottery_ticket_leaves_the_model_and_its_optimizer_untouched(shape):
    model = SHAPES[shape]()
    model.compile(keras.optimizers.Adam(1e-2), LOSS)
    x = inputs()
    before = snapshot(model, x)
    optimizer_before = [(v.path, v.numpy().copy()) for v in model.optimizer.variables]
    result = find_lottery_ticket(
        model, (x, labels(), x, labels()), rounds=1, rate=0.5, epochs_per_round=1, batch_size=3
    )
    assert result.model is not model
    assert result.model.optimizer is not model.optimizer
    assert int(model.optimizer.iterations.numpy()) == 0  # its own optimizer never stepped
    optimizer_after = [(v.path, v.numpy()) for v in model.optimizer.variables]
    assert [p for p, _ in optimizer_after] == [p for p, _ in optimizer_before]
    for (path, a), (_, b) in zip(optimizer_before, optimizer_after, strict=True):
        np.testing.assert_array_equal(b, a, err_msg=path)
    assert_untouched(model, before, x)


@pytest.mark.parametrize("shape", GRAPH_SHAPES)
def test_strip_pruning_leaves_the_pruned_model_untouched(shape):
    x = inputs()
    pruned = prune_low_magnitude(SHAPES[shape](), ConstantSparsity(0.5, begin_step=0, frequency=1))
    _fit_once(pruned, x)
    before = snapshot(pruned, x)
    stripped = strip_pruning(pruned)
    assert stripped is not pruned
    assert not {id(v) for v in stripped.weights} & {id(v) for v in pruned.weights}
    assert_untouched(pruned, before, x)


@pytest.mark.parametrize("shape", GRAPH_SHAPES)
def test_shrink_leaves_the_masked_model_untouched(shape):
    x = inputs()
    masked = prune_structured_gradually(
        SHAPES[shape](), ConstantSparsity(0.5, begin_step=0, frequency=1)
    )
    _fit_once(masked, x)
    before = snapshot(masked, x)
    small = shrink(masked)
    assert small.count_params() < masked.count_params()  # it did remove channels
    assert tuple(small(x).shape) == (len(x), OUT_DIM)
    assert not {id(v) for v in small.weights} & {id(v) for v in masked.weights}
    assert_untouched(masked, before, x)


@pytest.mark.parametrize("shape", GRAPH_SHAPES)
def test_merge_lora_leaves_the_lora_model_untouched(shape):
    x = inputs()
    lora = apply_lora(SHAPES[shape](), rank=2, targets="fc")
    rng = np.random.default_rng(0)
    for variable in lora.trainable_weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    before = snapshot(lora, x)
    merged = merge_lora(lora)
    assert merged is not lora
    assert_untouched(lora, before, x)
