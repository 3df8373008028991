"""`structured.mode: progressive` in the pipeline: the accuracy guard and `--resume`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal

import keras
import numpy as np
import pytest
import yaml

from keras_lean.pipeline import Recipe, configure, finetune
from keras_lean.pipeline.guard import run_stages
from keras_lean.pipeline.methods.base import Data
from keras_lean.pipeline.methods.structured import StructuredMethod, StructuredOptions
from keras_lean.pipeline.recipe import GuardOptions
from keras_lean.pipeline.steps import checkpoint

L = keras.layers


class _Fit:
    """What `PipelineFit` gives a method that runs its own loop (no checkpoints)."""

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    jit_compile = False
    verbose = 0
    seed = 0

    def optimizer(self):
        return keras.optimizers.Adam(1e-3)

    def scope(self):
        return contextlib.nullcontext()

    def energy_window(self, name):
        return contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        raise AssertionError("progressive stages train in their own loop, not the pipeline fit")


def _mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    x = L.Dense(32, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def test_recipe_guard_accepts_progressive_only():
    guard = {"stages": [0.25, 0.5]}
    for mode in ("gradual", "oneshot"):
        with pytest.raises(ValueError, match=f"in mode {mode}: .*Use structured.mode: progressive"):
            Recipe.from_dict(
                {"version": 1, "methods": ["structured"], "guard": guard,
                 "structured": {"mode": mode}}
            )  # fmt: skip
    r = Recipe.from_dict(
        {"version": 1, "methods": ["structured"], "guard": guard,
         "structured": {"mode": "progressive"}}
    )  # fmt: skip
    assert r.guard.enabled


@pytest.mark.parametrize(
    "accuracies, kept",
    [([0.95, 0.80], 1), ([0.80], None)],
    ids=["rolls-back-to-stage-1", "none-within"],
)
def test_guard_stages_end_on_shrunk_models_and_roll_back_to_the_smaller_one(
    digits, accuracies, kept
):
    x_train, y_train, x_val, y_val = digits
    data = Data(x_train[:64].reshape(64, -1), y_train[:64], x_val[:32].reshape(32, -1),
                y_val[:32], 10)  # fmt: skip
    model = _mlp()
    seen = []

    def evaluate(m):
        seen.append(m.get_layer("hidden").units)
        return accuracies[len(seen) - 1]

    options = StructuredOptions.from_dict(
        {"mode": "progressive", "shrink_when": "always", "schedule": {"frequency": 1}}
    )
    out = run_stages(
        model,
        StructuredMethod(options),
        data,
        guard=GuardOptions(stages=(0.25, 0.5), epochs_per_stage=1),
        steps_per_epoch=2,
        batch_size=32,
        fit=_Fit(),
        evaluate=evaluate,
        baseline_accuracy=0.95,
        max_accuracy_drop=0.02,
    )
    assert seen == [24, 16][: len(accuracies)]  # stage 2 removes 50 % of the baseline's units
    assert out.kept_stage == kept
    if kept is None:
        assert out.model is model
    else:
        assert out.model.get_layer("hidden").units == seen[kept - 1]
        assert out.method.options.ratio == (0.25, 0.5)[kept - 1]
        assert out.method.report()["progressive"]["shrinks_run"] >= 1
    assert model.get_layer("hidden").units == 32  # the baseline is not changed


def _progressive_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    schedule = {"initial_sparsity": 0.25, "begin": 5, "end": 20, "unit": "steps", "frequency": 15}
    recipe.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "methods": ["structured"],
                "structured": {"ratio": 0.5, "mode": "progressive", "shrink_when": "always",
                               "schedule": schedule},
            }
        )
    )  # fmt: skip
    return recipe


class _Stop(Exception):
    pass


@pytest.mark.slow  # three fine-tunes; the library-level resume test runs by default
def test_resumed_progressive_run_ends_like_an_uninterrupted_one(trained_run, tmp_path, monkeypatch):
    """Shrinks at steps 5 (epoch 1) and 20 (epoch 2) of 13-step epochs; stopped after the
    checkpoint of epoch 1, resumed: the same weights as a run left alone."""
    configure(trained_run, recipe=_progressive_recipe(tmp_path), epochs=2, batch_size=32,
              jit_compile="off", force=True)  # fmt: skip
    other = tmp_path / "uninterrupted"
    shutil.copytree(trained_run, other)
    save = checkpoint.save_checkpoint
    seen = {}

    def save_then_stop(run, model, state):
        save(run, model, state)
        seen["units"] = model.get_layer("conv1").filters
        seen["progressive"] = "method_state" in state and state["method_state"]["epoch"] == 1
        raise _Stop

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        finetune(trained_run, verbose=0)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert seen["units"] < 32 and seen["progressive"]  # the checkpoint holds the shrunk model
    resumed = finetune(trained_run, resume=True, verbose=0)
    alone = finetune(other, verbose=0)
    assert resumed.entry["details"]["resumed_from_epoch"] == 1
    a = keras.models.load_model(trained_run / "finetuned.keras")
    b = keras.models.load_model(other / "finetuned.keras")
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=1e-5)
    ra = resumed.entry["details"]["methods"]["structured"]["progressive"]
    rb = alone.entry["details"]["methods"]["structured"]["progressive"]
    assert [s["step"] for s in ra["shrinks"]] == [s["step"] for s in rb["shrinks"]] == [5, 20]
    assert len(ra["epochs"]) == 2


def test_ctrl_c_in_the_progressive_loop_stops_after_the_step_like_the_fit(
    trained_run, tmp_path, monkeypatch
):
    """SIGINT as step 19 begins (epoch 2, its 6th step of 13): that step finishes, the run
    stops with the normal fine-tune's message and exit code, the checkpoint of epoch 1 stays."""
    from click.testing import CliRunner

    from keras_lean.cli import cli
    from keras_lean.structured import progressive_loop

    configure(trained_run, recipe=_progressive_recipe(tmp_path), epochs=2, batch_size=32,
              jit_compile="off", force=True)  # fmt: skip
    begin = progressive_loop.SegmentCallback.on_train_batch_begin
    finished = []

    def signal_at_step_18(self, batch, logs=None):
        if self.step == 18:
            os.kill(os.getpid(), signal.SIGINT)
        begin(self, batch, logs)

    def counted_end(
        self, batch, logs=None, _end=progressive_loop.SegmentCallback.on_train_batch_end
    ):
        finished.append(self.step)
        _end(self, batch, logs)

    monkeypatch.setattr(progressive_loop.SegmentCallback, "on_train_batch_begin", signal_at_step_18)
    monkeypatch.setattr(progressive_loop.SegmentCallback, "on_train_batch_end", counted_end)
    handler = signal.getsignal(signal.SIGINT)
    r = CliRunner().invoke(cli, ["finetune", "--out", str(trained_run), "-q"])
    assert r.exit_code == 130, r.output
    assert "Interrupted: interrupted in epoch 2 after step 6; a resume continues from the " \
        "checkpoint of epoch 1" in r.output  # fmt: skip
    assert f"resume with `keras-lean finetune --out {trained_run} --resume`" in r.output
    assert finished[-1] == 18  # the step under way when the signal came finished, no other
    state = json.loads((trained_run / "checkpoint.json").read_text())
    assert state["epoch"] == 1 and state["method_state"]["epoch"] == 1
    assert (trained_run / "checkpoint.keras").exists()
    assert not (trained_run / "finetuned.keras").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back


@pytest.mark.parametrize("other", ["magnitude", "movement", "lottery"], ids=lambda n: n)
def test_progressive_refuses_methods_that_cannot_shrink_with_the_reason(other):
    with pytest.raises(ValueError, match=f"progressive cannot be combined with '{other}': it "
                       "cannot shrink during training"):  # fmt: skip
        Recipe.from_dict(
            {"version": 1, "methods": ["structured", other], "structured": {"mode": "progressive"}}
        )


def test_lora_with_progressive_slices_the_adapters_then_merges(digits):
    from keras_lean.pipeline.methods.base import FinetunePlan
    from keras_lean.pipeline.methods.lora import LoraMethod, LoraOptions

    recipe = Recipe.from_dict(
        {"version": 1, "methods": ["structured", "lora"], "lora": {"rank": 2},
         "structured": {"mode": "progressive", "shrink_when": "always",
                        "schedule": {"frequency": 1}}}
    )  # fmt: skip
    x_train, y_train, x_val, y_val = digits
    data = Data(x_train[:64].reshape(64, -1), y_train[:64], x_val[:32].reshape(32, -1),
                y_val[:32], 10)  # fmt: skip
    plan = FinetunePlan(epochs=1, steps_per_epoch=2, batch_size=32)
    structured = StructuredMethod(recipe.method_options["structured"])
    lora = LoraMethod(LoraOptions(rank=2))
    model = lora.prepare(structured.prepare(_mlp(), data, plan), data, plan)
    assert model.get_layer("hidden").lora_rank == 2
    small = structured.finetune(model, data, plan, _Fit())
    hidden = small.get_layer("hidden")
    assert hidden.units == 16 and hidden.lora_rank == 2
    assert tuple(hidden.lora_kernel_b.shape) == (2, 16)
    merged = structured.finalize(lora.finalize(small))  # deploy: in reverse order
    assert not any("lora_" in v.path for v in merged.weights)
    np.testing.assert_allclose(merged(data.x_val[:4]), small(data.x_val[:4]), atol=1e-5)
