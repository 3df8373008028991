"""Ctrl-C during fit: the step in progress finishes, then `TrainingInterrupted` (or a second
Ctrl-C stops at once); the previous SIGINT handler comes back."""

from __future__ import annotations

import os
import signal

import keras
import numpy as np
import pytest

from keras_lean.pipeline.interrupt import (
    StepInterrupt,
    TrainingInterrupted,
    interrupt_callback,
    own_loop_interrupt,
)


def _model():
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 2, n)


class _SignalAt(keras.callbacks.Callback):
    """Sends SIGINT to this process at the start of (epoch, batch), `times` times."""

    def __init__(self, epoch, batch, times=1):
        super().__init__()
        self.at, self.times = (epoch, batch), times
        self.epoch, self.steps_done = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done += 1


@pytest.mark.parametrize(
    ("epoch", "batch", "completed"),
    [(0, 2, 0), (1, 0, 1), (2, 3, 2)],
    ids=["first-epoch", "start-of-second", "mid-third"],
)
def test_sigint_finishes_the_step_then_stops(epoch, batch, completed):
    x, y = _data()
    m = _model()
    probe = _SignalAt(epoch, batch)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        m.fit(x, y, batch_size=8, epochs=4, callbacks=[probe, interrupt_callback()], verbose=0)
    e = info.value
    assert (e.epoch, e.step, e.completed_epochs) == (epoch, batch + 1, completed)
    # The signalled step ran to its end, and no further one started.
    assert probe.steps_done == epoch * 8 + batch + 1
    assert int(m.optimizer.iterations.numpy()) == probe.steps_done
    assert signal.getsignal(signal.SIGINT) is before
    assert f"epoch {epoch + 1} after step {batch + 1}" in str(e)
    if completed:
        assert f"checkpoint of epoch {completed}" in str(e)
    else:
        assert "starts from the beginning" in str(e)


def test_a_second_sigint_stops_at_once():
    x, y = _data()
    m = _model()
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info:
        m.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            callbacks=[_SignalAt(0, 1, times=2), interrupt_callback()],
            verbose=0,
        )
    assert not isinstance(info.value, TrainingInterrupted)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupt_during_the_epoch_end_stops_after_it():
    """A Ctrl-C during validation/checkpointing lets that epoch's end (the checkpoint) finish."""
    x, y = _data()
    m = _model()
    seen = []

    class SignalAtEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(epoch)

    with pytest.raises(TrainingInterrupted) as info:
        m.fit(
            x,
            y,
            batch_size=8,
            epochs=4,
            callbacks=[SignalAtEpochEnd(), Checkpoint(), interrupt_callback()],
            verbose=0,
        )
    assert seen == [0, 1]
    assert info.value.completed_epochs == 2 and info.value.step == 8


def test_without_sigint_fit_runs_through_and_restores_the_handler():
    x, y = _data()
    m = _model()
    before = signal.getsignal(signal.SIGINT)
    history = m.fit(x, y, batch_size=8, epochs=2, callbacks=[interrupt_callback()], verbose=0)
    assert len(history.history["loss"]) == 2
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize(
    ("steps_done", "expected"),
    [(3, (0, 3, 0)), (4, (0, 4, 1)), (6, (1, 2, 1))],
    ids=["mid-first-epoch", "at-an-epoch-end", "mid-second-epoch"],
)
def test_step_interrupt_stops_an_own_loop_as_the_callback_stops_fit(steps_done, expected):
    """4 steps per epoch: the epoch and step named as the callback names them."""
    before = signal.getsignal(signal.SIGINT)
    with StepInterrupt(4) as stop:
        stop.after_step(1)  # no Ctrl-C yet: nothing happens
        os.kill(os.getpid(), signal.SIGINT)  # asks to stop: nothing raised here
        with pytest.raises(TrainingInterrupted) as info:
            stop.after_step(steps_done)
    e = info.value
    assert (e.epoch, e.step, e.completed_epochs) == expected
    assert signal.getsignal(signal.SIGINT) is before


def test_own_loop_interrupt_only_when_the_caller_asked_for_it():
    assert own_loop_interrupt([keras.callbacks.History()], 4) is None
    stop = own_loop_interrupt([keras.callbacks.History(), interrupt_callback()], 4)
    assert isinstance(stop, StepInterrupt) and stop.steps_per_epoch == 4
