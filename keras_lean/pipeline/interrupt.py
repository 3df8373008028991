"""Ctrl-C during `fit`: finish the current step, then stop at a point `--resume` continues from.

`interrupt_callback()` is a Keras callback. While `fit` runs it replaces the SIGINT handler
(main thread only; elsewhere it does nothing): the first Ctrl-C only asks to stop, so the train
step in progress finishes and the weights, masks and optimizer state stay consistent; at the end
of that step (or of the epoch, when the signal came during validation or checkpointing) it raises
`TrainingInterrupted`. A second Ctrl-C raises `KeyboardInterrupt` at once. The previous handler is
restored when `fit` ends or stops.

What resume continues from is the last per-epoch checkpoint (`RUN/checkpoint.keras`, written by
the finetune step after each epoch): the steps of an interrupted epoch are discarded and run again
on resume. Because the fine-tune's data order and seed generators are a function of the epoch
(`keras_lean.pipeline.resume`), the resumed run then matches an uninterrupted one.

Example:
    >>> model.fit(x, y, epochs=4, callbacks=[checkpoint, interrupt_callback()])
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at the user's request (SIGINT), after a finished step.

    Attributes:
        epoch: the 0-based epoch in progress when it stopped.
        step: train steps finished in that epoch.
        completed_epochs: epochs finished (the last per-epoch checkpoint is of this epoch).
    """

    def __init__(self, *, epoch: int, step: int, completed_epochs: int) -> None:
        self.epoch = epoch
        self.step = step
        self.completed_epochs = completed_epochs
        super().__init__(self.describe())

    def describe(self) -> str:
        """One phrase: where training stopped and what a resume continues from."""
        where = f"interrupted in epoch {self.epoch + 1} after step {self.step}"
        if self.completed_epochs == 0:
            return f"{where}; no epoch had finished, so a resume starts from the beginning"
        return f"{where}; a resume continues from the checkpoint of epoch {self.completed_epochs}"


class _Request:
    """The SIGINT handler's state, apart from Keras so it can be tested without training."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        self._installed = True

    def restore(self) -> None:
        if not self._installed:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: stop now
            self.restore()
            raise KeyboardInterrupt
        self.requested = True


def interrupt_callback() -> Any:
    """A Keras callback that turns Ctrl-C during `fit` into `TrainingInterrupted` after a step.

    Put it after the checkpoint callback, so an interrupt during an epoch's end stops after that
    epoch's checkpoint is written.

    Returns:
        A `keras.callbacks.Callback`.
    """
    import keras

    class StopAfterStep(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.request = _Request()
            self._epoch = 0
            self._completed = 0

        def on_train_begin(self, logs=None):
            self.request.install()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            self._completed = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.request.requested:
                self._stop(batch + 1, self._epoch)

        def on_epoch_end(self, epoch, logs=None):
            self._completed = epoch + 1
            if self.request.requested:
                self._stop(self.params.get("steps") or 0, epoch)

        def on_train_end(self, logs=None):
            self.request.restore()

        def _stop(self, step: int, epoch: int) -> None:
            self.request.restore()
            raise TrainingInterrupted(epoch=epoch, step=step, completed_epochs=self._completed)

    return StopAfterStep()


__all__ = ["TrainingInterrupted", "interrupt_callback"]
