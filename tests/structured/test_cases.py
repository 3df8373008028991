"""Every coupling pattern through the same invariants (one tiny model per pattern)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity.schedules import ConstantSparsity
from keras_lean.structured import (
    prune_structured,
    prune_structured_gradually,
    shrink,
    structure_report,
)

from ._structured_models import CASES, make_input, randomize_norms, widths

IDS = sorted(CASES)


def _model(case):
    builder, kind = CASES[case]
    return randomize_norms(builder()), make_input(kind)


@pytest.mark.parametrize("case", IDS)
def test_ratio_zero_keeps_outputs(case):
    model, x = _model(case)
    pruned = prune_structured(model, 0.0)
    assert pruned is not model
    assert pruned.count_params() == model.count_params()
    np.testing.assert_allclose(pruned(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", IDS)
def test_half_ratio_shrinks_runs_saves_and_loads(case, tmp_path):
    model, x = _model(case)
    before = [w.numpy().copy() for w in model.weights]
    pruned = prune_structured(model, 0.5)
    # The caller's model is untouched.
    for w, b in zip(model.weights, before, strict=False):
        np.testing.assert_array_equal(w.numpy(), b)
    assert isinstance(pruned, keras.Sequential) == isinstance(model, keras.Sequential)
    assert pruned.count_params() < model.count_params()
    y = pruned(x)
    assert tuple(y.shape) == tuple(model(x).shape)
    assert np.all(np.isfinite(y))
    report = structure_report(model, pruned)
    assert report.flops_after < report.flops_before
    assert report.params_after == pruned.count_params()
    # The output layer is never narrowed.
    assert widths(pruned)["out"] == widths(model)["out"]
    path = tmp_path / f"{case}.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", IDS)
def test_gradual_masks_then_shrink_matches(case, tmp_path):
    model, x = _model(case)
    y = np.zeros((len(x), 3), "float32")
    masked = prune_structured_gradually(model, ConstantSparsity(0.5, begin_step=0, frequency=1))
    masked.compile(optimizer="sgd", loss="mse")
    masked.fit(x, y, epochs=2, batch_size=len(x), verbose=0)
    path = tmp_path / "masked.keras"
    masked.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded(x), masked(x), rtol=1e-5, atol=1e-5)
    small = shrink(reloaded)
    names = [type(layer).__name__ for layer in small.layers]
    assert not any(n.startswith("Masked") or n == "ChannelMask" for n in names)
    np.testing.assert_allclose(small(x), masked(x), rtol=1e-4, atol=1e-4)
    # Same widths as one-shot pruning at the schedule's sparsity.
    assert widths(small) == widths(prune_structured(model, 0.5))
