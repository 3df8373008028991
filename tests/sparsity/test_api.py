from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_lean.sparsity import (
    ConstantSparsity,
    PruneLowMagnitude,
    SparsityReport,
    check_m_by_n,
    get_masks,
    prune_low_magnitude,
    pruning_wrappers,
    set_masks,
    sparsity_report,
    strip_pruning,
)

from ._sparsity_models import compile_model, random_data, small_cnn


def _wrapped_names(model):
    return sorted(w.layer.name for w in pruning_wrappers(model))


def test_model_is_cloned_not_mutated():
    model = small_cnn()
    before = [w.copy() for w in model.get_weights()]
    pruned = compile_model(prune_low_magnitude(model, ConstantSparsity(0.7, frequency=1)))
    pruned.fit(*random_data(32), verbose=0)
    assert all(not isinstance(layer, PruneLowMagnitude) for layer in model.layers)
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    assert model.get_layer("hidden").kernel.constraint is None
    assert _wrapped_names(pruned) == ["conv", "hidden", "logits"]


def test_weights_are_copied_into_the_clone():
    model = small_cnn()
    pruned = prune_low_magnitude(model, ConstantSparsity(0.5))
    x, _ = random_data(8)
    np.testing.assert_allclose(model.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize(
    "filters,expected",
    [
        (None, ["conv", "hidden", "logits"]),
        (["hid*"], ["hidden"]),
        (
            lambda layer: (
                layer.name != "logits"
                and isinstance(layer, keras.layers.Dense | keras.layers.Conv2D)
            ),
            ["conv", "hidden"],
        ),
        ({"conv": None, "*": {}}, ["hidden", "logits"]),
    ],
    ids=["all", "patterns", "callable", "dict-skip"],
)
def test_filters_select_layers(filters, expected):
    assert _wrapped_names(prune_low_magnitude(small_cnn(), filters=filters)) == expected


def _cnn_layers():
    return [
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ]


def _sequential_cnn():
    return keras.Sequential([keras.Input((8, 8, 1)), *_cnn_layers()], name="seq")


def _nested_in_functional():
    """conv and flatten live in a Sequential used as a layer of a functional model."""
    conv, flatten, hidden, logits = _cnn_layers()
    block = keras.Sequential([keras.Input((8, 8, 1)), conv, flatten], name="block")
    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, logits(hidden(block(inputs))), name="outer")


def _nested_in_sequential():
    """hidden lives in a functional model used inside a Sequential."""
    conv, flatten, hidden, logits = _cnn_layers()
    inner_in = keras.Input((144,))
    block = keras.Model(inner_in, hidden(inner_in), name="block")
    return keras.Sequential([keras.Input((8, 8, 1)), conv, flatten, block, logits], name="seq")


MODEL_SHAPES = [_sequential_cnn, small_cnn, _nested_in_functional, _nested_in_sequential]
SHAPE_IDS = ["sequential", "functional", "nested-in-functional", "nested-in-sequential"]


@pytest.mark.parametrize("make", MODEL_SHAPES, ids=SHAPE_IDS)
def test_every_prunable_layer_is_wrapped_nested_ones_too(make):
    model = make()
    pruned = compile_model(prune_low_magnitude(model, ConstantSparsity(0.75, frequency=1)))
    assert _wrapped_names(pruned) == ["conv", "hidden", "logits"]
    x, y = random_data(32)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    pruned.fit(x, y, batch_size=16, verbose=0)
    stripped = strip_pruning(pruned)
    assert not pruning_wrappers(stripped)
    rows = {r.name: r.sparsity for r in sparsity_report(stripped).layers}
    assert set(rows) == {"conv", "hidden", "logits"}
    assert all(abs(v - 0.75) < 0.02 for v in rows.values()), rows
    assert not pruning_wrappers(model)  # the caller's model is untouched
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize("make", MODEL_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(
    "filters,expected",
    [
        (["hidden"], ["hidden"]),
        (["con*", "hid*"], ["conv", "hidden"]),
        ({"conv": None, "*": {}}, ["hidden", "logits"]),
        ({"logits": {"block_size": (1, 2)}, "*": None}, ["logits"]),
        (["*"], ["conv", "hidden", "logits"]),
    ],
    ids=["name", "patterns", "dict-star", "dict-star-skips", "list-star"],
)
def test_filters_reach_nested_layers_and_star_skips_unprunable_layers(make, filters, expected):
    pruned = prune_low_magnitude(make(), ConstantSparsity(0.5), filters=filters)
    assert _wrapped_names(pruned) == expected


@pytest.mark.parametrize("make", MODEL_SHAPES, ids=SHAPE_IDS)
def test_a_wildcard_that_selects_only_unprunable_layers_is_an_error(make):
    with pytest.raises(
        ValueError, match=r"\['flat\*'\] matched no prunable layer of the model, only: flatten"
    ):
        prune_low_magnitude(make(), filters=["flat*"])
    with pytest.raises(ValueError, match=r"Layer 'flatten' of type Flatten cannot be pruned"):
        prune_low_magnitude(make(), filters={"flatten": {}, "*": {}})


def test_a_nested_subclassed_model_with_prunable_layers_is_refused():
    class Block(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4, name="inside")

        def call(self, x):
            return self.dense(x)

    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2)(Block(name="blk")(inputs)), name="m")
    with pytest.raises(ValueError, match=r"nested model 'blk' \(Block\).*\['inside'\]"):
        prune_low_magnitude(model)


def test_filters_give_per_layer_parameters():
    pruned = prune_low_magnitude(
        small_cnn(),
        ConstantSparsity(0.5),
        filters={
            "hidden": {"pruning_schedule": ConstantSparsity(0.9), "block_size": (1, 4)},
            "logits": {},
        },
    )
    wrappers = {w.layer.name: w for w in pruning_wrappers(pruned)}
    assert wrappers["hidden"].pruning_schedule == ConstantSparsity(0.9)
    assert wrappers["hidden"].block_size == (1, 4)
    assert wrappers["logits"].pruning_schedule == ConstantSparsity(0.5)
    callable_pruned = prune_low_magnitude(
        small_cnn(),
        filters=lambda layer: {"criterion": "movement"} if layer.name == "hidden" else None,
    )
    assert [w.criterion for w in pruning_wrappers(callable_pruned)] == ["movement"]


def test_layer_and_list_inputs():
    layer = keras.layers.Dense(3, name="solo")
    layer.build((None, 4))
    wrapped = prune_low_magnitude(layer)
    assert isinstance(wrapped, PruneLowMagnitude) and wrapped.layer is not layer
    assert layer.kernel.constraint is None
    both = prune_low_magnitude([keras.layers.Dense(2), keras.layers.Conv1D(2, 2)])
    assert [type(w.layer).__name__ for w in both] == ["Dense", "Conv1D"]


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: prune_low_magnitude(small_cnn(), filters=["flatten"]),
            r"Layer 'flatten' of type Flatten cannot be pruned",
        ),
        (
            lambda: prune_low_magnitude(small_cnn(), filters=["nope*"]),
            r"pattern\(s\) \['nope\*'\] matched no layer",
        ),
        (
            lambda: prune_low_magnitude(small_cnn(), filters={"hidden": {"sparsity": 0.5}}),
            r"Unknown pruning option\(s\) \['sparsity'\] for layer 'hidden'",
        ),
        (
            lambda: prune_low_magnitude(prune_low_magnitude(small_cnn())),
            r"'prune_low_magnitude_conv' is already wrapped",
        ),
        (
            lambda: prune_low_magnitude(keras.layers.Flatten(name="f")),
            r"'f' of type Flatten cannot",
        ),
        (lambda: prune_low_magnitude("model"), r"to_prune must be a Keras 3 model"),
        (lambda: prune_low_magnitude(small_cnn(), filters=3), r"filters must be None, a callable"),
        (
            lambda: prune_low_magnitude(small_cnn(), ConstantSparsity(0.5), sparsity=0.5),
            r"Unknown argument\(s\) \['sparsity'\]",
        ),
    ],
    ids=[
        "non-prunable",
        "no-match",
        "bad-override",
        "already-wrapped",
        "layer-not-prunable",
        "not-keras",
        "bad-filters",
        "bad-kwarg",
    ],
)
def test_prune_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_tf_keras_model_is_refused_with_advice():
    before = os.environ.get("TF_USE_LEGACY_KERAS")
    import tf_keras

    legacy = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,), name="old")])
    with pytest.raises(
        ValueError,
        match=r"tf_keras \(legacy Keras 2\).*import keras.*tensorflow_model_optimization",
    ):
        prune_low_magnitude(legacy)
    with pytest.raises(ValueError, match=r"tf_keras"):
        prune_low_magnitude(legacy.layers[0])
    assert os.environ.get("TF_USE_LEGACY_KERAS") == before


def test_strip_pruning_same_outputs_zeros_in_place_and_report():
    x, y = random_data(64)
    pruned = compile_model(prune_low_magnitude(small_cnn(), ConstantSparsity(0.8, frequency=1)))
    pruned.fit(x, y, batch_size=16, verbose=0)
    stripped = strip_pruning(pruned)
    assert not any(isinstance(layer, PruneLowMagnitude) for layer in stripped.layers)
    assert pruning_wrappers(pruned)  # the wrapped model is untouched
    np.testing.assert_allclose(
        stripped.predict(x, verbose=0), pruned.predict(x, verbose=0), atol=1e-6
    )
    wrapped_report, plain_report = sparsity_report(pruned), sparsity_report(stripped)
    assert isinstance(wrapped_report, SparsityReport)
    assert wrapped_report.to_dict() == plain_report.to_dict()
    assert [r.name for r in plain_report.layers] == ["conv", "hidden", "logits"]
    hidden = plain_report.layers[1]
    assert hidden.params == 144 * 16 and abs(hidden.sparsity - 0.8) < 0.01
    assert plain_report.total_params == small_cnn().count_params()
    assert abs(plain_report.sparsity - 0.8) < 0.01
    assert plain_report.raw_bytes == 4 * plain_report.total_params
    dense_report = sparsity_report(small_cnn())
    assert dense_report.sparsity == 0.0
    assert plain_report.gzip_bytes < 0.6 * dense_report.gzip_bytes


def test_m_by_n_end_to_end_and_check():
    x, y = random_data(64)
    model = small_cnn()
    # conv has one input channel: a group of one weight trivially complies
    assert check_m_by_n(model, 4, 2) == {"conv": True, "hidden": False, "logits": False}
    pruned = compile_model(
        prune_low_magnitude(
            model,
            ConstantSparsity(0.5, frequency=2),
            sparsity_m_by_n=(2, 4),
            filters=["hidden", "logits"],
        )
    )
    pruned.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert check_m_by_n(pruned, n=4, m=2) == {"conv": True, "hidden": True, "logits": True}
    assert check_m_by_n(strip_pruning(pruned), 4, 2)["hidden"]
    kernel = strip_pruning(pruned).get_layer("hidden").kernel.numpy()
    groups = (kernel.T.reshape(16, -1, 4) != 0).sum(-1)
    assert groups.max() <= 2
    with pytest.raises(ValueError, match=r"m must be smaller than n\. Received: m=4, n=4"):
        check_m_by_n(pruned, 4, 4)
    with pytest.raises(ValueError, match=r"n must be a positive integer"):
        check_m_by_n(pruned, 0, 2)


def test_block_sparsity_end_to_end():
    x, y = random_data(64)
    pruned = compile_model(
        prune_low_magnitude(
            small_cnn(),
            ConstantSparsity(0.5, frequency=1),
            block_size=(4, 2),
            block_pooling_type="MAX",
            filters=["hidden"],
        )
    )
    pruned.fit(x, y, batch_size=32, verbose=0)
    mask = get_masks(pruned)["hidden/kernel"]
    blocks = mask.reshape(36, 4, 8, 2)
    assert np.all(blocks.min(axis=(1, 3)) == blocks.max(axis=(1, 3)))
    assert abs(1 - mask.mean() - 0.5) < 0.01


def test_set_masks_errors():
    pruned = prune_low_magnitude(small_cnn(), pruning_schedule=None, update_masks=False)
    with pytest.raises(ValueError, match=r"Unknown mask key\(s\) \['nope/kernel'\]"):
        set_masks(pruned, {"nope/kernel": np.ones(3)})
    with pytest.raises(ValueError, match=r"Mask 'logits/kernel' must have shape \(16, 10\)"):
        set_masks(pruned, {"logits/kernel": np.ones(3)})


_TWIN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import keras
    from keras_lean.sparsity import prune_low_magnitude, pruning_wrappers
    from keras_lean.sparsity.schedules import import_tfmot
    tfmot = import_tfmot()
    import tf_keras

    schedule_args = dict(initial_sparsity=0.1, final_sparsity=0.85, begin_step=2, end_step=30,
                         frequency=4)
    rng = np.random.default_rng(0)
    x = rng.random((128, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 128)

    def layers(lib):
        return [lib.layers.Conv2D(4, 3, activation="relu", name="conv"),
                lib.layers.Flatten(name="flatten"),
                lib.layers.Dense(24, activation="relu", name="hidden"),
                lib.layers.Dense(10, name="logits")]

    keras.utils.set_random_seed(0)
    k3 = keras.Sequential([keras.Input((8, 8, 1)), *layers(keras)])
    k2 = tf_keras.Sequential([tf_keras.Input((8, 8, 1)), *layers(tf_keras)])
    k2.set_weights(k3.get_weights())

    ours = prune_low_magnitude(k3, tfmot.sparsity.keras.PolynomialDecay(**schedule_args))
    theirs = tfmot.sparsity.keras.prune_low_magnitude(
        k2, pruning_schedule=tfmot.sparsity.keras.PolynomialDecay(**schedule_args))

    def zeros_ours(model):
        return {w.layer.name: int((w.mask_variables[0].numpy() == 0).sum())
                for w in pruning_wrappers(model)}

    def zeros_theirs(model):
        out = {}
        for layer in model.layers:
            if getattr(layer, "pruning_vars", None):
                mask = layer.pruning_vars[0][1]
                out[layer.layer.name] = int((mask.numpy() == 0).sum())
        return out

    log = {"ours": [], "theirs": []}

    def recorder(lib, key, fn):
        class Rec(lib.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                log[key].append(fn(self.model))
        return Rec()

    ours.compile(keras.optimizers.SGD(0.05),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    theirs.compile(tf_keras.optimizers.SGD(0.05),
                   tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ours.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
             callbacks=[recorder(keras, "ours", zeros_ours)])
    theirs.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep(),
                          recorder(tf_keras, "theirs", zeros_theirs)])
    print("JSON" + json.dumps(log))
    """
)


def test_sparsity_matches_tfmot_twin_at_every_pruning_step():
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run(
        [sys.executable, "-c", _TWIN_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    import json

    log = json.loads([line for line in out.stdout.splitlines() if line.startswith("JSON")][0][4:])
    ours, theirs = log["ours"], log["theirs"]
    assert len(ours) == len(theirs) == 32
    pruning_steps = [s for s in range(2, 31, 4)]
    for step in range(32):
        for layer in ("conv", "hidden", "logits"):
            assert abs(ours[step][layer] - theirs[step][layer]) <= 1, (
                step,
                layer,
                ours[step],
                theirs[step],
            )
    # the schedule actually moved the sparsity at the pruning steps
    assert ours[pruning_steps[0]]["hidden"] < ours[pruning_steps[-1]]["hidden"]
    assert ours[31]["hidden"] == pytest.approx(0.85 * 144 * 24, abs=1)


def test_sparsity_report_counts_only_real_weights_of_nested_movement_wrappers():
    # A wrapper inside a container that is not a model (TimeDistributed): its pruning step,
    # masks, movement scores and previous-weight snapshots are bookkeeping, not weights.
    inputs = keras.Input((3, 8))
    wrapped = prune_low_magnitude(
        keras.layers.Dense(16, name="inner"),
        ConstantSparsity(0.5, frequency=1),
        criterion="movement",
    )
    x = keras.layers.TimeDistributed(wrapped, name="td")(inputs)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((32, 3, 8)), rng.random((32, 4)), epochs=2, verbose=0)
    assert wrapped.score_variables  # the bookkeeping exists...
    report = sparsity_report(model)
    real = (8 * 16 + 16) + (48 * 4 + 4)
    assert report.total_params == real  # ...and is not counted
    assert report.raw_bytes == 4 * real
    kernel = np.asarray(wrapped.layer.kernel.numpy()) * np.asarray(wrapped.mask_variables[0])
    assert [r.name for r in report.layers] == ["inner", "head"]
    assert report.layers[0].nonzero == np.count_nonzero(kernel)
    expected_nonzero = (
        np.count_nonzero(kernel)
        + np.count_nonzero(wrapped.layer.bias.numpy())
        + sum(np.count_nonzero(w) for w in model.get_layer("head").get_weights())
    )
    assert report.nonzero_params == expected_nonzero
