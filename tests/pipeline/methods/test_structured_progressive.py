"""`structured.mode: progressive`: the method runs the fine-tune and shrinks at the events."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
import yaml

from keras_lean.pipeline import configure, deploy, finetune, load_recipe
from keras_lean.pipeline.methods import method_names
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.methods.registry import registered_class
from keras_lean.pipeline.methods.structured import StructuredMethod, StructuredOptions
from keras_lean.pipeline.options import RecipeError
from keras_lean.pipeline.recipe import Recipe

L = keras.layers


def _cnn():
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(16, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(24, activation="relu", name="d1")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


class _Fit:
    """What `PipelineFit` gives a method that runs its own loop."""

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    jit_compile = False
    verbose = 0
    seed = 0

    def __init__(self):
        self.windows = []

    def optimizer(self):
        return keras.optimizers.Adam(1e-3)

    def scope(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def energy_window(self, name):
        self.windows.append(name)
        yield None


@pytest.mark.parametrize(
    "other",
    [n for n in method_names() if not registered_class(n).can_shrink_progressively],
    ids=lambda n: n,
)
def test_progressive_is_refused_with_a_method_that_cannot_shrink(other):
    options = {"structured": StructuredOptions(mode="progressive")}
    with pytest.raises(RecipeError, match=f"progressive cannot be combined with '{other}'"):
        Recipe(methods=(other, "structured"), method_options=options)
    Recipe(methods=("structured",), method_options=options)  # alone it is fine


def test_method_contract(digits):
    x_train, y_train, x_val, y_val = digits
    data = Data(x_train[:192], y_train[:192], x_val[:64], y_val[:64], 10)
    plan = FinetunePlan(epochs=2, steps_per_epoch=6, batch_size=32)
    options = StructuredOptions.from_dict(
        {"ratio": 0.5, "mode": "progressive", "schedule": {"frequency": 2}}
    )
    method = StructuredMethod(options)
    model = _cnn()
    assert method.prepare(model, data, plan) is model
    fit = _Fit()
    small = method.finetune(model, data, plan, fit)
    assert small.get_layer("c1").filters == 8 and small.get_layer("d1").units == 12
    assert method.pruning_end_step(plan) == method.report()["schedule_steps"]["end_step"]
    assert "progressive/epoch_1" in fit.windows and "progressive/shrink_1" in fit.windows
    report = method.report()
    progressive = report["progressive"]
    assert progressive["shrinks_run"] >= 1 and report["epochs_run"] == 2
    flops = [s["flops"] for s in progressive["segments"]]
    assert flops[-1] < flops[0]
    assert "val_accuracy" in progressive["epochs"][-1]["metrics"]
    assert report["structure"]["params_after"] == small.count_params()
    lines = StructuredMethod.report_lines(report)
    assert lines[0].startswith("structured widths: c1 16->8")
    assert lines[1].startswith(f"progressive: {progressive['shrinks_run']} shrinks")
    assert len(lines) == 2 + len(progressive["segments"]) and "FLOPs" in lines[2]
    same = method.finalize(small)
    np.testing.assert_allclose(same(x_val[:8]), small(x_val[:8]), atol=1e-6)


def test_pipeline_run_records_segments(trained_run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "methods": ["structured"],
                "structured": {"ratio": 0.5, "mode": "progressive", "schedule": {"frequency": 4}},
            }
        )
    )
    configure(trained_run, recipe=recipe, epochs=2, batch_size=32, jit_compile="off", force=True)
    assert load_recipe(trained_run / "recipe.yaml").method_options["structured"].mode == (
        "progressive"
    )
    ft = finetune(trained_run, verbose=0)
    details = ft.entry["details"]
    progressive = details["methods"]["structured"]["progressive"]
    assert details["epochs_run"] == 2 and progressive["shrinks_run"] >= 1
    segments = progressive["segments"]
    assert segments[-1]["params"] < segments[0]["params"] and all(
        s["energy_j"] is not None for s in segments
    )
    assert ft.entry["params"] == segments[-1]["params"]
    d = deploy(trained_run, quantization="none")
    plain = keras.models.load_model(d.artifacts["keras"])
    assert plain.get_layer("conv1").filters == 16
