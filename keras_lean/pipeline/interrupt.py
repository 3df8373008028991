"""Ctrl-C during `fit`: finish the current step, then stop at a point `--resume` continues from.

`interrupt_callback()` is a Keras callback. While `fit` runs it replaces the SIGINT handler
(main thread only; elsewhere it does nothing): the first Ctrl-C only asks to stop, so the train
step in progress finishes and the weights, masks and optimizer state stay consistent; at the end
of that step (or of the epoch, when the signal came during validation or checkpointing) it raises
`TrainingInterrupted`. A second Ctrl-C raises `KeyboardInterrupt` at once. The previous handler is
restored when `fit` ends or stops. A method that runs its own loop (structured progressive trains
one `fit` per segment) gets the same handling from `StepInterrupt`, which the finetune step makes
when an `interrupt_callback()` is among its callbacks (`own_loop_interrupt`).

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


class StepInterrupt:
    """Ctrl-C for a training loop that is not one `fit` (a method that runs its own loop).

    The same rule as `interrupt_callback`: while the `with` block runs, the first Ctrl-C only
    asks to stop, and the loop's next `after_step` raises `TrainingInterrupted` (a second
    Ctrl-C raises `KeyboardInterrupt` at once). The loop calls `after_step` after every train
    step, and at an epoch's last step after that epoch's checkpoint is written.

    Args:
        steps_per_epoch: train steps per epoch (for the epoch and step the error names).

    Example:
        >>> with StepInterrupt(45) as stop:
        ...     for step in range(180):
        ...         train_one_step()
        ...         stop.after_step(step + 1)
    """

    def __init__(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = int(steps_per_epoch)
        self.request = _Request()

    def __enter__(self) -> StepInterrupt:
        self.request.install()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.request.restore()

    def after_step(self, steps_done: int) -> None:
        """Raises `TrainingInterrupted` if Ctrl-C came; `steps_done`: steps finished in all
        (the epochs before a resumed run's start included)."""
        if not self.request.requested:
            return
        self.request.restore()
        completed, step = divmod(int(steps_done), self.steps_per_epoch)
        epoch = completed if step else completed - 1  # at an epoch's end: that epoch, all steps
        step = step or self.steps_per_epoch
        raise TrainingInterrupted(epoch=epoch, step=step, completed_epochs=completed)


def own_loop_interrupt(callbacks: Any, steps_per_epoch: int) -> StepInterrupt | None:
    """The Ctrl-C handling a caller asked for, for a method that runs its own loop.

    Args:
        callbacks: the callbacks the caller gave the fine-tune; an `interrupt_callback()`
            among them asks for it.
        steps_per_epoch: train steps per epoch.

    Returns:
        A `StepInterrupt`, or None when no `interrupt_callback()` is among `callbacks`.
    """
    if any(isinstance(getattr(cb, "request", None), _Request) for cb in callbacks):
        return StepInterrupt(steps_per_epoch)
    return None


__all__ = ["StepInterrupt", "TrainingInterrupted", "interrupt_callback", "own_loop_interrupt"]
