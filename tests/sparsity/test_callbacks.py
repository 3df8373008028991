from __future__ import annotations

import glob

import numpy as np
import pytest
import tensorflow as tf

from keras_lean.sparsity import (
    ConstantSparsity,
    PruningSummaries,
    UpdatePruningStep,
    prune_low_magnitude,
)

from ._sparsity_models import compile_model, random_data, small_cnn


def _read_scalars(log_dir):
    out = {}
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return out


@pytest.mark.parametrize(
    "update_freq,expected_points", [("epoch", 2), (1, 4)], ids=["epoch", "every-batch"]
)
def test_pruning_summaries_writes_per_layer_sparsity(tmp_path, update_freq, expected_points):
    x, y = random_data(64)
    model = compile_model(prune_low_magnitude(small_cnn(), ConstantSparsity(0.7, frequency=1)))
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        verbose=0,
        callbacks=[PruningSummaries(tmp_path, update_freq=update_freq), UpdatePruningStep()],
    )
    scalars = _read_scalars(tmp_path)
    for layer in ("conv", "hidden", "logits"):
        points = scalars[f"sparsity/{layer}/kernel"]
        assert len(points) == expected_points
        assert points[-1][1] == pytest.approx(0.7, abs=0.03)
    assert scalars["pruning_step/hidden"][-1][1] == 4
    assert [s for s, _ in scalars["sparsity/hidden/kernel"]] == sorted(
        s for s, _ in scalars["sparsity/hidden/kernel"]
    )
    assert np.isfinite([v for _, v in scalars["sparsity/conv/kernel"]]).all()


def test_pruning_summaries_rejects_bad_update_freq(tmp_path):
    with pytest.raises(ValueError, match=r"update_freq must be 'epoch' or a positive int"):
        PruningSummaries(tmp_path, update_freq="batch")
