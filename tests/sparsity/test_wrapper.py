from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lean.sparsity import (
    ConstantSparsity,
    PolynomialDecay,
    PruneLowMagnitude,
    get_masks,
    prune_low_magnitude,
    pruning_wrappers,
    set_masks,
    strip_pruning,
)

from ._sparsity_models import compile_model, random_data, small_cnn


def _seq(input_shape, *layers, dtype="float32"):
    inputs = keras.Input(input_shape, dtype=dtype)
    x = inputs
    for layer in layers:
        x = layer(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def _mha_model():
    inputs = keras.Input((5, 8))
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x)))


CASES = {
    "dense": (lambda: _seq((12,), keras.layers.Dense(8, name="target")), (12,), "float32"),
    "conv1d": (lambda: _seq((10, 3), keras.layers.Conv1D(4, 3, name="target")), (10, 3), "float32"),
    "conv2d": (
        lambda: _seq((6, 6, 2), keras.layers.Conv2D(4, 3, name="target")),
        (6, 6, 2),
        "float32",
    ),
    "conv3d": (
        lambda: _seq((4, 4, 4, 2), keras.layers.Conv3D(2, 2, name="target")),
        (4, 4, 4, 2),
        "float32",
    ),
    "depthwise": (
        lambda: _seq((6, 6, 4), keras.layers.DepthwiseConv2D(3, name="target")),
        (6, 6, 4),
        "float32",
    ),
    "separable": (
        lambda: _seq((6, 6, 4), keras.layers.SeparableConv2D(8, 3, name="target")),
        (6, 6, 4),
        "float32",
    ),
    "einsum": (
        lambda: _seq((12,), keras.layers.EinsumDense("ab,bc->ac", output_shape=8, name="target")),
        (12,),
        "float32",
    ),
    "embedding": (
        lambda: _seq((5,), keras.layers.Embedding(30, 8, name="target"), dtype="int32"),
        (5,),
        "int32",
    ),
    "mha": (_mha_model, (5, 8), "float32"),
}


def _inputs(shape, dtype, n=16):
    rng = np.random.default_rng(0)
    if dtype == "int32":
        return rng.integers(0, 30, (n, *shape)).astype("int32")
    return rng.normal(size=(n, *shape)).astype("float32")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_every_prunable_type_prunes_and_round_trips(case, tmp_path):
    make, shape, dtype = CASES[case]
    pruned = prune_low_magnitude(make(), ConstantSparsity(0.5, frequency=1))
    compile_model(pruned, keras.optimizers.Adam(0.01))
    x, y = _inputs(shape, dtype), np.arange(16) % 2
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for wrapper in pruning_wrappers(pruned):
        assert int(wrapper.pruning_step.numpy()) == 2
        for w, m in zip(wrapper.pruned_weights, wrapper.mask_variables, strict=True):
            mask = m.numpy()
            assert abs(1 - mask.mean() - 0.5) <= 1.0 / mask.size + 1e-6, (wrapper.name, w.name)
            assert np.all(w.variable.numpy()[mask == 0] == 0.0)
    path = tmp_path / f"{case}.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )
    for key, mask in get_masks(pruned).items():
        np.testing.assert_array_equal(get_masks(loaded)[key], mask)


def test_separable_prunes_both_kernels():
    pruned = prune_low_magnitude(CASES["separable"][0](), filters=["target"])
    names = [w.name for w in pruning_wrappers(pruned)[0].pruned_weights]
    assert names == ["depthwise_kernel", "pointwise_kernel"]


class _ZeroCheck(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.checked = 0

    def on_train_batch_end(self, batch, logs=None):
        for wrapper in pruning_wrappers(self.model):
            for w, m in zip(wrapper.pruned_weights, wrapper.mask_variables, strict=True):
                pruned = w.variable.numpy()[m.numpy() == 0]
                assert pruned.size > 0 and np.all(pruned == 0.0), wrapper.name
        self.checked += 1


@pytest.mark.parametrize(
    "optimizer,jit",
    [
        (lambda: keras.optimizers.Adam(0.05), False),
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9), False),
        (lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1), True),
    ],
    ids=["adam", "sgd-momentum", "adamw-xla"],
)
def test_pruned_weights_stay_exactly_zero_after_every_step(optimizer, jit):
    x, y = random_data(96)
    pruned = prune_low_magnitude(small_cnn(), PolynomialDecay(0.3, 0.8, 1, 9, frequency=2))
    compile_model(pruned, optimizer(), jit_compile=jit)
    check = _ZeroCheck()
    pruned.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[check])
    assert check.checked == 12
    masks = get_masks(pruned)
    assert all(abs(1 - m.mean() - 0.8) < 0.02 for m in masks.values())


def test_forward_pass_uses_masked_weights():
    x, _ = random_data(8)
    model = small_cnn()
    pruned = prune_low_magnitude(model, pruning_schedule=None, update_masks=False)
    rng = np.random.default_rng(0)
    masks = {k: (rng.random(m.shape) < 0.5).astype("float32") for k, m in get_masks(pruned).items()}
    set_masks(pruned, masks, apply=False)  # weights untouched: masking must happen in call
    kernel = pruning_wrappers(pruned)[1].layer.kernel.numpy()
    assert np.count_nonzero(kernel) > masks["hidden/kernel"].sum()
    stripped = strip_pruning(pruned)  # multiplies weights by masks
    np.testing.assert_allclose(
        pruned.predict(x, verbose=0), stripped.predict(x, verbose=0), atol=1e-5
    )
    assert not np.allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-3)


def test_step_counts_in_graph_without_callback_and_masks_follow_schedule():
    x, y = random_data(64)
    schedule = ConstantSparsity(0.6, begin_step=3, end_step=9, frequency=3)
    pruned = compile_model(prune_low_magnitude(small_cnn(), schedule))
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            w = pruning_wrappers(self.model)[1]
            seen.append(
                (int(w.pruning_step.numpy()), float(1 - w.mask_variables[0].numpy().mean()))
            )

    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[Record()])
    assert [s for s, _ in seen] == list(range(1, 17))
    assert all(sp == 0.0 for s, sp in seen if s < 3)
    assert all(abs(sp - 0.6) < 0.01 for s, sp in seen if s >= 3)


def test_resume_from_keras_file_gives_same_step_and_masks(tmp_path):
    x, y = random_data(64)
    schedule = PolynomialDecay(0.0, 0.9, 0, 14, frequency=2)

    def run(model, epochs):
        model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False)

    straight = compile_model(prune_low_magnitude(small_cnn(), schedule))
    keras.utils.set_random_seed(1)
    run(straight, 4)

    keras.utils.set_random_seed(0)
    interrupted = compile_model(prune_low_magnitude(small_cnn(), schedule))
    keras.utils.set_random_seed(1)
    run(interrupted, 2)
    interrupted.save(tmp_path / "mid.keras")
    resumed = keras.models.load_model(tmp_path / "mid.keras")
    assert [int(w.pruning_step.numpy()) for w in pruning_wrappers(resumed)] == [8, 8, 8]
    assert pruning_wrappers(resumed)[0].pruning_schedule == schedule
    run(resumed, 2)
    assert [int(w.pruning_step.numpy()) for w in pruning_wrappers(resumed)] == [16, 16, 16]
    for key, mask in get_masks(straight).items():
        np.testing.assert_array_equal(get_masks(resumed)[key], mask, err_msg=key)


@pytest.mark.parametrize("criterion", ["magnitude", "movement"])
def test_mirrored_strategy_matches_single_device(criterion):
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
    assert len(devices) == 2
    strategy = tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    single, mirrored = train(tf.distribute.get_strategy()), train(strategy)
    for wrapper in pruning_wrappers(mirrored):
        for m in wrapper.mask_variables:
            replicas = strategy.experimental_local_results(m.value)
            assert len(replicas) == 2
            np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
    for key, mask in get_masks(single).items():
        np.testing.assert_array_equal(get_masks(mirrored)[key], mask, err_msg=key)
    assert [int(w.pruning_step.numpy()) for w in pruning_wrappers(mirrored)] == [8, 8, 8]


def test_user_constraint_is_kept():
    inputs = keras.Input((6,))
    layer = keras.layers.Dense(4, kernel_constraint=keras.constraints.MaxNorm(0.1), name="d")
    model = keras.Model(inputs, layer(inputs))
    pruned = compile_model(
        prune_low_magnitude(model, ConstantSparsity(0.5, frequency=1)), keras.optimizers.SGD(1.0)
    )
    pruned.fit(np.ones((8, 6), "float32"), np.zeros(8, "int32"), verbose=0)
    kernel = pruning_wrappers(pruned)[0].layer.kernel.numpy()
    assert np.all(np.sqrt((kernel**2).sum(axis=0)) <= 0.1 + 1e-5)
    assert (kernel == 0).mean() >= 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": (1, 4), "layer": "conv"}, r"block_size \(1, 4\) needs 2-D weights.*'conv'"),
        ({"block_size": (1, 32), "layer": "hidden"}, r"block_size \(1, 32\) does not fit kernel"),
        ({"sparsity_m_by_n": (4, 2)}, r"sparsity_m_by_n \(m, n\) needs 0 < m < n"),
        ({"sparsity_m_by_n": (0, 4)}, r"needs 0 < m < n"),
        ({"sparsity_m_by_n": (2, 4), "block_size": (2, 2)}, r"cannot be combined"),
        ({"block_size": (0, 2)}, r"block_size must have positive entries"),
        ({"block_pooling_type": "MEAN"}, r"block_pooling_type must be one of 'AVG', 'MAX'"),
        ({"criterion": "taylor"}, r"criterion must be one of 'magnitude', 'movement'"),
        (
            {"pruning_schedule": ConstantSparsity(0.5), "layer": "flatten"},
            r"'flatten'.*cannot be pruned",
        ),
    ],
    ids=[
        "block-not-2d",
        "block-too-big",
        "m-gt-n",
        "m-zero",
        "mn-and-block",
        "block-zero",
        "pooling",
        "criterion",
        "not-prunable",
    ],
)
def test_wrapper_errors(kwargs, match):
    model = small_cnn()
    layer = model.get_layer(kwargs.pop("layer", "hidden"))
    with pytest.raises(ValueError, match=match):
        PruneLowMagnitude(layer, **kwargs)


def test_double_wrap_is_an_error():
    wrapped = PruneLowMagnitude(keras.layers.Dense(3, name="d"))
    with pytest.raises(ValueError, match=r"'prune_low_magnitude_d' is already wrapped"):
        PruneLowMagnitude(wrapped)


def test_wrapper_inside_a_user_built_sequential(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            PruneLowMagnitude(keras.layers.Dense(8, name="a"), ConstantSparsity(0.5, frequency=1)),
            keras.layers.Dense(2, name="b"),
        ]
    )
    compile_model(model)
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    model.fit(x, np.arange(16) % 2, verbose=0)
    assert get_masks(model)["a/kernel"].mean() == 0.5
    model.save(tmp_path / "seq.keras")
    loaded = keras.models.load_model(tmp_path / "seq.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
