"""GPTQ / AWQ through Keras' own `Model.quantize(mode, config=...)` for keras-hub causal LMs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.export import calibration_config, quantize_keras, quantize_keras_artifact
from keras_lean.export.quantize import quantized_layers

VOCAB, SEQ = 48, 8


def _gpt2():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=SEQ,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _tokens(n=4):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (n, SEQ)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def _classifier():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(inputs), name="clf")


@pytest.mark.parametrize("mode", ["gptq", "awq"])
def test_calibrated_modes_refuse_models_that_are_not_causal_lms(mode):
    with pytest.raises(
        ValueError, match=rf"keras_quantization='{mode}' needs a keras-hub causal LM"
    ):
        quantize_keras(_classifier(), mode, calibration=np.zeros((2, 4), "int32"))


@pytest.mark.parametrize(
    "calibration, match",
    [
        (None, "calibrates on data"),
        (np.zeros((4,), "int32"), "calibration must be token ids of shape"),
        (np.zeros((2, 4), "float32"), "calibration must be token ids of shape"),
        ({"ids": np.zeros((2, 4), "int32")}, "calibration dict must hold 'token_ids'"),
        (["some text"], "calibration strings need a tokenizer"),
    ],
    ids=["missing", "1-d", "float", "dict-key", "strings-without-tokenizer"],
)
def test_calibration_errors(calibration, match):
    with pytest.raises(ValueError, match=match):
        calibration_config(_gpt2(), "gptq", calibration)


def test_calibration_config_follows_the_token_rows():
    cfg = calibration_config(_gpt2(), "awq", _tokens(6), group_size=-1)
    assert isinstance(cfg, keras.quantizers.AWQConfig)
    assert (cfg.num_samples, cfg.sequence_length, cfg.group_size) == (6, SEQ, -1)
    with pytest.raises(ValueError, match="calibration_config takes gptq or awq"):
        calibration_config(_gpt2(), "int8", _tokens())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gptq", "awq"])
def test_gptq_and_awq_quantize_a_causal_lm(tmp_path, mode):
    lm = _gpt2()
    x = _tokens(4)
    before = [w.copy() for w in lm.get_weights()]
    rep = quantize_keras_artifact(
        lm, tmp_path / f"lm_{mode}.keras", mode, calibration=x, group_size=-1, check_x=x
    )
    assert any("transformer_layer_0" in p for p in rep.quantized_layers)
    assert rep.raw_bytes > 0 and rep.float_raw_bytes > 0  # tiny: the config outweighs the kernels
    scale = float(np.abs(lm.predict(x, verbose=0)).max())
    assert 0 < rep.max_abs_diff < 0.5 * max(1.0, scale)
    for a, b in zip(before, lm.get_weights(), strict=True):  # the caller's model is untouched
        np.testing.assert_array_equal(a, b)
    assert not quantized_layers(lm)
    if not rep.reloadable:  # Keras 3.15: the file cannot be loaded back; the report says so
        assert "cannot load this" in rep.note
