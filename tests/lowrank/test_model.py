"""Tests of keras_lean/lowrank/_model.py: filters, paths and model copies."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.lowrank._model import (
    check_filters,
    copy_model,
    layer_paths,
    matches,
    named_layers,
    paired_layers,
)


@pytest.mark.parametrize(
    "filters, expected",
    [
        (None, ["fc1", "fc2", "head"]),
        ("fc", ["fc1", "fc2"]),
        (["^head$", "1$"], ["fc1", "head"]),
        (lambda layer: layer.units == 24, ["fc2"]),
    ],
    ids=["none", "regex", "list", "callable"],
)
def test_matches(mlp, filters, expected):
    dense = [layer for layer in mlp.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.name for layer in dense if matches(filters, layer, layer.name)] == expected


@pytest.mark.parametrize(
    "filters, error, match",
    [
        (3, TypeError, r"`filters` must be None, a regex string.*Received: filters=3"),
        (["ok", 1], TypeError, r"Received: filters=\['ok', 1\]"),
        ("(", ValueError, r"`filters` contains an invalid regular expression '\('"),
    ],
    ids=["int", "mixed_list", "bad_regex"],
)
def test_check_filters_errors(filters, error, match):
    with pytest.raises(error, match=match):
        check_filters(filters)


def test_copy_model_is_independent(cnn, x_cnn):
    cnn.compile("adam", "mse")
    copy = copy_model(cnn)
    np.testing.assert_array_equal(copy(x_cnn), cnn(x_cnn))
    assert not {id(v) for v in copy.weights} & {id(v) for v in cnn.weights}
    assert not copy.compiled


def test_copy_model_keeps_a_keras_hub_preprocessor(bert):
    keras_hub = pytest.importorskip("keras_hub")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    classifier = keras_hub.models.BertTextClassifier(bert, num_classes=2, preprocessor=preprocessor)
    copy = copy_model(classifier)
    assert copy.preprocessor is preprocessor
    text = np.array(["good film", "bad film"])
    np.testing.assert_allclose(copy.predict(text, verbose=0), classifier.predict(text, verbose=0),
                               atol=1e-6)  # fmt: skip


# ---------------------------------------------------------------- paths and pairing


def _sequential():
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(3, name="b")],
        name="seq",
    )


def test_named_layers_paths_do_not_carry_a_sequential_name():
    # Keras' own `layer.path` is "seq/a" here but "a" in a copy rebuilt from config.
    model = _sequential()
    assert [path for path, _ in named_layers(model)] == ["input_layer", "a", "b"]
    copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert [path for path, _ in named_layers(copy)] == ["input_layer", "a", "b"]


def test_named_layers_paths_of_a_nested_model():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, name="wide")], name="inner")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(inner(inputs)))
    paths = dict(named_layers(model))
    assert paths["inner/wide"] is inner.get_layer("wide")
    assert paths["out"] is model.get_layer("out")
    assert layer_paths(model)[id(inner.get_layer("wide"))] == "inner/wide"


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class _TwoUnnamed(keras.layers.Layer):
    """A custom layer whose sublayers get automatic names (different in every rebuild)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = keras.layers.Dense(4)
        self.second = keras.layers.Dense(4)

    def build(self, input_shape):
        self.first.build(input_shape)
        self.second.build((*input_shape[:-1], 4))

    def call(self, x):
        return self.second(self.first(x))


def test_copy_model_pairs_automatically_named_sublayers_by_position(x_mlp):
    inputs = keras.Input((12,))
    model = keras.Model(inputs, _TwoUnnamed(name="pair")(inputs))
    copy = copy_model(model)
    original, rebuilt = model.get_layer("pair"), copy.get_layer("pair")
    assert original.first.name != rebuilt.first.name  # the names really differ
    np.testing.assert_array_equal(rebuilt.first.kernel.numpy(), original.first.kernel.numpy())
    np.testing.assert_array_equal(rebuilt.second.kernel.numpy(), original.second.kernel.numpy())
    np.testing.assert_allclose(copy(x_mlp), model(x_mlp), atol=1e-6)


def test_paired_layers_refuses_a_copy_built_differently():
    other = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="a")], name="seq")
    with pytest.raises(ValueError, match=r"Cannot match the layers of 'the model'.*\['input_layer"):
        paired_layers(_sequential(), other)


def test_copy_model_of_a_sequential_is_independent():
    model = _sequential()
    x = np.random.default_rng(0).normal(size=(2, 6)).astype("float32")
    copy = copy_model(model)
    np.testing.assert_array_equal(copy(x), model(x))
    assert not {id(v) for v in copy.weights} & {id(v) for v in model.weights}


@keras.saving.register_keras_serializable(package="keras_lean_tests")
class _Registered(keras.Model):
    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, name="dense")

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_copy_model_of_a_registered_subclassed_model(x_mlp):
    model = _Registered(units=3)
    model(x_mlp)
    copy = copy_model(model)
    assert type(copy) is _Registered
    np.testing.assert_array_equal(copy(x_mlp), model(x_mlp))


def test_copy_model_of_an_unregistered_subclassed_model_says_what_to_do(x_mlp):
    class Local(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Local(name="local")
    model(x_mlp)
    with pytest.raises(
        ValueError,
        match=r"Cannot copy model 'local' \(Local\): Keras could not rebuild it.*Could not "
        r"locate class 'Local'.*register_keras_serializable.*functional API",
    ):
        copy_model(model)
