"""One-shot calibration pruning: magnitude, Wanda, SparseGPT (keras_lean.sparsity.prune_oneshot)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity import check_m_by_n, prune_oneshot

METHODS = ("magnitude", "wanda", "sparsegpt")


def _mlp(name="mlp") -> keras.Model:
    inputs = keras.Input((12,))
    x = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    outputs = keras.layers.Dense(8, name="fc2")(x)
    return keras.Model(inputs, outputs, name=name)


def _attention_model() -> keras.Model:
    inputs = keras.Input((5, 16))
    x = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
    x = keras.layers.Dense(32, activation="relu", name="ffn")(x)
    return keras.Model(inputs, keras.layers.Dense(16, name="out")(x))


def _correlated(n, features, seed=0) -> np.ndarray:
    """Inputs with very unequal, correlated feature scales (where calibration pays off)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(features, features)) * np.geomspace(0.05, 5.0, features)[:, None]
    return (rng.normal(size=(n, features)) @ mix).astype("float32")


def _kernels(model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("m_by_n", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_exact_sparsity_and_pattern(method, m_by_n):
    model = _attention_model()
    x = np.random.default_rng(1).normal(size=(32, 5, 16)).astype("float32")
    before = _kernels(model)
    pruned, report = prune_oneshot(model, x, method=method, sparsity=0.5, sparsity_m_by_n=m_by_n)
    names = [layer.name for layer in report.layers]
    assert names == ["mha/query", "mha/key", "mha/value", "mha/attention_output", "ffn", "out"]
    for layer in report.layers:
        assert layer.sparsity == pytest.approx(0.5)
        assert layer.relative_error is not None and 0 < layer.relative_error < 1
    assert report.sparsity == pytest.approx(0.5)
    if m_by_n:
        assert all(check_m_by_n(pruned, n=4, m=2).values())
    # the caller's model is untouched, the copy is a different model
    assert all(np.array_equal(a, b) for a, b in zip(before, _kernels(model), strict=True))
    assert pruned is not model
    assert pruned.predict(x, verbose=0).shape == (32, 5, 16)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75], ids=["0", "30", "75"])
def test_sparsity_levels_exact(sparsity):
    model = _mlp()
    pruned, report = prune_oneshot(model, _correlated(40, 12), "sparsegpt", sparsity, block_size=5)
    kernel = np.array(pruned.get_layer("fc1").kernel)
    assert np.sum(kernel == 0) == round(sparsity * kernel.size)
    assert report.layers[0].zeros == round(sparsity * kernel.size)


def _wanda_by_hand(kernel, x, sparsity):
    """Wanda written out element by element: per output, drop the lowest |W_ij|·||X_j||."""
    out = kernel.copy()
    norms = [np.sqrt(sum(float(v) ** 2 for v in x[:, j])) for j in range(kernel.shape[0])]
    k = round(sparsity * kernel.shape[0])
    for col in range(kernel.shape[1]):
        scores = [abs(float(kernel[j, col])) * norms[j] for j in range(kernel.shape[0])]
        for j in sorted(range(kernel.shape[0]), key=lambda j: scores[j])[:k]:
            out[j, col] = 0.0
    return out


def test_wanda_equals_hand_computation_and_sees_pruned_earlier_layers():
    model = _mlp()
    x = _correlated(24, 12, seed=3)
    pruned, _ = prune_oneshot(model, x, method="wanda", sparsity=0.5)
    k1 = np.array(model.get_layer("fc1").kernel)
    b1 = np.array(model.get_layer("fc1").bias)
    k1_pruned = _wanda_by_hand(k1, x, 0.5)
    np.testing.assert_allclose(np.array(pruned.get_layer("fc1").kernel), k1_pruned, atol=1e-7)
    # fc2 is scored on fc1's outputs *after* fc1 was pruned (not the dense model's)
    hidden = np.maximum(x @ k1_pruned + b1, 0.0)
    k2 = np.array(model.get_layer("fc2").kernel)
    np.testing.assert_allclose(
        np.array(pruned.get_layer("fc2").kernel), _wanda_by_hand(k2, hidden, 0.5), atol=1e-6
    )


def _reconstruction_error(layer, pruned_layer, x) -> float:
    dense = x @ np.array(layer.kernel)
    return float(np.sum((dense - x @ np.array(pruned_layer.kernel)) ** 2) / np.sum(dense**2))


@pytest.mark.parametrize("m_by_n", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(m_by_n):
    inputs = keras.Input((32,))
    model = keras.Model(inputs, keras.layers.Dense(24, name="proj")(inputs))
    x = _correlated(256, 32, seed=5)
    errors = {}
    for method in METHODS:
        pruned, report = prune_oneshot(model, x, method, 0.5, sparsity_m_by_n=m_by_n)
        errors[method] = _reconstruction_error(model.get_layer("proj"), pruned.get_layer("proj"), x)
        assert report.layers[0].relative_error == pytest.approx(errors[method], rel=1e-3)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sequential_and_nested_models():
    inner = keras.Sequential(
        [keras.Input((12,)), keras.layers.Dense(8, name="inner_dense")], name="inner"
    )
    inputs = keras.Input((12,))
    outputs = keras.layers.Dense(4, name="head")(inner(inputs))
    nested = keras.Model(inputs, outputs)
    x = _correlated(16, 12)
    pruned, report = prune_oneshot(nested, x, method="sparsegpt")
    assert [layer.name for layer in report.layers] == ["inner_dense", "head"]
    assert np.mean(np.array(pruned.get_layer("inner").get_layer("inner_dense").kernel) == 0) == 0.5
    seq = keras.Sequential([keras.Input((12,)), keras.layers.Dense(6), keras.layers.Dense(3)])
    pruned, report = prune_oneshot(seq, (x, np.zeros(16)), method="wanda", sparsity=0.5)
    assert isinstance(pruned, keras.Sequential) and len(report.layers) == 2
    assert all(layer.sparsity == 0.5 for layer in report.layers)


def test_keras_hub_transformer_block_and_filters():
    keras_hub = pytest.importorskip("keras_hub")
    inputs = keras.Input((6, 16))
    x = keras_hub.layers.TransformerEncoder(32, 2, name="block")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="cls")(x))
    x = np.random.default_rng(0).normal(size=(8, 6, 16)).astype("float32")
    pruned, report = prune_oneshot(model, x, method="wanda", filters=["block"])
    names = [layer.name for layer in report.layers]
    assert len(names) == 6 and all(name.startswith("block/") for name in names)
    assert np.all(np.array(pruned.get_layer("cls").kernel) != 0)
    _, report = prune_oneshot(
        model, x, method="magnitude", filters=lambda layer: layer.name == "cls"
    )
    assert [layer.name for layer in report.layers] == ["cls"]


def test_magnitude_needs_no_calibration_data():
    pruned, report = prune_oneshot(_mlp(), method="magnitude", sparsity=0.25)
    assert report.layers[0].relative_error is None
    assert np.mean(np.array(pruned.get_layer("fc2").kernel) == 0) == 0.25


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "obs"}, r"method must be one of"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": "half"}, r"sparsity must be a number"),
        ({"sparsity_m_by_n": (4, 2)}, r"sparsity_m_by_n must be \(m, n\) with 0 < m < n"),
        ({"filters": ["nothing*"]}, r"matched no Dense or EinsumDense layer.*fc1"),
        ({"method": "wanda", "calibration_data": None}, r"calibration_data is required"),
        ({"calibration_data": np.zeros((0, 12))}, r"calibration_data is empty"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1"),
    ],
    ids=["method", "sparsity-1", "sparsity-str", "m-by-n", "filters", "no-data", "empty", "batch"],
)
def test_bad_arguments(kwargs, match):
    args = {"calibration_data": np.ones((4, 12), "float32"), **kwargs}
    with pytest.raises(ValueError, match=match):
        prune_oneshot(_mlp(), **args)


def test_lora_layer_refused():
    model = _mlp()
    model.get_layer("fc1").enable_lora(2)
    with pytest.raises(ValueError, match=r"'fc1' has LoRA enabled.*Merge LoRA first"):
        prune_oneshot(model, np.ones((4, 12), "float32"))


def _captured_inputs(model, layers, x) -> dict:
    """The first input of each layer in one eager forward pass (hooks its `call`)."""
    seen = {}
    for layer in layers:
        original = layer.call

        def hooked(*args, _layer=layer, _call=original, **kwargs):
            seen.setdefault(_layer.name, keras.ops.convert_to_numpy(args[0]))
            return _call(*args, **kwargs)

        object.__setattr__(layer, "call", hooked)
    try:
        model(x, training=False)
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")
    return seen


def test_keras_hub_block_pruned_in_order_on_pruned_inputs():
    """Every projection of a TransformerEncoder (EinsumDense q/k/v/output, Dense FFN) is
    Wanda-pruned on the inputs it gets once the projections before it are pruned."""
    keras_hub = pytest.importorskip("keras_hub")
    inputs = keras.Input((6, 16))
    outputs = keras_hub.layers.TransformerEncoder(32, 2, name="block")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(2).normal(size=(8, 6, 16)).astype("float32")
    pruned, report = prune_oneshot(model, x, method="wanda", sparsity=0.5)
    names = [layer.name.split("/")[-1] for layer in report.layers]
    order = ["query", "key", "value", "attention_output"]
    assert names == [*order, "feedforward_intermediate_dense", "feedforward_output_dense"]
    dense_block, pruned_block = model.get_layer("block"), pruned.get_layer("block")
    attention = pruned_block._self_attention_layer
    projections = [getattr(attention, f"_{n}_dense") for n in ("query", "key", "value")]
    projections += [attention._output_dense, pruned_block._feedforward_intermediate_dense,
                    pruned_block._feedforward_output_dense]  # fmt: skip
    # in the final model, each projection's input depends only on the ones pruned before it
    final_inputs = _captured_inputs(pruned, projections, x)
    dense_kernels = {
        la.name: np.array(la.kernel)
        for la in dense_block._flatten_layers()
        if hasattr(la, "kernel")
    }
    dense_inputs = _captured_inputs(model, [la for la in dense_block._flatten_layers()
                                            if la.name in final_inputs], x)  # fmt: skip
    for layer in projections:
        kernel = dense_kernels[layer.name]
        in_ndim = 2 if layer.name == "attention_output" else 1  # (heads, head_dim, hidden)
        in_size = int(np.prod(kernel.shape[:in_ndim]))
        rows = final_inputs[layer.name].reshape(-1, in_size)
        expected = _wanda_by_hand(kernel.reshape(in_size, -1), rows, 0.5)
        got = np.array(layer.kernel).reshape(in_size, -1)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=layer.name)
    # the later projections really do see different inputs than in the dense model
    for name in ("attention_output", "feedforward_output_dense"):
        assert not np.allclose(final_inputs[name], dense_inputs[name]), name


def test_shared_layer_calibrated_on_every_call():
    """A layer called twice per pass is scored on both inputs (its pass is not cut short)."""
    inputs = keras.Input((12,))
    shared = keras.layers.Dense(12, name="shared")
    outputs = keras.layers.Dense(3, name="head")(shared(shared(inputs)))
    model = keras.Model(inputs, outputs)
    x = _correlated(20, 12, seed=4)
    pruned, _ = prune_oneshot(model, x, method="wanda", sparsity=0.5, filters=["shared"])
    kernel, bias = np.array(shared.kernel), np.array(shared.bias)
    both = np.concatenate([x, x @ kernel + bias])
    np.testing.assert_allclose(
        np.array(pruned.get_layer("shared").kernel), _wanda_by_hand(kernel, both, 0.5), atol=1e-6
    )


def _token_model() -> keras.Model:
    """keras-hub style dict inputs: a Dense on (batch, sequence, features) and one on a pooled
    (batch, features) vector."""
    keras.utils.set_random_seed(5)
    ids = keras.Input((6,), dtype="int32", name="token_ids")
    mask = keras.Input((6,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(20, 8, name="embed")(ids)
    x = keras.layers.Dense(8, name="proj")(x)
    heads = keras.layers.Reshape((6, 2, 4))(x)  # (batch, sequence, heads, head_dim)
    x = keras.layers.EinsumDense("bsnh,nhd->bsd", (6, 8), name="merge")(heads)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    out = keras.layers.Dense(4, name="head")(pooled)
    model = keras.Model({"token_ids": ids, "padding_mask": mask}, out)
    table = model.get_layer("embed").embeddings
    table.assign(keras.ops.scatter_update(table, [[0]], [[3.0, 0.0] * 4]))  # a loud pad token
    return model


def test_padding_positions_are_not_calibration_data():
    model = _token_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 20, (5, 6)).astype("int32")
    mask = np.ones((5, 6), "int32")
    mask[:, 4:] = 0
    ids[:, 4:] = 0  # padding token: its embedding row is what the real tokens' stats must not see
    data = {"token_ids": ids, "padding_mask": mask}
    pruned, report = prune_oneshot(model, data, method="wanda", sparsity=0.5, filters=["proj"])
    embedded = np.asarray(model.get_layer("embed")(ids))
    real = embedded[mask.astype(bool)]
    assert report.calibration_rows == real.shape[0] == 20
    kernel = np.array(model.get_layer("proj").kernel)
    np.testing.assert_allclose(
        np.array(pruned.get_layer("proj").kernel), _wanda_by_hand(kernel, real, 0.5), atol=1e-7
    )
    # the padded rows would change the scores here: the test can tell the two apart
    with_padding = _wanda_by_hand(kernel, embedded.reshape(-1, 8), 0.5)
    assert not np.array_equal(with_padding == 0, _wanda_by_hand(kernel, real, 0.5) == 0)
    # two contracted axes (an attention output projection): the same real-token rows
    _, merge = prune_oneshot(model, data, method="wanda", sparsity=0.5, filters=["merge"])
    assert merge.calibration_rows == 20
    # a (batch, features) input cannot be masked by position: every row counts
    _, head = prune_oneshot(model, data, method="wanda", sparsity=0.5, filters=["head"])
    assert head.calibration_rows == 5
