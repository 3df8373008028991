from __future__ import annotations

import numpy as np
import pytest

from keras_lean.pipeline import build_model
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.methods.magnitude import (
    MagnitudeMethod,
    MovementMethod,
    PruningOptions,
    ScheduleOptions,
)
from keras_lean.pipeline.options import parse_section


@pytest.mark.parametrize(
    "opts, total, expected",
    [
        (ScheduleOptions(begin=0.0, end=0.7, frequency=10), 180, (0, 120, 10)),
        (ScheduleOptions(begin=0.1, end=1.0, frequency=7), 50, (5, 47, 7)),
        (ScheduleOptions(begin=2, end=30, unit="steps", frequency=5), 100, (2, 32, 5)),
        (ScheduleOptions(begin=0.0, end=1.0, frequency=100), 20, (0, 19, 19)),
    ],
    ids=["fraction", "fraction-clamped", "steps", "shorter-than-frequency"],
)
def test_schedule_steps_end_on_a_pruning_step(opts, total, expected):
    begin, end, freq = opts.steps(total)
    assert (begin, end, freq) == expected
    assert (end - begin) % freq == 0 and end <= total - 1


def test_options_validation():
    with pytest.raises(ValueError, match=r"m_by_n: must be \[m, n\] with 0 < m < n"):
        PruningOptions(m_by_n=(4, 2))
    with pytest.raises(ValueError, match="m_by_n: cannot be combined with block_size"):
        PruningOptions(m_by_n=(2, 4), block_size=(1, 4))
    with pytest.raises(ValueError, match=r"magnitude\.block_size: must be a pair of ints"):
        parse_section(PruningOptions, {"block_size": 4}, "magnitude")
    with pytest.raises(ValueError, match=r"movement\.include: must be a list"):
        parse_section(PruningOptions, {"include": 3}, "movement")
    with pytest.raises(ValueError, match=r"begin: must be in \[0, 1\]"):
        ScheduleOptions(begin=2.0, end=3.0)
    with pytest.raises(TypeError, match="magnitude options must be PruningOptions"):
        MagnitudeMethod({"target_sparsity": 0.5})


def _plan(n=64, batch=16, epochs=2):
    return FinetunePlan(epochs=epochs, steps_per_epoch=n // batch, batch_size=batch)


def test_layer_selection_with_patterns_and_overrides():
    model = build_model("cnn", (8, 8, 1), 10)
    m = MagnitudeMethod(
        PruningOptions.from_dict(
            {
                "include": ["conv*", "dense1"],
                "exclude": ["conv1"],
                "overrides": {"dense*": {"target_sparsity": 0.5, "block_size": [1, 4]}},
            }
        )
    )
    chosen = m.layer_settings(model, _plan())
    assert sorted(chosen) == ["conv2", "dense1"]
    assert chosen["dense1"]["target_sparsity"] == 0.5 and chosen["dense1"]["block_size"] == (1, 4)
    assert chosen["conv2"]["target_sparsity"] == 0.8


@pytest.mark.parametrize(
    "section, match",
    [
        ({"include": ["dens*"], "exclude": ["nope"]}, r"exclude: pattern 'nope' matches no layer"),
        ({"overrides": {"ghost": {"target_sparsity": 0.1}}}, r"pattern 'ghost' matches no layer"),
        ({"include": ["pool"]}, r"names layer 'pool' of type MaxPooling2D, which cannot be"),
        ({"include": ["*"], "exclude": ["*"]}, r"no prunable layer selected"),
    ],
    ids=["exclude-typo", "override-typo", "not-prunable", "nothing-left"],
)
def test_layer_selection_errors(section, match):
    model = build_model("cnn", (8, 8, 1), 10)
    with pytest.raises(ValueError, match=match):
        MagnitudeMethod(PruningOptions.from_dict(section)).layer_settings(model, _plan())


@pytest.mark.parametrize(
    "method_cls", [MagnitudeMethod, MovementMethod], ids=["magnitude", "movement"]
)
def test_prepare_fit_finalize_reaches_the_target(digits, method_cls):
    from keras_lean.sparsity import PruneLowMagnitude, sparsity_report

    x_train, y_train, x_val, y_val = digits
    data = Data(x_train[:64], y_train[:64], x_val[:32], y_val[:32], 10)
    model = build_model("mlp", (8, 8, 1), 10)
    plan = _plan()
    opts = PruningOptions.from_dict(
        {"target_sparsity": 0.75, "schedule": {"frequency": 2, "end": 0.5}, "exclude": ["output"]}
    )
    method = method_cls(opts)
    wrapped = method.prepare(model, data, plan)
    assert not any(isinstance(layer, PruneLowMagnitude) for layer in model.layers)
    assert sum(isinstance(layer, PruneLowMagnitude) for layer in wrapped.layers) == 2
    wrapped.compile("adam", "sparse_categorical_crossentropy")
    wrapped.fit(
        data.x_train, data.y_train, batch_size=plan.batch_size, epochs=plan.epochs, verbose=0
    )
    final = method.finalize(wrapped)
    assert not any(isinstance(layer, PruneLowMagnitude) for layer in final.layers)
    rows = {r.name: r.sparsity for r in sparsity_report(final).layers}
    assert rows["dense1"] == pytest.approx(0.75, abs=1e-3)
    assert rows["dense2"] == pytest.approx(0.75, abs=1e-3)
    assert rows["output"] == 0.0
    np.testing.assert_allclose(
        final.predict(data.x_val, verbose=0), wrapped.predict(data.x_val, verbose=0), atol=1e-5
    )
    rep = method.report()
    assert rep["criterion"] == method_cls.criterion
    assert rep["schedule"]["end_step"] == 4 and rep["final"]["layers"]["dense1"] > 0.74


def test_check_combination():
    MagnitudeMethod.check_combination(["structured", "magnitude"])
    with pytest.raises(
        ValueError, match="'movement' cannot be combined with 'magnitude': both prune"
    ):
        MovementMethod.check_combination(["movement", "magnitude"])
    with pytest.raises(ValueError, match="cannot be combined with 'lottery'"):
        MagnitudeMethod.check_combination(["magnitude", "lottery"])
