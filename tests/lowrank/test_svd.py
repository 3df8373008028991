"""Tests of keras_lean/lowrank/svd.py: LowRankDense and factorize."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.lowrank import FactorizationReport, LowRankDense, factorize


def _low_rank_kernel(in_dim, out_dim, rank, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(in_dim, rank)) @ rng.normal(size=(rank, out_dim))).astype("float32")


# ---------------------------------------------------------------- LowRankDense


def test_low_rank_dense_computes_x_u_v_plus_bias():
    layer = LowRankDense(5, rank=2, activation="relu")
    x = np.random.default_rng(0).normal(size=(3, 7)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    u, v, b = (w.numpy() for w in (layer.u, layer.v, layer.bias))
    np.testing.assert_allclose(y, np.maximum(x @ u @ v + b, 0), rtol=1e-5, atol=1e-6)
    assert layer.count_params() == 7 * 2 + 2 * 5 + 5
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), u @ v, rtol=1e-5)


def test_low_rank_dense_on_3d_inputs_and_no_bias():
    layer = LowRankDense(4, rank=3, use_bias=False)
    y = layer(np.ones((2, 5, 6), "float32"))
    assert tuple(y.shape) == (2, 5, 4)
    assert layer.bias is None and len(layer.weights) == 2


def test_low_rank_dense_keras_round_trip(tmp_path):
    inputs = keras.Input((6,))
    outputs = LowRankDense(4, rank=2, activation="tanh", name="lr")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    path = tmp_path / "lr.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: registered as keras_lean
    layer = loaded.get_layer("lr")
    assert isinstance(layer, LowRankDense)
    assert (layer.units, layer.rank, layer.use_bias) == (4, 2, True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_low_rank_dense_get_config_has_every_init_arg():
    layer = LowRankDense(4, 2, activation="relu", use_bias=False, kernel_initializer="ones",
                         bias_initializer="ones", name="x")  # fmt: skip
    clone = LowRankDense.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    for key in ("units", "rank", "activation", "use_bias", "kernel_initializer",
                "bias_initializer"):  # fmt: skip
        assert key in layer.get_config()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"units": 0, "rank": 1}, r"`units` must be a positive integer. Received: units=0"),
        ({"units": 4, "rank": 0}, r"`rank` must be a positive integer. Received: rank=0"),
        ({"units": 4, "rank": -2}, r"Received: rank=-2"),
        ({"units": 4, "rank": 1.5}, r"Received: rank=1.5"),
    ],
    ids=["units0", "rank0", "rank_negative", "rank_float"],
)
def test_low_rank_dense_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankDense(**kwargs)


def test_low_rank_dense_rank_above_min_dim_fails_at_build():
    layer = LowRankDense(4, rank=5, name="too_wide")
    with pytest.raises(ValueError, match=r"\[1, 4\] for layer 'too_wide'.*Received: rank=5"):
        layer(np.ones((1, 8), "float32"))


# ---------------------------------------------------------------- factorize


def test_factorize_exact_low_rank_kernel_is_lossless(mlp, x_mlp):
    mlp.get_layer("fc1").kernel.assign(_low_rank_kernel(12, 32, 3))
    new, report = factorize(mlp, energy=0.999, filters="fc1")
    layer = new.get_layer("fc1")
    assert isinstance(layer, LowRankDense) and layer.rank == 3
    (entry,) = report.layers
    assert entry.factorized and entry.rank == 3
    assert entry.params_before == 12 * 32 + 32
    assert entry.params_after == 3 * (12 + 32) + 32
    assert entry.relative_error < 1e-5
    np.testing.assert_allclose(new(x_mlp), mlp(x_mlp), rtol=1e-4, atol=1e-4)


def test_factorize_energy_picks_smallest_rank_reaching_it(mlp):
    kernel = mlp.get_layer("fc1").kernel.numpy()
    s = np.linalg.svd(kernel, compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    expected = int(np.argmax(share >= 0.5)) + 1
    _, report = factorize(mlp, energy=0.5, filters="fc1")
    (entry,) = report.layers
    assert entry.rank == expected
    assert entry.retained_energy >= 0.5
    assert entry.relative_error == pytest.approx(np.sqrt(1 - share[expected - 1]), rel=1e-6)
    # one rank less would not have kept the energy
    assert expected == 1 or share[expected - 2] < 0.5


def test_factorize_fixed_rank_matches_truncated_svd(mlp, x_mlp):
    new, report = factorize(mlp, rank=2, filters=["fc1", "fc2"])
    assert [e.rank for e in report.layers] == [2, 2]
    kernel = mlp.get_layer("fc2").kernel.numpy()
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vt[:2]
    got = keras.ops.convert_to_numpy(new.get_layer("fc2").kernel)
    np.testing.assert_allclose(got, best, rtol=1e-4, atol=1e-5)
    rel = np.linalg.norm(kernel - best) / np.linalg.norm(kernel)
    assert report.layers[1].relative_error == pytest.approx(rel, rel=1e-4)
    assert report.params_after < report.params_before
    assert new.count_params() == mlp.count_params() - (report.params_before - report.params_after)


def test_factorize_leaves_layers_that_would_not_shrink(mlp):
    new, report = factorize(mlp, energy=1.0)  # full rank never saves parameters
    assert not report.factorized
    assert all("saves nothing" in e.reason for e in report.layers)
    assert report.params_after == report.params_before
    assert not any(isinstance(layer, LowRankDense) for layer in new.layers)


def test_factorize_does_not_touch_the_original(mlp, x_mlp):
    before = [w.copy() for w in mlp.get_weights()]
    y = mlp(x_mlp)
    new, _ = factorize(mlp, rank=2, filters="fc")
    assert new is not mlp
    assert [type(layer).__name__ for layer in mlp.layers].count("Dense") == 3
    for a, b in zip(before, mlp.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mlp(x_mlp), y)


def test_factorize_keeps_other_layers_weights(cnn, x_cnn):
    new, report = factorize(cnn, rank=4, filters="fc1")
    assert [e.path for e in report.factorized] == ["fc1"]
    for name in ("conv", "bn", "head"):
        for a, b in zip(cnn.get_layer(name).get_weights(), new.get_layer(name).get_weights(),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)
    assert new.get_layer("fc1").activation is keras.activations.relu
    assert tuple(new(x_cnn).shape) == (5, 10)


def test_factorize_dense_like_einsum_and_skips_others():
    inputs = keras.Input((4, 16))
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(4, 16), bias_axes="d",
                                 activation="relu", name="dense_like")(inputs)  # fmt: skip
    x = keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 8), name="heads")(x)
    model = keras.Model(inputs, x)
    model.get_layer("dense_like").kernel.assign(_low_rank_kernel(16, 16, 2))
    new, report = factorize(model, energy=0.999)
    by_path = {e.path: e for e in report.layers}
    assert by_path["dense_like"].factorized and by_path["dense_like"].rank == 2
    assert not by_path["heads"].factorized
    assert "3 axes" in by_path["heads"].reason
    assert isinstance(new.get_layer("dense_like"), LowRankDense)
    x = np.random.default_rng(0).normal(size=(2, 4, 16)).astype("float32")
    np.testing.assert_allclose(new(x), model(x), rtol=1e-4, atol=1e-4)


def test_factorize_nested_model(x_mlp):
    inner = keras.Sequential([keras.Input((12,)), keras.layers.Dense(40, name="wide")],
                             name="inner")  # fmt: skip
    inputs = keras.Input((12,))
    outputs = keras.layers.Dense(3, name="out")(inner(inputs))
    model = keras.Model(inputs, outputs)
    inner.get_layer("wide").kernel.assign(_low_rank_kernel(12, 40, 2))
    new, report = factorize(model, rank=2, filters="wide")
    assert [e.path for e in report.factorized] == ["inner/wide"]
    layer = new.get_layer("inner").get_layer("wide")
    assert isinstance(layer, LowRankDense) and layer.rank == 2
    assert tuple(new(x_mlp).shape) == (5, 3)
    # The factors hold the kernel's SVD (a rank-2 kernel: exactly), and the other layers' weights
    # were copied, so the outputs are the original model's.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.kernel), inner.get_layer("wide").kernel.numpy(),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    np.testing.assert_array_equal(new.get_layer("out").kernel.numpy(),
                                  model.get_layer("out").kernel.numpy())  # fmt: skip
    np.testing.assert_allclose(new(x_mlp), model(x_mlp), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "build",
    [
        lambda: keras.Sequential(
            [
                keras.Input((12,)),
                keras.layers.Dense(40, name="wide"),
                keras.layers.Dense(3, name="out"),
            ]
        ),  # fmt: skip
        lambda: _built(
            keras.Sequential(
                [keras.layers.Dense(40, name="wide"), keras.layers.Dense(3, name="out")]
            )
        ),  # fmt: skip
    ],
    ids=["sequential_input", "sequential_build"],
)
def test_factorize_sequential_keeps_outputs(build, x_mlp):
    model = build()
    model.get_layer("wide").kernel.assign(_low_rank_kernel(12, 40, 2))
    new, report = factorize(model, rank=2, filters="wide")
    assert [e.path for e in report.factorized] == ["wide"]
    assert isinstance(new, keras.Sequential)
    np.testing.assert_allclose(new(x_mlp), model(x_mlp), rtol=1e-4, atol=1e-4)


def _built(model):
    model.build((None, 12))
    return model


def test_factorize_one_rank_skips_the_layers_it_does_not_fit(mlp, x_mlp):
    # fc1 12x32, fc2 32x24, head 24x4: rank 5 is wider than the head, and saves nothing on a
    # layer where 5 * (in + out) >= in * out.
    new, report = factorize(mlp, rank=5)
    assert [e.path for e in report.factorized] == ["fc1", "fc2"]
    assert report.skipped == {
        "head": "rank 5 is above min(in, out) = 4 of its 24x4 kernel",
    }
    assert report.to_dict()["skipped"] == report.skipped
    assert type(new.get_layer("head")) is keras.layers.Dense
    np.testing.assert_array_equal(new.get_layer("head").kernel.numpy(),
                                  mlp.get_layer("head").kernel.numpy())  # fmt: skip
    assert "left alone: rank 5 is above min(in, out) = 4" in str(report)

    _, report = factorize(mlp, rank=11)  # fits fc1 (12x32) by width but saves nothing there
    assert [e.path for e in report.factorized] == ["fc2"]
    assert report.skipped["fc1"] == "rank 11 saves nothing: 11*(12+32) >= 12*32"
    assert set(report.skipped) == {"fc1", "head"}


def test_factorize_leaves_a_lora_layer_alone_without_error(mlp):
    # A candidate left alone for a reason other than the rank does not make the rank an error:
    # the report says why it was skipped.
    from keras_lean.lowrank import apply_lora

    lora = apply_lora(mlp, rank=2, targets="fc1")
    _, report = factorize(lora, rank=2, filters="fc1")
    assert report.skipped == {"fc1": "LoRA is enabled on it (merge_lora first)"}


def test_factorized_model_round_trips_and_trains(cnn, x_cnn, tmp_path, digits):
    new, _ = factorize(cnn, rank=4, filters="fc1")
    path = tmp_path / "f.keras"
    new.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x_cnn, verbose=0), new.predict(x_cnn, verbose=0),
                               rtol=1e-6)  # fmt: skip
    x_train, y_train, _, _ = digits
    u_before = loaded.get_layer("fc1").u.numpy().copy()
    loaded.compile("adam", "sparse_categorical_crossentropy")
    loaded.fit(x_train[:64], y_train[:64], epochs=1, batch_size=32, verbose=0)
    assert not np.allclose(loaded.get_layer("fc1").u.numpy(), u_before)


def test_factorization_report_to_dict_and_str(mlp):
    _, report = factorize(mlp, rank=2)
    assert isinstance(report, FactorizationReport)
    data = report.to_dict()
    assert data["params_before"] == report.params_before
    assert [entry["path"] for entry in data["layers"]] == ["fc1", "fc2", "head"]
    text = str(report)
    assert "fc1" in text and f"{report.params_before} -> {report.params_after}" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, r"`rank` must be a positive integer or None. Received: rank=0"),
        ({"rank": -1}, r"Received: rank=-1"),
        ({"energy": 0.0}, r"`energy` must be in \(0, 1\]. Received: energy=0.0"),
        ({"energy": 1.5}, r"Received: energy=1.5"),
        (
            {"rank": 20},
            r"`rank` fits no layer: at rank 20 .*\(fc1 12x32, fc2 32x24, head 24x4\); the largest "
            r"rank that saves parameters on some layer is 13.*Received: rank=20",
        ),
        ({"filters": "fc[("}, r"invalid regular expression"),
    ],
    ids=["rank0", "rank_negative", "energy0", "energy_above_1", "rank_fits_no_layer", "bad_regex"],
)
def test_factorize_rejects_bad_args(mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factorize(mlp, **kwargs)


def test_factorize_rejects_non_models_and_subclassed():
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model"):
        factorize("model.keras")
    with pytest.raises(TypeError, match=r"`filters` must be None, a regex string"):
        factorize(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), filters=3)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.ones((1, 4), "float32"))
    with pytest.raises(ValueError, match=r"Sequential and functional models.*Received: a Sub"):
        factorize(sub)


def test_factorize_rejects_unbuilt_model():
    with pytest.raises(ValueError, match=r"`model` must be built"):
        factorize(keras.Sequential([keras.layers.Dense(2)]))
