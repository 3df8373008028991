from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

from keras_lean.sparsity.schedules import (
    ConstantSparsity,
    PolynomialDecay,
    TfmotScheduleAdapter,
    as_schedule,
    import_tfmot,
)

tfmot = import_tfmot()


class HalvingSchedule(tfmot.sparsity.keras.PruningSchedule):
    """A user subclass of TFMOT's schedule, defined at module level (importable)."""

    def __init__(self, sparsity, frequency=2):
        self.sparsity = sparsity
        self.frequency = frequency

    def __call__(self, step):
        return (
            self._should_prune_in_step(step, 0, -1, self.frequency),
            keras.ops.convert_to_tensor(self.sparsity, "float32"),
        )

    def get_config(self):
        return {
            "class_name": "HalvingSchedule",
            "config": {"sparsity": self.sparsity, "frequency": self.frequency},
        }


def _values(schedule, steps):
    out = []
    for s in steps:
        prune, sparsity = schedule(np.int64(s))
        out.append((bool(prune), float(sparsity)))
    return out


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (ConstantSparsity(0.6, 3, 20, 4), tfmot.sparsity.keras.ConstantSparsity(0.6, 3, 20, 4)),
        (ConstantSparsity(0.3), tfmot.sparsity.keras.ConstantSparsity(0.3, 0)),
        (
            PolynomialDecay(0.1, 0.9, 2, 30, power=3, frequency=3),
            tfmot.sparsity.keras.PolynomialDecay(0.1, 0.9, 2, 30, power=3, frequency=3),
        ),
        (
            PolynomialDecay(0.0, 0.75, 0, 17, power=2, frequency=1),
            tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, 0, 17, power=2, frequency=1),
        ),
    ],
    ids=["constant-range", "constant-default", "poly-cubic", "poly-square"],
)
def test_matches_tfmot_step_by_step(ours, theirs):
    steps = range(0, 45)
    got, want = _values(ours, steps), _values(theirs, steps)
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_array_equal([g[1] for g in got], [w[1] for w in want])


@pytest.mark.parametrize(
    "schedule",
    [ConstantSparsity(0.5, 1, 9, 2), PolynomialDecay(0.2, 0.8, 0, 100, power=2, frequency=7)],
    ids=["constant", "poly"],
)
def test_round_trip(schedule):
    again = type(schedule).from_config(schedule.get_config())
    assert again == schedule
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert restored == schedule and type(restored) is type(schedule)


def test_tfmot_builtins_become_native_adapters():
    s = as_schedule(tfmot.sparsity.keras.PolynomialDecay(0.1, 0.7, 5, 50, frequency=5))
    assert isinstance(s, PolynomialDecay)
    assert s.get_config()["end_step"] == 50 and s.get_config()["final_sparsity"] == 0.7


def test_user_tfmot_subclass_round_trips():
    adapter = as_schedule(HalvingSchedule(0.4, frequency=3))
    assert isinstance(adapter, TfmotScheduleAdapter) and adapter.serializable
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(adapter))
    assert isinstance(restored.schedule, HalvingSchedule)
    assert _values(restored, range(7)) == _values(adapter, range(7))
    assert _values(adapter, [0, 1, 3]) == [
        (True, pytest.approx(0.4)),
        (False, pytest.approx(0.4)),
        (True, pytest.approx(0.4)),
    ]


def test_local_user_subclass_warns_and_refuses_to_serialize():
    class Local(tfmot.sparsity.keras.PruningSchedule):
        def __call__(self, step):
            return keras.ops.equal(step, 0), keras.ops.convert_to_tensor(0.5)

        def get_config(self):
            return {}

    with pytest.warns(UserWarning, match="cannot be saved"):
        adapter = as_schedule(Local())
    assert not adapter.serializable
    assert bool(adapter(0)[0])
    with pytest.raises(ValueError, match="cannot be serialized.*inside a function"):
        adapter.get_config()


def test_dict_configs():
    s = as_schedule({"class_name": "ConstantSparsity", "config": {"target_sparsity": 0.2}})
    assert s == ConstantSparsity(0.2)
    keras_form = keras.saving.serialize_keras_object(PolynomialDecay(0.0, 0.5, 0, 10))
    assert as_schedule(keras_form) == PolynomialDecay(0.0, 0.5, 0, 10)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: ConstantSparsity(1.5),
            r"target_sparsity must be in \[0, 1\)\. Received: target_sparsity=1.5",
        ),
        (lambda: ConstantSparsity(-0.1), r"target_sparsity must be in \[0, 1\)"),
        (lambda: PolynomialDecay(0.1, 1.0, 0, 10), r"final_sparsity must be in \[0, 1\)"),
        (lambda: PolynomialDecay(0.1, 0.5, 0, -1), r"end_step must be >= begin_step"),
        (lambda: ConstantSparsity(0.5, begin_step=-2), r"begin_step must be >= 0"),
        (
            lambda: ConstantSparsity(0.5, 5, 2),
            r"end_step must be -1 \(prune forever\) or >= begin_step",
        ),
        (lambda: ConstantSparsity(0.5, frequency=0), r"frequency must be > 0"),
        (lambda: ConstantSparsity(0.5, begin_step=1.5), r"begin_step must be an integer"),
        (lambda: as_schedule("constant"), r"pruning_schedule must be a keras_lean"),
        (lambda: as_schedule({"class_name": "Nope"}), r"pruning_schedule dict must be"),
        (
            lambda: as_schedule({"class_name": "ConstantSparsity", "config": {}, "typo": 1}),
            r"Unknown key\(s\) \['typo'\]",
        ),
    ],
    ids=[
        "sparsity-high",
        "sparsity-negative",
        "final-1",
        "poly-forever",
        "begin-negative",
        "end-before-begin",
        "frequency-0",
        "begin-float",
        "bad-type",
        "bad-dict",
        "dict-typo",
    ],
)
def test_validation_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


_ENV_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import keras_lean
    import keras_lean.sparsity
    assert "tensorflow_model_optimization" not in sys.modules, "sparsity imported TFMOT eagerly"
    before = os.environ.get("TF_USE_LEGACY_KERAS", "<absent>")
    import numpy as np, keras
    from keras_lean.sparsity import prune_low_magnitude
    from keras_lean.sparsity.schedules import import_tfmot
    tfmot = import_tfmot()
    sched = tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=1)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    pruned = prune_low_magnitude(model, sched)
    pruned.compile("sgd", "mse")
    pruned.fit(np.ones((8, 4)), np.ones((8, 3)), verbose=0)
    import tensorflow as tf
    after = os.environ.get("TF_USE_LEGACY_KERAS", "<absent>")
    print("ENV", before, after)
    print("DENSE", tf.keras.layers.Dense.__module__)
    """
)


@pytest.mark.parametrize(
    "initial",
    [None, pytest.param("0", marks=pytest.mark.slow)],  # a fresh TF process costs ~10 s
    ids=["absent", "zero"],
)
def test_process_keras_choice_left_untouched(initial):
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    if initial is not None:
        env["TF_USE_LEGACY_KERAS"] = initial
    out = subprocess.run(
        [sys.executable, "-c", _ENV_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = "<absent>" if initial is None else initial
    assert f"ENV {expected} {expected}" in out.stdout
    dense_module = [line for line in out.stdout.splitlines() if line.startswith("DENSE")][0]
    assert dense_module.split()[1].startswith("keras.src"), dense_module


def test_import_tfmot_restores_env_in_process(monkeypatch):
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_tfmot()
    assert os.environ["TF_USE_LEGACY_KERAS"] == "0"


def test_user_tfmot_subclass_survives_keras_file(tmp_path):
    from keras_lean.sparsity import prune_low_magnitude, pruning_wrappers

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="d")(inputs))
    pruned = prune_low_magnitude(model, HalvingSchedule(0.25, frequency=5))
    pruned.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    schedule = pruning_wrappers(loaded)[0].pruning_schedule
    assert isinstance(schedule.schedule, HalvingSchedule)
    assert schedule.config == {"sparsity": 0.25, "frequency": 5}
