from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest

from keras_lean.sparsity import find_lottery_ticket, get_masks, pruning_wrappers, strip_pruning
from keras_lean.sparsity.lottery import prune_remaining


def _mlp():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(24, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))


def _kernels(model):
    return {
        f"{w.layer.name}/{p.name}": p.variable.numpy().copy()
        for w in pruning_wrappers(model)
        for p in w.pruned_weights
    }


def _run(digits, rewind_step, seen, calls):
    @contextlib.contextmanager
    def window(index, info):
        seen.append((index, info["sparsity"], _kernels(info["model"])))
        yield

    return find_lottery_ticket(
        _mlp(),
        digits,
        rounds=2,
        rate=0.5,
        rewind_step=rewind_step,
        epochs_per_round=1,
        batch_size=128,
        optimizer=lambda: keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        callbacks_factory=lambda i: calls.append(i) or [],
        round_context=window,
    )


def test_rounds_prune_remaining_and_rewind_to_init(digits):
    model_seen, calls = [], []
    result = _run(digits, 0, model_seen, calls)
    assert calls == [0, 1, 2]
    assert [r.index for r in result.rounds] == [0, 1, 2]
    np.testing.assert_allclose([r.sparsity for r in result.rounds], [0.0, 0.5, 0.75], atol=0.01)
    assert all(0.0 <= r.val_accuracy <= 1.0 for r in result.rounds)
    assert result.rounds[0].val_accuracy > 0.5  # it did learn
    init = model_seen[0][2]
    for index, _, kernels in model_seen[1:]:
        masks = {k: (v != 0) for k, v in kernels.items()}
        for key, value in kernels.items():
            np.testing.assert_array_equal(value, init[key] * masks[key], err_msg=f"{index} {key}")
    # the final model keeps its masks while training and strips to a sparse plain model
    final = get_masks(result.model)
    for key, mask in final.items():
        assert np.all(_kernels(result.model)[key][mask == 0] == 0)
    stripped = strip_pruning(result.model)
    assert (stripped.get_layer("hidden").kernel.numpy() == 0).mean() == pytest.approx(
        0.75, abs=0.01
    )
    assert result.to_dict()["final_sparsity"] == pytest.approx(result.final_sparsity)


def test_late_rewinding_uses_weights_from_step_k(digits):
    seen, calls = [], []
    _run(digits, 3, seen, calls)
    init, round1, round2 = (s[2] for s in seen)
    key = "hidden/kernel"
    alive1 = round1[key] != 0
    assert not np.allclose(round1[key][alive1], init[key][alive1])  # not the initialization
    alive2 = round2[key] != 0
    np.testing.assert_array_equal(round2[key][alive2], round1[key][alive2])  # same step-3 weights


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_prune_remaining(scope):
    rng = np.random.default_rng(0)
    masks = {"a": np.ones((10, 10), "float32"), "b": (rng.random((5, 8)) < 0.5).astype("float32")}
    weights = {"a": rng.normal(size=(10, 10)) * 10, "b": rng.normal(size=(5, 8))}
    new = prune_remaining(masks, weights, 0.5, scope)
    alive_before = sum(m.sum() for m in masks.values())
    alive_after = sum(m.sum() for m in new.values())
    assert alive_after == pytest.approx(alive_before * 0.5, abs=1)
    for k in masks:
        assert np.all(new[k] <= masks[k])  # pruned weights never come back
    if scope == "layerwise":
        assert new["a"].sum() == 50
    else:  # "a" has much larger weights, so global pruning takes mostly from "b"
        assert new["a"].sum() > 50


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rounds": 0}, r"rounds must be a positive integer\. Received: rounds=0"),
        ({"rate": 1.0}, r"rate must be in \(0, 1\)\. Received: rate=1.0"),
        ({"rate": 0}, r"rate must be in \(0, 1\)"),
        ({"rewind_step": 10_000}, r"rewind_step must be in \[0, 12\].*Received: rewind_step=10000"),
        ({"rewind_step": -1}, r"rewind_step must be in \[0, 12\]"),
        ({"scope": "local"}, r"scope must be one of 'layerwise', 'global'"),
        ({"loss": None}, r"loss is required when the model is not compiled"),
    ],
    ids=["rounds", "rate-1", "rate-0", "rewind-late", "rewind-negative", "scope", "loss"],
)
def test_lottery_errors(digits, kwargs, match):
    args = dict(
        rounds=1,
        rate=0.5,
        rewind_step=0,
        epochs_per_round=1,
        batch_size=128,
        loss="sparse_categorical_crossentropy",
        optimizer="adam",
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        find_lottery_ticket(_mlp(), digits, **args)
