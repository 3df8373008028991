"""Tests of keras_lean/lowrank/lora.py: apply_lora, merge_lora, lora_summary over Keras' LoRA."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_lean.lowrank import (
    apply_lora,
    default_lora_targets,
    lora_layers,
    lora_summary,
    merge_lora,
)


def _lora_variables(model):
    return [v.path for v in model.weights if "lora" in v.name]


def _sequence(model, x):
    y = model(x)
    return keras.ops.convert_to_numpy(y["sequence_output"] if isinstance(y, dict) else y)


# ---------------------------------------------------------------- targets and freezing


def test_default_targets_on_bert_are_query_and_value(bert):
    paths = sorted(layer.path for layer in default_lora_targets(bert))
    assert paths == [
        f"transformer_layer_{i}/self_attention_layer/{p}"
        for i in (0, 1)
        for p in ("query", "value")
    ]


def test_default_targets_without_attention_are_all_dense(cnn):
    assert [layer.name for layer in default_lora_targets(cnn)] == ["fc1", "head"]


def test_apply_lora_on_bert_trains_only_adapters(bert, x_bert):
    full = lora_summary(bert)
    lora = apply_lora(bert, rank=2)
    summary = lora_summary(lora)
    # 4 adapted projections, each A (16, 2 heads, 2) and B (2, 8 head_dim)
    assert summary["adapter_params"] == 4 * (16 * 2 * 2 + 2 * 8)
    assert summary["trainable_params"] == summary["adapter_params"]
    assert summary["trainable_params"] < 0.1 * full["trainable_params"]
    assert {v.name for v in lora.trainable_weights} == {"lora_kernel_a", "lora_kernel_b"}
    # Keras starts B at zero: the adapted model computes what the base computes
    np.testing.assert_allclose(_sequence(lora, x_bert), _sequence(bert, x_bert), atol=1e-6)


def test_apply_lora_does_not_touch_the_original(bert, x_bert):
    y = _sequence(bert, x_bert)
    n_trainable = len(bert.trainable_weights)
    lora = apply_lora(bert, rank=2)
    assert lora is not bert
    assert not lora_layers(bert)
    assert len(bert.trainable_weights) == n_trainable
    lora.get_layer("token_embedding").embeddings.assign(
        np.zeros(bert.get_layer("token_embedding").embeddings.shape, "float32")
    )
    np.testing.assert_array_equal(_sequence(bert, x_bert), y)


def test_apply_lora_targets_by_pattern_and_alpha(cnn):
    lora = apply_lora(cnn, rank=3, alpha=12, targets=["^fc1$"])
    (layer,) = lora_layers(lora)
    assert layer.name == "fc1" and layer.lora_rank == 3 and layer.lora_alpha == 12
    assert layer.bias.trainable is False and layer._kernel.trainable is False
    # everything else is frozen, BatchNormalization included
    assert not lora.get_layer("bn").trainable
    assert len(lora.trainable_weights) == 2


def test_apply_lora_conv_and_embedding_targets(cnn):
    lora = apply_lora(cnn, rank=2, targets="conv")
    (layer,) = lora_layers(lora)
    assert tuple(layer.lora_kernel_a.shape) == (3, 3, 1, 2)
    assert tuple(layer.lora_kernel_b.shape) == (2, 8)

    inputs = keras.Input((4,), dtype="int32")
    outputs = keras.layers.Embedding(20, 6, name="emb")(inputs)
    emb_model = keras.Model(inputs, outputs)
    lora = apply_lora(emb_model, rank=2, targets="emb")
    assert [v.name for v in lora.trainable_weights] == ["lora_embeddings_a", "lora_embeddings_b"]


def test_keep_trainable_leaves_a_head_fully_trainable(bert):
    keras_hub = pytest.importorskip("keras_hub")
    classifier = keras_hub.models.BertTextClassifier(bert, num_classes=3, preprocessor=None)
    lora = apply_lora(classifier, rank=2, keep_trainable="logits")
    names = {v.path for v in lora.trainable_weights}
    assert {"logits/kernel", "logits/bias"} <= names
    assert len(names) == 2 + 8
    assert len(lora_layers(lora)) == 4


def test_lora_training_updates_only_adapters(cnn, digits):
    x_train, y_train, _, _ = digits
    lora = apply_lora(cnn, rank=4)
    frozen = {v.path: v.numpy().copy() for v in lora.weights if "lora" not in v.name}
    adapters = {v.path: v.numpy().copy() for v in lora.trainable_weights}
    lora.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    lora.fit(x_train[:128], y_train[:128], epochs=1, batch_size=32, verbose=0)
    for v in lora.weights:
        if v.path in frozen and "seed" not in v.path:
            np.testing.assert_array_equal(v.numpy(), frozen[v.path], err_msg=v.path)
    assert any(not np.array_equal(v.numpy(), adapters[v.path]) for v in lora.trainable_weights)


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("alpha", [None, 8.0], ids=["alpha_default", "alpha_8"])
def test_merge_lora_bert_matches_and_is_plain(bert, x_bert, randomize, alpha, tmp_path):
    lora = apply_lora(bert, rank=2, alpha=alpha)
    randomize(lora)
    y_lora = _sequence(lora, x_bert)
    assert np.abs(y_lora - _sequence(bert, x_bert)).max() > 1e-3  # the adapters do something
    merged = merge_lora(lora)
    np.testing.assert_allclose(_sequence(merged, x_bert), y_lora, atol=1e-5)
    assert not lora_layers(merged) and not _lora_variables(merged)
    assert len(merged.trainable_weights) == len(bert.trainable_weights)
    assert merged.count_params() == bert.count_params()
    path = tmp_path / "merged.keras"
    merged.save(path)
    loaded = keras.saving.load_model(path)
    assert not _lora_variables(loaded)
    np.testing.assert_allclose(_sequence(loaded, x_bert), y_lora, atol=1e-5)


def test_merge_lora_kernel_is_keras_formula(mlp, randomize):
    lora = apply_lora(mlp, rank=2, alpha=6, targets="fc2")
    randomize(lora)
    layer = lora.get_layer("fc2")
    expected = layer._kernel.numpy() + (6 / 2) * layer.lora_kernel_a.numpy() @ (
        layer.lora_kernel_b.numpy()
    )
    merged = merge_lora(lora)
    np.testing.assert_allclose(merged.get_layer("fc2").kernel.numpy(), expected, atol=1e-7)
    assert merged.get_layer("fc2").get_config().get("lora_rank") is None


@pytest.mark.parametrize("factory", ["mlp", "cnn"])
def test_merge_lora_functional_models(factory, request, randomize, tmp_path):
    model = request.getfixturevalue(factory)
    x = request.getfixturevalue(f"x_{factory}")
    lora = apply_lora(model, rank=2)
    randomize(lora)
    merged = merge_lora(lora)
    np.testing.assert_allclose(merged(x), lora(x), atol=1e-5)
    assert all(layer.trainable for layer in merged.layers)
    path = tmp_path / "m.keras"
    merged.save(path)
    assert not _lora_variables(keras.saving.load_model(path))


def test_merge_lora_without_adapters_is_a_noop_with_warning(mlp):
    with pytest.warns(UserWarning, match=r"no LoRA-enabled layer; nothing to merge"):
        result = merge_lora(mlp)
    assert result is mlp


def test_merge_does_not_touch_lora_model(mlp, x_mlp, randomize):
    lora = apply_lora(mlp, rank=2)
    randomize(lora)
    y = lora(x_mlp)
    merge_lora(lora)
    assert len(lora_layers(lora)) == 3
    np.testing.assert_array_equal(lora(x_mlp), y)


# ---------------------------------------------------------------- what Keras 3.15 does on save/load


def test_keras_save_folds_adapters_dense_loses_alpha_einsum_keeps_it(randomize, tmp_path):
    """Pins the Keras behaviour merge_lora's docs describe (top-level functional layers)."""
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="d")(inputs)
    outputs = keras.layers.EinsumDense("ab,bc->ac", output_shape=4, bias_axes="c", name="e")(x)
    model = keras.Model(inputs, outputs)
    lora = apply_lora(model, rank=2, alpha=8, targets=["^d$", "^e$"])
    randomize(lora)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    path = tmp_path / "lora.keras"
    lora.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x), lora(x), atol=1e-5)
    d, e = loaded.get_layer("d"), loaded.get_layer("e")
    assert d.lora_enabled and e.lora_enabled  # enable_lora survives in the config...
    assert not np.any(d.lora_kernel_b.numpy())  # ...with zeroed factors, update in the kernel
    assert e.lora_alpha == 8
    assert d.lora_alpha == 2  # Keras' Dense.build re-enables with alpha = rank
    merged = merge_lora(loaded)
    assert not _lora_variables(merged)
    np.testing.assert_allclose(merged(x), lora(x), atol=1e-5)


def test_keras_save_of_lora_bert_loads_plain(bert, x_bert, randomize, tmp_path):
    lora = apply_lora(bert, rank=2)
    randomize(lora)
    path = tmp_path / "bert.keras"
    lora.save(path)
    loaded = keras.saving.load_model(path)
    # attention projections are built inside MultiHeadAttention, not in the config
    assert not lora_layers(loaded) and not _lora_variables(loaded)
    np.testing.assert_allclose(_sequence(loaded, x_bert), _sequence(lora, x_bert), atol=1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, r"`rank` must be a positive integer. Received: rank=0"),
        ({"rank": -3}, r"Received: rank=-3"),
        ({"rank": 2.0}, r"Received: rank=2.0"),
        ({"rank": 5}, r"\[1, 4\] for layer 'head' \(kernel shape \(24, 4\)\). Received: rank=5"),
        ({"rank": 2, "alpha": 0}, r"`alpha` must be a positive number or None. Received: alpha=0"),
    ],
    ids=["rank0", "rank_negative", "rank_float", "rank_above_min", "alpha0"],
)
def test_apply_lora_rejects_bad_rank_and_alpha(mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(mlp, **kwargs)


def test_apply_lora_targets_matching_nothing_lists_layers(mlp):
    with pytest.raises(ValueError, match=r"targets=\['query', 'value'\]") as info:
        apply_lora(mlp, rank=2, targets=["query", "value"])
    assert "Layers that support LoRA: ['fc1', 'fc2', 'head']" in str(info.value)


def test_apply_lora_no_default_targets():
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="c")(inputs))
    with pytest.raises(ValueError, match=r"no default targets.*Layers that support LoRA: \['c'\]"):
        apply_lora(model, rank=1)


def test_apply_lora_refuses_kernel_constraint():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(4, kernel_constraint=keras.constraints.MaxNorm(1.0), name="capped")(
        inputs
    )
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    with pytest.raises(ValueError, match=r"layer 'capped'.*kernel_constraint \(MaxNorm\)"):
        apply_lora(model, rank=2)
    # leaving it out of the targets works
    assert [lyr.name for lyr in lora_layers(apply_lora(model, rank=2, targets="out"))] == ["out"]


def test_apply_lora_twice_on_same_layer_is_refused(mlp):
    lora = apply_lora(mlp, rank=2, targets="fc1")
    with pytest.raises(ValueError, match=r"LoRA is already enabled on layer 'fc1'"):
        apply_lora(lora, rank=2, targets="fc1")


def test_apply_lora_bad_filters_and_model(mlp):
    with pytest.raises(TypeError, match=r"`targets` must be None, a regex string"):
        apply_lora(mlp, rank=2, targets=[1, 2])
    with pytest.raises(ValueError, match=r"`keep_trainable` matched no layer"):
        apply_lora(mlp, rank=2, keep_trainable="nothing_here")
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model"):
        apply_lora(object(), rank=2)
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model"):
        merge_lora(None)


def test_lora_summary_counts(mlp):
    summary = lora_summary(apply_lora(mlp, rank=2, targets="fc1"))
    assert summary["adapter_params"] == 12 * 2 + 2 * 32
    assert summary["total_params"] == mlp.count_params() + summary["adapter_params"]
    assert summary["trainable_fraction"] == pytest.approx(
        summary["adapter_params"] / summary["total_params"]
    )
    assert summary["layers"] == [{"path": "fc1", "rank": 2, "alpha": 2.0, "adapter_params": 88}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lora_summary(mlp)["adapter_params"] == 0


# ---------------------------------------------------------------- model shapes (issue 12)


def _seq_built():
    model = keras.Sequential([keras.layers.Dense(64), keras.layers.Dense(64)])
    model.build((None, 64))
    return model


@pytest.mark.parametrize(
    "build",
    [
        lambda: keras.Sequential(
            [keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(64)]
        ),
        _seq_built,
    ],
    ids=["sequential_input", "sequential_build"],
)
def test_apply_and_merge_lora_on_a_sequential_model(build, randomize):
    # Keras paths these layers "sequential/dense" but their copy rebuilt from config "dense":
    # apply_lora used to fail with "the rebuilt model has no layer at that path".
    model = build()
    x = np.random.default_rng(0).normal(size=(3, 64)).astype("float32")
    lora = apply_lora(model, rank=4)
    assert isinstance(lora, keras.Sequential) and len(lora_layers(lora)) == 2
    np.testing.assert_allclose(lora(x), model(x), atol=1e-6)
    summary = lora_summary(lora)
    assert [entry["path"] for entry in summary["layers"]] == [layer.name for layer in model.layers]
    randomize(lora)
    merged = merge_lora(lora)
    assert isinstance(merged, keras.Sequential) and not lora_layers(merged)
    np.testing.assert_allclose(merged(x), lora(x), rtol=1e-5, atol=1e-5)


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class _Tower(keras.Model):
    """A subclassed model Keras can rebuild (registered, with get_config): LoRA applies."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="relu", name="hidden")
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x):
        return self.out(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_apply_lora_on_a_registered_subclassed_model(x_mlp, randomize):
    model = _Tower()
    model(x_mlp)
    lora = apply_lora(model, rank=2, targets="hidden")
    assert type(lora) is _Tower
    assert [layer.name for layer in lora_layers(lora)] == ["hidden"]
    np.testing.assert_allclose(lora(x_mlp), model(x_mlp), atol=1e-6)
    randomize(lora)
    merged = merge_lora(lora)
    np.testing.assert_allclose(merged(x_mlp), lora(x_mlp), rtol=1e-5, atol=1e-5)
    assert not lora_layers(model)  # the caller's model stays plain
