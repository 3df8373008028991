"""The combination users ask for: structured pruning + LoRA, through the five pipeline steps."""

from __future__ import annotations

import keras
import pytest
import yaml

from keras_lean.lowrank import lora_layers
from keras_lean.pipeline import configure, deploy, finetune, report, validate
from keras_lean.pipeline.rundir import RunDir


@pytest.mark.parametrize("mode", ["oneshot", "gradual"])
def test_structured_then_lora_shrinks_merges_and_trains_only_adapters(trained_run, mode):
    run = RunDir(trained_run)
    configure(run, methods=["structured", "lora"], epochs=2, jit_compile="off", force=True)
    text = yaml.safe_load(run.recipe.read_text())
    text["structured"].update({"ratio": 0.5, "mode": mode})
    text["lora"]["rank"] = 4
    run.recipe.write_text(yaml.safe_dump(text))
    baseline = keras.models.load_model(run.baseline)

    ft = finetune(run, verbose=0)
    methods = ft.entry["details"]["methods"]
    assert set(methods) == {"structured", "lora"}
    # LoRA froze the base: far fewer trainable than total parameters during fine-tuning.
    lora = methods["lora"]
    assert 0 < lora["trainable_params"] < 0.2 * lora["total_params"]

    validate(run)
    d = deploy(run, quantization="none")
    plain = keras.models.load_model(d.artifacts["keras"])
    assert not lora_layers(plain), "adapters must be merged at deploy"
    assert all(layer.trainable for layer in plain.layers)
    # The channels really went away: about half the conv/dense widths, far fewer parameters.
    widths = {
        layer.name: getattr(layer, "filters", None) or getattr(layer, "units", None)
        for layer in plain.layers
    }
    assert widths["conv1"] == 16 and widths["conv2"] == 32 and widths["dense1"] == 64
    assert widths["output"] == 10
    assert plain.count_params() < 0.4 * baseline.count_params()
    # The deployed model still classifies.
    assert d.entry["accuracy"] > 0.5
    # Deploy's fresh method instances still report the widths recorded at finetune.
    structure = d.entry["details"]["methods"]["structured"]["structure"]
    after = {r["name"]: r["width_after"] for r in structure["layers"]}
    assert after["conv1"] == 16 and after["dense1"] == 64
    assert "structured widths: conv1 32->16" in report(run).table()
