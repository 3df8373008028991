"""A fine-tune interrupted and resumed is the same run as an uninterrupted one.

Resume continues from the last per-epoch checkpoint (a mid-epoch interrupt rolls back to the
epoch boundary); the data order and dropout seeds of every epoch are drawn from (seed, epoch)
(`keras_lean.pipeline.resume`), so the resumed run repeats the uninterrupted one exactly:
masks, weights and optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_lean.pipeline import RunDir, configure, finetune
from keras_lean.pipeline.interrupt import TrainingInterrupted, interrupt_callback
from keras_lean.pipeline.lock import LOCK_NAME
from keras_lean.pipeline.resume import EpochOrderedData, epoch_permutation
from keras_lean.sparsity import get_masks

# Tolerances: the resumed run does the same float operations in the same order.
ATOL = 1e-6


# ------------------------------------------------------------------------------ the data order


def test_each_epochs_order_depends_only_on_seed_and_epoch():
    a = EpochOrderedData(np.arange(10), np.arange(10), batch_size=4, seed=3, epochs=3)
    b = EpochOrderedData(
        np.arange(10), np.arange(10), batch_size=4, seed=3, initial_epoch=2, epochs=3
    )
    assert a.steps_per_epoch == 3 and len(a) == 9 and len(b) == 3
    epoch2 = np.concatenate([a[i][1] for i in range(6, 9)])
    assert np.array_equal(epoch2, np.concatenate([b[i][1] for i in range(3)]))
    assert np.array_equal(epoch2, epoch_permutation(10, 3, 2))
    assert sorted(epoch2) == list(range(10))  # every sample once per epoch
    assert not np.array_equal(epoch2, epoch_permutation(10, 3, 1))
    x, y = a[1]
    assert np.array_equal(x, y) and len(y) == 4  # inputs and labels stay paired
    assert len(a[2][1]) == 2  # the last batch of an epoch is the remainder
    with pytest.raises(IndexError, match="batch index 9 out of range"):
        a[9]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"initial_epoch": 3}, "0 <= initial_epoch < epochs"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0)}, "at least one training sample"),
    ],
    ids=["batch-size", "epoch-range", "empty"],
)
def test_bad_arguments_are_errors(kw, match):
    args = {"x": np.zeros((4, 2)), "y": np.zeros(4), "batch_size": 2, "seed": 0, "epochs": 3}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        EpochOrderedData(args.pop("x"), args.pop("y"), **args)


def _dropout_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5)(x)
    m = keras.Model(inputs, keras.layers.Dense(3)(x))
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def _fit(model, x, y, initial_epoch, epochs):
    data = EpochOrderedData(x, y, batch_size=8, seed=5, initial_epoch=initial_epoch, epochs=epochs)
    model.fit(
        data,
        steps_per_epoch=data.steps_per_epoch,
        shuffle=False,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=[data.callback()],
        verbose=0,
    )


def _assert_same_state(a: keras.Model, b: keras.Model) -> None:
    assert [v.shape for v in a.weights] == [v.shape for v in b.weights]
    for va, vb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), atol=ATOL, err_msg=va.path)
    opt_a, opt_b = a.optimizer.variables, b.optimizer.variables
    # Compared by position: Keras numbers layer and optimizer names per process ("dense_2").
    assert [v.shape for v in opt_a] == [v.shape for v in opt_b] and len(opt_a) > 2
    for va, vb in zip(opt_a, opt_b, strict=True):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), atol=ATOL, err_msg=va.path)


def test_a_model_with_dropout_resumed_from_a_saved_epoch_matches(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)).astype("float32"), rng.integers(0, 3, 50)
    whole = _dropout_model()
    _fit(whole, x, y, 0, 3)

    part = _dropout_model()
    _fit(part, x, y, 0, 1)
    part.save(tmp_path / "epoch1.keras")
    # A loaded model's seed generators start elsewhere; the epoch reseed makes that irrelevant.
    resumed = keras.models.load_model(tmp_path / "epoch1.keras")
    _fit(resumed, x, y, 1, 3)
    _assert_same_state(whole, resumed)


# ------------------------------------------------------------------------------ the fine-tune


class _SignalAt(keras.callbacks.Callback):
    """Sends this process SIGINT at the start of (epoch, batch), as Ctrl-C would."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def _finetuned(run: RunDir) -> keras.Model:
    return keras.models.load_model(run.finetuned)


def _assert_same_finetune(a: RunDir, b: RunDir) -> None:
    ma, mb = _finetuned(a), _finetuned(b)
    masks_a, masks_b = get_masks(ma), get_masks(mb)
    assert masks_a.keys() == masks_b.keys() and masks_a
    for k in masks_a:
        assert np.array_equal(masks_a[k], masks_b[k]), k
    _assert_same_state(ma, mb)
    sparsity = [
        json.loads(r.report_file.read_text())["stages"][-1]["details"]["methods"]["magnitude"][
            "final"
        ]["sparsity"]
        for r in (a, b)
    ]
    assert sparsity[0] == sparsity[1] == pytest.approx(0.6, abs=0.01)


@pytest.fixture
def two_runs(trained_run, tmp_path):
    """Two copies of one configured run folder: one to interrupt, one to leave alone."""
    run = RunDir(trained_run)
    configure(run, epochs=3, batch_size=32, jit_compile="off", target_sparsity=0.6, force=True)
    other = tmp_path / "uninterrupted"
    shutil.copytree(trained_run, other)
    return run, RunDir(other)


def test_interrupted_mid_epoch_and_resumed_equals_uninterrupted(two_runs):
    run, reference = two_runs
    finetune(reference, verbose=0)

    with pytest.raises(TrainingInterrupted) as info:
        finetune(run, verbose=0, callbacks=[_SignalAt(epoch=1, batch=5), interrupt_callback()])
    assert (info.value.epoch, info.value.step, info.value.completed_epochs) == (1, 6, 1)
    assert json.loads(run.checkpoint_state.read_text())["epoch"] == 1
    assert not run.finetuned.exists() and not (run.root / LOCK_NAME).exists()

    result = finetune(run, resume=True, verbose=0)
    assert result.record.details["resumed_from_epoch"] == 1
    _assert_same_finetune(run, reference)


# ------------------------------------------------------------------------------ real processes

# The CLI's `finetune`, with a callback that holds training at (epoch 2, after step 4) until the
# test releases it, so the test can act while the process is surely mid-epoch.
_DRIVER = textwrap.dedent(
    """
    import sys, time, pathlib
    import keras_lean.console as console
    from keras_lean.cli import main

    release = pathlib.Path(sys.argv[1])


    def hold():
        import keras  # here, inside the CLI's command, as the CLI itself imports it

        class Hold(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (self.epoch, batch) == (1, 3):
                    (release.parent / "held").touch()
                    while not release.exists():
                        time.sleep(0.02)

        return Hold()


    real = console.Console.callbacks
    console.Console.callbacks = lambda self, stage: [*real(self, stage), hold()]
    main(sys.argv[2:])
    """
)


def _wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# Heavy (a real SIGINT to a subprocess): slow-marked. The default suite covers the CLI resume in
# tests/test_cli.py::test_interrupted_finetune_then_resume.
@pytest.mark.slow
def test_ctrl_c_and_a_second_process_on_the_cli(two_runs, tmp_path):
    run, reference = two_runs
    release = tmp_path / "release"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(release), "finetune", "--out", str(run.root), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _wait_for(tmp_path / "held", first)

        # A second fine-tune of the same folder refuses at once, naming the first.
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "keras_lean.cli", "finetune", "--out", str(run.root), "-q"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr
        assert lines[0].startswith("Error: ") and "`finetune`" in lines[0]
        assert time.monotonic() - t0 < 60

        # Ctrl-C: the held step finishes, the process exits 130 saying how to resume.
        first.send_signal(signal.SIGINT)
        release.touch()
        out, err = first.communicate(timeout=120)
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    assert f"resume with `keras-lean finetune --out {run.root} --resume`" in err
    assert "interrupted in epoch 2 after step 4" in err and "checkpoint of epoch 1" in err
    assert "Traceback" not in err and "oneDNN" not in err
    assert json.loads(run.checkpoint_state.read_text())["epoch"] == 1
    assert not (run.root / LOCK_NAME).exists()

    # The resumed run (in this process) matches an uninterrupted one.
    finetune(run, resume=True, verbose=0)
    finetune(reference, verbose=0)
    _assert_same_finetune(run, reference)
