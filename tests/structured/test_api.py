"""prune_structured / structure_report: errors, export, further training, the report."""

from __future__ import annotations

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lean.structured import prune_structured, structure_report

from ._structured_models import make_input, residual, sequential_cnn, unknown

L = keras.layers


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, r"ratio must be a float in \[0, 1\). Received: ratio=1.0"),
        ({"ratio": -0.1}, r"ratio must be a float in \[0, 1\)"),
        ({"ratio": 0.5, "importance": "l3"}, "importance must be one of"),
        ({"ratio": 0.5, "round_to": 0}, "round_to must be an integer >= 1 or"),
        ({"ratio": 0.5, "min_channels": 0}, "min_channels must be an integer >= 1"),
    ],
    ids=["ratio-high", "ratio-negative", "importance", "round_to", "min_channels"],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_structured(sequential_cnn(), **kwargs)


def test_not_a_keras3_model():
    with pytest.raises(ValueError, match="Expected a Keras 3 Sequential or functional model"):
        prune_structured(L.Dense(3), 0.5)


def test_report_lists_widths_params_flops_and_skips():
    model = unknown()
    pruned = prune_structured(model, 0.5)
    report = structure_report(model, pruned)
    rows = {r.name: r for r in report.layers}
    assert (rows["d2"].width_before, rows["d2"].width_after) == (7, 4)
    assert rows["d2"].params_after == 8 * 4 + 4
    assert rows["d2"].flops_after < rows["d2"].flops_before
    assert report.params_before == model.count_params()
    assert report.params_after == pruned.count_params()
    assert 0 < report.flops_ratio < 1
    assert ("odd", "layer type Doubler is not known to the dependency graph") in report.skipped
    json.dumps(report.to_dict())


def test_sequential_stays_sequential_and_trains_further(digits):
    x_train, y_train, x_val, y_val = digits
    model = sequential_cnn()
    model.pop()
    model.add(L.Dense(10, name="logits"))
    pruned = prune_structured(model, 0.5, round_to=2)
    assert isinstance(pruned, keras.Sequential)
    pruned.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    before = pruned.evaluate(x_val, y_val, verbose=0)
    pruned.fit(x_train[:512], y_train[:512], epochs=2, batch_size=64, verbose=0)
    assert pruned.evaluate(x_val, y_val, verbose=0) < before


def test_export_savedmodel_and_tflite(tmp_path):
    model = residual(L.Add)()
    pruned = prune_structured(model, 0.5)
    x = make_input("img8x3")
    expected = pruned(x).numpy()
    path = str(tmp_path / "saved")
    pruned.export(path, format="tf_saved_model", verbose=False)
    restored = tf.saved_model.load(path)
    np.testing.assert_allclose(restored.serve(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    converter = tf.lite.TFLiteConverter.from_saved_model(path)
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_nothing_prunable_warns_and_names_the_skipped_layers():
    inner = keras.Sequential([keras.Input((8,)), L.Dense(8, name="inner_d")], name="inner")
    inputs = keras.Input((8,))
    wrapped = keras.Model(inputs, inner(inner(inputs)), name="wrapped")  # shared: kept whole
    with pytest.warns(UserWarning, match=r"'wrapped' removes nothing.*inner: nested model"):
        small = prune_structured(wrapped, 0.5)
    assert small.count_params() == wrapped.count_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_structured(wrapped, 0.0)  # ratio 0 asks for nothing: no warning
        prune_structured(sequential_cnn(), 0.5)  # something pruned: no warning
