"""Tests of keras_lean/lowrank/_model.py: filters, paths and model copies."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.lowrank._model import check_filters, copy_model, matches


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
    assert [layer.name for layer in dense if matches(filters, layer)] == expected


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
