"""Gradual group masks: schedule semantics, lockstep, XLA, serialization, errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity.schedules import ConstantSparsity, PolynomialDecay
from keras_lean.structured import (
    ChannelMask,
    MaskedLayerNormalization,
    keep_count,
    prune_structured_gradually,
    shrink,
)

from ._structured_models import dense_mlp, make_input, residual, transformer

L = keras.layers


@pytest.mark.parametrize(
    "size, sparsity, round_to, min_channels, expected",
    [
        (10, 0.0, 1, 1, 10),
        (10, 0.3, 1, 1, 7),
        (10, 0.55, 1, 1, 5),
        (10, 0.5, 8, 1, 8),
        (16, 0.5, 8, 1, 8),
        (10, 0.95, 1, 3, 3),
        (2, 0.9, 1, 5, 2),
        (12, 0.7, 1, 1, 4),
    ],
)
def test_keep_count(size, sparsity, round_to, min_channels, expected):
    assert keep_count(size, sparsity, round_to, min_channels) == expected


def _fit_steps(model, x, y, steps, jit=False):
    model.compile(optimizer="adam", loss="mse", jit_compile=jit)
    model.fit(x, y, epochs=steps, batch_size=len(x), verbose=0)


def test_masks_follow_the_schedule_step_by_step():
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, power=1, frequency=1)
    masked = prune_structured_gradually(dense_mlp(), schedule)
    x, y = make_input("vec10", 8), np.zeros((8, 3), "float32")
    masked.compile(optimizer="sgd", loss="mse")
    mask = masked.get_layer("d1_mask")
    for step in range(6):
        masked.train_on_batch(x, y)
        sparsity = float(schedule(step)[1])
        assert int(mask.pruning_step.numpy()) == step + 1
        assert int(mask.mask.numpy().sum()) == keep_count(12, sparsity)


def test_frequency_only_updates_on_pruning_steps():
    masked = prune_structured_gradually(
        dense_mlp(), ConstantSparsity(0.5, begin_step=2, frequency=3)
    )
    x, y = make_input("vec10", 8), np.zeros((8, 3), "float32")
    masked.compile(optimizer="sgd", loss="mse")
    kept = []
    for _ in range(3):
        masked.train_on_batch(x, y)
        kept.append(int(masked.get_layer("d1_mask").mask.numpy().sum()))
    assert kept == [12, 12, 6]  # steps 0 and 1 are before begin_step; step 2 prunes


def test_coupled_channels_switch_off_in_lockstep_under_xla():
    model = residual(L.Add)()
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=3, frequency=1)
    masked = prune_structured_gradually(model, schedule)
    x, y = make_input("img8x3", 8), np.zeros((8, 3), "float32")
    names = ["stem_mask", "stem_bn_mask", "branch_mask", "branch_bn_mask"]
    masked.compile(optimizer="adam", loss="mse", jit_compile=True)
    for _ in range(4):
        masked.train_on_batch(x, y)
        masks = [masked.get_layer(n).mask.numpy() for n in names]
        for m in masks[1:]:
            np.testing.assert_array_equal(m, masks[0])
    assert masks[0].sum() == 4
    # Masked channels are exact zeros after the merge.
    probe = keras.Model(masked.inputs, masked.get_layer("merge").output)
    out = probe(x).numpy()
    assert np.all(out[..., masks[0] == 0] == 0.0)
    assert np.any(out[..., masks[0] == 1] != 0.0)


def test_resume_keeps_step_and_masks(tmp_path):
    masked = prune_structured_gradually(
        transformer(), PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
    )
    x, y = make_input("tokens6", 8), np.zeros((8, 3), "float32")
    _fit_steps(masked, x, y, 3)
    path = tmp_path / "mid.keras"
    masked.save(path)
    loaded = keras.models.load_model(path)
    for name in ("mha", "ln1", "emb_mask"):
        a, b = masked.get_layer(name), loaded.get_layer(name)
        assert int(a.pruning_step.numpy()) == int(b.pruning_step.numpy()) == 3
        np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
    assert isinstance(loaded.get_layer("ln1"), MaskedLayerNormalization)
    _fit_steps(loaded, x, y, 3)
    assert loaded.get_layer("mha").mask.numpy().sum() == 2
    small = shrink(loaded)
    assert small.get_layer("mha").num_heads == 2
    np.testing.assert_allclose(small(x), loaded(x), rtol=1e-4, atol=1e-4)


def test_channel_mask_config_round_trip():
    layer = ChannelMask([0, 2, 1], [3, 3, 3], [1.0, 1.0, 0.5], ConstantSparsity(0.5), round_to=2)
    clone = ChannelMask.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.pruning_schedule == ConstantSparsity(0.5)


def test_tfmot_schedules_are_accepted():
    from keras_lean.sparsity.schedules import import_tfmot

    tfmot = import_tfmot()
    masked = prune_structured_gradually(
        dense_mlp(), tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1)
    )
    assert masked.get_layer("d1_mask").pruning_schedule == ConstantSparsity(0.5, 0, -1, 1)


def test_mask_errors():
    with pytest.raises(ValueError, match="one entry per channel"):
        ChannelMask([0, 1], [2], [1.0], ConstantSparsity(0.5))
    with pytest.raises(ValueError, match="round_to must be an integer >= 1"):
        ChannelMask([0], [1], [1.0], ConstantSparsity(0.5), round_to=0)
    with pytest.raises(ValueError, match="has 2 channels but its input has 3"):
        ChannelMask([0, 1], [2, 2], [1.0, 1.0], ConstantSparsity(0.5))(keras.Input((3,)))
    with pytest.raises(ValueError, match="pruning_schedule"):
        prune_structured_gradually(dense_mlp(), "cubic")


def test_shrink_of_a_plain_model_is_a_copy():
    model = dense_mlp()
    x = make_input("vec10")
    small = shrink(model)
    assert small is not model and small.count_params() == model.count_params()
    np.testing.assert_allclose(small(x), model(x), atol=1e-6)


def test_gradual_global_ranking_reaches_the_target():
    masked = prune_structured_gradually(
        dense_mlp(), ConstantSparsity(0.5, begin_step=0, frequency=1), global_ranking=True
    )
    x, y = make_input("vec10", 8), np.zeros((8, 3), "float32")
    _fit_steps(masked, x, y, 1)
    small = shrink(masked)
    assert small.get_layer("d1").units + small.get_layer("d2").units == 10


def test_masked_model_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    masked = prune_structured_gradually(transformer(), ConstantSparsity(0.5, frequency=1))
    path = tmp_path / "masked.keras"
    masked.save(path)
    code = (
        "import keras, keras_lean.structured\n"
        f"m = keras.models.load_model({str(path)!r})\n"
        "print(type(m.get_layer('mha')).__name__, type(m.get_layer('ln1')).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["MaskedMultiHeadAttention", "MaskedLayerNormalization"]


def test_gradual_prunes_through_a_nested_model():
    from ._structured_models import nested

    model = nested()
    masked = prune_structured_gradually(model, ConstantSparsity(0.5, begin_step=0, frequency=1))
    assert "inner" not in [layer.name for layer in masked.layers]  # inlined, then masked
    x, y = make_input("vec10", 8), np.zeros((8, 3), "float32")
    _fit_steps(masked, x, y, 2)
    small = shrink(masked)
    assert small.get_layer("inner_d").units == 3 and small.get_layer("d1").units == 4
    np.testing.assert_allclose(small(x), masked(x), rtol=1e-4, atol=1e-4)
