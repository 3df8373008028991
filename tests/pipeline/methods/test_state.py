"""`save_state` / `load_state`: deploy's fresh method instance reports what finetune learned.

Deploy builds new method objects from the recipe, loads `RUN/methods/<name>.json`, finalizes the
fine-tuned model and uses `report()` as is, so that report must equal the finetune instance's.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_lean.pipeline.methods import get_method_class
from keras_lean.pipeline.methods.base import Data, FinetunePlan

PLAN = FinetunePlan(epochs=1, steps_per_epoch=4, batch_size=16)

CASES = {
    "magnitude": {"target_sparsity": 0.5, "schedule": {"frequency": 1}},
    "structured": {"ratio": 0.5, "schedule": {"frequency": 1}},
    "lowrank": {"rank": 4},
    "lora": {"rank": 2},
}


def _model():
    inputs = keras.Input((16,))
    x = keras.layers.Dense(24, activation="relu", name="h")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_fresh_instance_reports_what_finetune_learned(name, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype("float32")
    y = rng.integers(0, 3, size=64).astype("int32")
    data = Data(x, y, x[:16], y[:16], 3)
    cls = get_method_class(name)
    options = cls.options_class.from_dict(CASES[name])
    trained = cls(options)
    model = trained.prepare(_model(), data, PLAN)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=PLAN.batch_size, epochs=1, verbose=0)
    path = tmp_path / "finetuned.keras"
    model.save(path)
    expected_out = trained.finalize(model)(x[:8])
    expected = json.loads(json.dumps(trained.report()))
    trained.save_state(tmp_path / "methods")
    assert json.loads((tmp_path / "methods" / f"{name}.json").read_text())["method"] == name

    import keras_lean.structured  # noqa: F401  (registers the mask layers, as load_model does)

    fresh = cls(options)
    fresh.load_state(tmp_path / "methods")
    deployed = fresh.finalize(keras.models.load_model(path))
    assert json.loads(json.dumps(fresh.report())) == expected
    np.testing.assert_allclose(deployed(x[:8]), expected_out, rtol=1e-5, atol=1e-5)
    # Without the state file the fresh instance knows less: the state is what carries it.
    bare = cls(options)
    bare.finalize(keras.models.load_model(path))
    if cls.state_attributes:
        assert json.loads(json.dumps(bare.report())) != expected
