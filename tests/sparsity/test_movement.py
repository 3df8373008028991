from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity import (
    ConstantSparsity,
    PolynomialDecay,
    PruneLowMagnitude,
    get_masks,
    prune_low_magnitude,
    pruning_wrappers,
    strip_pruning,
)
from keras_lean.sparsity.masks import keep_count
from keras_lean.sparsity.movement import (
    DEFAULTS,
    MovementSettings,
    movement_scores,
    reset_scores,
)

from ._sparsity_models import compile_model, random_data, small_cnn


def _linear(kernel, name="lin"):
    inputs = keras.Input((len(kernel),))
    layer = keras.layers.Dense(
        1,
        use_bias=False,
        name=name,
        kernel_initializer=keras.initializers.Constant(np.asarray(kernel, "float32")[:, None]),
    )
    return keras.Model(inputs, layer(inputs))


def _regression_data(true_kernel, steps, batch=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch * steps, len(true_kernel))).astype("float32")
    return x, x @ np.asarray(true_kernel, "float32")[:, None]


def _regression(criterion, jit, **kwargs):
    # w0, w1 start large and shrink towards 0.5; w2, w3 start small and grow towards 1.2.
    # One pruning event at step 6, when |w0| > |w2| still but w0 is shrinking.
    pruned = prune_low_magnitude(
        _linear([2.0, 2.0, 0.1, 0.1]),
        ConstantSparsity(0.5, begin_step=6, end_step=6),
        criterion=criterion,
        **kwargs,
    )
    pruned.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
    x, y = _regression_data([0.5, 0.5, 1.2, 1.2], 6)
    pruned.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return pruned


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_movement_keeps_growing_weights_over_large_shrinking_ones(jit):
    movement = get_masks(_regression("movement", jit, score_init="zeros"))["lin/kernel"].ravel()
    magnitude = get_masks(_regression("magnitude", jit))["lin/kernel"].ravel()
    np.testing.assert_array_equal(magnitude, [1, 1, 0, 0])
    np.testing.assert_array_equal(movement, [0, 0, 1, 1])


def test_movement_scores_accumulate_minus_weight_times_gradient():
    model = _regression("movement", False, score_init="zeros")
    wrapper = pruning_wrappers(model)[0]
    scores = movement_scores(wrapper)[0].ravel()
    assert scores[0] < 0 and scores[1] < 0  # moving towards zero
    assert scores[2] > 0 and scores[3] > 0  # moving away from zero
    reset_scores(wrapper)
    assert not wrapper.score_variables[0].numpy().any()


@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(0.01), lambda: keras.optimizers.Adam(0.01)],
    ids=["sgd", "adam"],
)
def test_score_lr_multiplier_scales_the_score_step(optimizer):
    x, y = _regression_data([0.5, -0.5, 1.2, 0.3], 1)

    def one_step(multiplier):
        keras.utils.set_random_seed(0)
        pruned = prune_low_magnitude(
            _linear([1.0, 1.0, 0.2, 0.2]),
            ConstantSparsity(0.5, begin_step=100),
            criterion="movement",
            score_init="zeros",
            score_lr_multiplier=multiplier,
        )
        pruned.compile(optimizer(), "mse")
        pruned.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        return movement_scores(pruning_wrappers(pruned)[0])[0]

    slow, fast = one_step(1.0), one_step(4.0)
    assert np.abs(slow).min() > 0
    np.testing.assert_allclose(fast, 4.0 * slow, rtol=1e-4)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_pruned_weights_get_score_gradients_and_keep_their_values(jit):
    # Masks fixed after the pruning event at step 1; plain SGD thereafter.
    pruned = prune_low_magnitude(
        _linear([1.0, 0.8, 0.6, 0.4]),
        ConstantSparsity(0.5, begin_step=1, end_step=1),
        criterion="movement",
    )
    pruned.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=jit)
    x, y = _regression_data([1.0, 0.8, 0.6, 0.4], 4)
    pruned.fit(x[:32], y[:32], batch_size=32, verbose=0)
    wrapper = pruning_wrappers(pruned)[0]
    mask = get_masks(pruned)["lin/kernel"].ravel()
    np.testing.assert_array_equal(mask, [1, 1, 0, 0])  # magnitude-initialised scores
    kernel_before = wrapper.layer.kernel.numpy().ravel().copy()
    scores_before = movement_scores(wrapper)[0].ravel().copy()
    pruned.fit(x[32:], y[32:], batch_size=32, verbose=0)
    kernel = wrapper.layer.kernel.numpy().ravel()
    scores = movement_scores(wrapper)[0].ravel()
    pruned_pos = mask == 0
    # pruned weights: dense values kept (not zeroed), no weight gradient (published STE) ...
    np.testing.assert_array_equal(kernel[pruned_pos], kernel_before[pruned_pos])
    assert np.all(kernel[pruned_pos] != 0)
    # ... but their scores learn: restoring them lowers the loss, so their scores rise
    assert np.all(scores[pruned_pos] > scores_before[pruned_pos])
    assert np.any(kernel[~pruned_pos] != kernel_before[~pruned_pos])


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_a_pruned_weight_regrows_when_its_score_rises(jit):
    # The two weights that matter start pruned (scores set low); the loss's straight-through
    # gradient raises their scores until TopK brings them back.
    pruned = prune_low_magnitude(
        _linear([1.0, 1.0, 0.05, 0.05]),
        ConstantSparsity(0.5, begin_step=1, frequency=1),
        criterion="movement",
        score_init="zeros",
    )
    wrapper = pruning_wrappers(pruned)[0]
    c = wrapper.movement.score_lr_multiplier
    wrapper.score_variables[0].assign(np.array([[-0.2], [-0.2], [0.2], [0.2]], "float32") / c)
    pruned.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
    x, y = _regression_data([1.0, 1.0, 0.0, 0.0], 40)
    masks = []
    for i in range(0, len(x), 32):  # one step per fit: variables are read between steps
        pruned.fit(x[i : i + 32], y[i : i + 32], batch_size=32, verbose=0)
        masks.append(get_masks(pruned)["lin/kernel"])
    np.testing.assert_array_equal(masks[0].ravel(), [0, 0, 1, 1])
    np.testing.assert_array_equal(masks[-1].ravel(), [1, 1, 0, 0])
    assert all(int(m.sum()) == 2 for m in masks)
    stripped = strip_pruning(pruned).get_layer("lin").kernel.numpy().ravel()
    np.testing.assert_allclose(stripped[:2], [1.0, 1.0], atol=0.05)
    np.testing.assert_array_equal(stripped[2:], [0.0, 0.0])


@pytest.mark.parametrize(
    "jit,m_by_n",
    [(False, None), pytest.param(True, None, marks=pytest.mark.slow), (False, (2, 4))],
    ids=["unstructured-graph", "unstructured-xla", "2-of-4-graph"],
)
def test_hard_movement_masks_follow_the_schedule_exactly(jit, m_by_n):
    from keras_lean.sparsity import check_m_by_n

    x, y = random_data(64)
    schedule = PolynomialDecay(0.0, 0.9, 2, 12, frequency=2)
    pruned = compile_model(
        prune_low_magnitude(small_cnn(), schedule, criterion="movement", sparsity_m_by_n=m_by_n),
        keras.optimizers.Adam(0.01),
        jit_compile=jit,
    )
    seen = {}
    for _ in range(4):
        for i in range(0, len(x), 16):  # one step per fit: variables are read between steps
            pruned.fit(x[i : i + 16], y[i : i + 16], batch_size=16, verbose=0)
            step = int(pruning_wrappers(pruned)[0].pruning_step.numpy())
            seen[step] = get_masks(pruned)
    if m_by_n is not None:
        assert all(check_m_by_n(pruned, 4, 2).values())
        return
    for step in (2, 6, 12, 16):
        _, sparsity = schedule(step)
        for key, mask in seen[step].items():
            expected = int(keep_count(mask.size, sparsity))
            assert int(mask.sum()) == expected, (step, key)
    assert int(seen[16]["hidden/kernel"].sum()) == max(round(0.1 * 144 * 16), 1)


def _soft_model(l1, jit=False, **kwargs):
    keras.utils.set_random_seed(0)
    x, y = random_data(64)
    pruned = compile_model(
        prune_low_magnitude(
            small_cnn(),
            PolynomialDecay(0.0, 0.5, 0, 12, frequency=2),
            criterion="soft_movement",
            l1_coefficient=l1,
            **kwargs,
        ),
        keras.optimizers.Adam(0.01),
        jit_compile=jit,
    )
    pruned.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
    return pruned


def test_soft_movement_thresholds_sigmoid_scores_and_l1_adds_sparsity():
    from keras import ops

    strong = _soft_model(50.0, jit=True, threshold=0.2)  # under XLA
    none = _soft_model(0.0, jit=False, threshold=0.2)
    for model in (strong, none):
        for wrapper in pruning_wrappers(model):
            # after the schedule's end the ramp is 1: tau = threshold
            assert float(wrapper._movement_ramp.numpy()) == pytest.approx(1.0)
            for score, mask in zip(movement_scores(wrapper), wrapper.mask_variables, strict=True):
                expected = ops.convert_to_numpy(ops.sigmoid(score)) > 0.2
                # masks are from the last pruning step (12); scores moved for 4 more steps
                assert (np.asarray(mask.numpy()) == expected).mean() > 0.9
    sparsity = {
        name: 1 - np.mean([m.mean() for m in get_masks(model).values()])
        for name, model in (("strong", strong), ("none", none))
    }
    assert sparsity["strong"] > sparsity["none"]
    assert sparsity["strong"] > 0.2


def test_movement_round_trips_through_keras_file_and_strip_bakes_the_mask(tmp_path):
    x, y = random_data(64)
    pruned = compile_model(
        prune_low_magnitude(
            small_cnn(),
            PolynomialDecay(0.0, 0.7, 0, 8, frequency=2),
            criterion="soft_movement",
            threshold=0.3,
            l1_coefficient=5.0,
            score_lr_multiplier=50.0,
        ),
        keras.optimizers.Adam(0.01),
    )
    pruned.fit(x, y, batch_size=16, epochs=2, verbose=0)
    path = tmp_path / "movement.keras"
    pruned.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0))
    for old, new in zip(pruning_wrappers(pruned), pruning_wrappers(loaded), strict=True):
        assert new.movement == old.movement
        own = [k for k in old.get_config() if k != "layer"]
        assert [new.get_config()[k] for k in own] == [old.get_config()[k] for k in own]
        for a, b in zip(movement_scores(old), movement_scores(new), strict=True):
            np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)  # keeps training after load

    stripped = strip_pruning(pruned)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0))
    for wrapper in pruning_wrappers(pruned):
        mask = np.asarray(wrapper.mask_variables[0].numpy())
        dense = wrapper.layer.kernel.numpy()
        assert mask.min() == 0 and np.all(dense[mask == 0] != 0)  # wrapped: values kept
        baked = stripped.get_layer(wrapper.layer.name).kernel.numpy()
        np.testing.assert_array_equal(baked, dense * mask)


def test_hard_movement_with_default_settings_round_trips(tmp_path):
    pruned = prune_low_magnitude(small_cnn(), criterion="movement")
    config = pruning_wrappers(pruned)[0].get_config()
    assert config["criterion"] == "movement" and config["score_init"] is None
    path = tmp_path / "m.keras"
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    assert pruning_wrappers(loaded)[0].movement == MovementSettings.resolve("movement")
    np.testing.assert_array_equal(
        pruning_wrappers(loaded)[0].score_variables[0].numpy(),
        pruning_wrappers(pruned)[0].score_variables[0].numpy(),
    )


def test_defaults_are_documented_per_criterion():
    hard = MovementSettings.resolve("movement")
    soft = MovementSettings.resolve("soft_movement")
    assert MovementSettings.resolve("magnitude") is None
    assert hard.score_lr_multiplier == DEFAULTS["movement"]["score_lr_multiplier"]
    assert hard.score_init == DEFAULTS["movement"]["score_init"] == "magnitude"
    assert soft.threshold == DEFAULTS["soft_movement"]["threshold"]
    assert soft.l1_coefficient == DEFAULTS["soft_movement"]["l1_coefficient"]
    assert soft.score_init == DEFAULTS["soft_movement"]["score_init"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"threshold": 0.1}, r"threshold applies to criterion='soft_movement' only"),
        (
            {"criterion": "movement", "l1_coefficient": 1.0},
            r"l1_coefficient applies to criterion='soft_movement' only.*criterion='movement'",
        ),
        ({"score_lr_multiplier": 5.0}, r"score_lr_multiplier applies to criterion='movement'"),
        ({"score_init": "zeros"}, r"score_init applies to criterion='movement'"),
        (
            {"criterion": "movement", "score_lr_multiplier": 0.0},
            r"score_lr_multiplier must be a finite number > 0.0",
        ),
        (
            {"criterion": "soft_movement", "threshold": 1.0},
            r"threshold must be a finite number in \(0.0, 1.0\). Received: threshold=1.0",
        ),
        (
            {"criterion": "soft_movement", "l1_coefficient": -1},
            r"l1_coefficient must be a finite number >= 0.0",
        ),
        (
            {"criterion": "movement", "score_init": "random"},
            r"score_init must be one of 'magnitude', 'zeros'. Received: score_init='random'",
        ),
        (
            {"criterion": "soft_movement", "sparsity_m_by_n": (2, 4)},
            r"soft_movement.*cannot be combined with sparsity_m_by_n or block_size",
        ),
    ],
    ids=[
        "threshold-magnitude",
        "l1-hard",
        "lr-magnitude",
        "init-magnitude",
        "lr-zero",
        "threshold-one",
        "l1-negative",
        "init-unknown",
        "soft-m-by-n",
    ],
)
def test_movement_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneLowMagnitude(small_cnn().get_layer("hidden"), **kwargs)


def test_soft_movement_needs_a_schedule_with_a_final_sparsity():
    schedule = ConstantSparsity(0.5)
    schedule.target_sparsity = None
    with pytest.raises(ValueError, match=r"soft_movement.*needs a schedule with a final"):
        PruneLowMagnitude(small_cnn().get_layer("hidden"), schedule, criterion="soft_movement")


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="MirroredStrategy is TF's")
@pytest.mark.parametrize("criterion", ["movement", "soft_movement"])
def test_movement_under_mirrored_strategy_matches_single_device(criterion):
    import tensorflow as tf

    x, y = random_data(64)
    schedule = PolynomialDecay(0.2, 0.8, 0, 6, frequency=2)

    def train(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = compile_model(
                prune_low_magnitude(small_cnn(), schedule, criterion=criterion),
                keras.optimizers.SGD(0.1, momentum=0.9),
            )
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        return model

    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    single, mirrored = train(tf.distribute.get_strategy()), train(strategy)
    for wrapper in pruning_wrappers(mirrored):
        for v in [*wrapper.mask_variables, *wrapper.score_variables]:
            replicas = strategy.experimental_local_results(v.value)
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
    for key, mask in get_masks(single).items():
        np.testing.assert_array_equal(get_masks(mirrored)[key], mask, err_msg=key)
    for a, b in zip(pruning_wrappers(single), pruning_wrappers(mirrored), strict=True):
        for s, m in zip(movement_scores(a), movement_scores(b), strict=True):
            np.testing.assert_allclose(m, s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["movement", "soft_movement"])
def test_movement_trains_under_mixed_precision(criterion):
    # Variables read as float16 inside the layer: the ramp, masks and L1 loss must still fit.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        pruned = compile_model(
            prune_low_magnitude(
                small_cnn(), PolynomialDecay(0.0, 0.5, 0, 4, frequency=2), criterion=criterion
            ),
            keras.optimizers.Adam(0.01),
        )
        x, y = random_data(64)
        history = pruned.fit(x, y, batch_size=16, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(history.history["loss"][-1])
    if criterion == "movement":
        for key, mask in get_masks(pruned).items():
            assert int(mask.sum()) == max(round(mask.size * 0.5), 1), key
