"""The training loop of a progressive run: batches, step timing, epoch and segment windows.

`prune_structured_progressively` (`progressive.py`) trains one `fit` per segment on the
batches of `Batches.steps`; `SegmentCallback` times the steps and drives `EpochClock`, which
opens and closes the energy windows at epoch and segment boundaries, evaluates the validation
data and hands every finished epoch to the run (`_Run.epoch_done`: records, checkpoint hook).
"""

from __future__ import annotations

import time

import keras
import numpy as np

from keras_lean._seeds import reseed
from keras_lean.structured.progressive_report import EpochRecord

__all__ = ["Batches", "EpochClock", "SegmentCallback"]


class SegmentCallback(keras.callbacks.Callback):
    """Per batch of one segment's `fit`: step times, and the epoch boundaries (via `clock`)."""

    def __init__(self, clock, start: int):
        super().__init__()
        self.clock = clock
        self.step = start
        self.times: list[float] = []  # per step of this `fit`, the first one included
        self._t0 = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0 or self.step % self.clock.spe == 0:
            reseed(self.model, self.clock.run.kw["seed"], self.step)
        self.clock.begin_step(self.step)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t0)
        self.step += 1
        self.clock.end_step(self.step)
        hook = self.clock.run.kw.get("step_end")
        if hook is not None:
            hook(self.step)  # may raise to stop the run (Ctrl-C), after the epoch's checkpoint

    def on_train_end(self, logs=None):
        self.clock.end_part()


class EpochClock:
    """Opens and closes the epoch windows (and the segment parts inside them) at step boundaries.

    An epoch window stays open across a shrink (the shrink window nests in it); a part window
    covers the batches of one segment in one epoch.
    """

    def __init__(self, run, steps_per_epoch: int, validation_data):
        self.run = run
        self.spe = steps_per_epoch
        self.validation_data = validation_data
        self._validation = None  # its batches as a `tf.data.Dataset`, built on first use
        self._epoch = None  # [context, window, epoch index, t0, flops]
        self._part = None  # [context, window, t0, first step]
        self._last = 0  # one past the last step run

    def begin_step(self, step: int) -> None:
        kw = self.run.kw
        if self._epoch is None:
            e = step // self.spe
            cm = kw["window"](f"{kw['name']}/epoch_{e + 1}", None)
            self._epoch = [cm, cm.__enter__(), e, time.perf_counter(), 0.0]
        if self._part is None:
            e = self._epoch[2]
            name = f"{kw['name']}/segment_{len(self.run.shrinks)}/epoch_{e + 1}"
            cm = kw["window"](name, None)
            self._part = [cm, cm.__enter__(), time.perf_counter(), step]

    def end_step(self, step: int) -> None:
        self._last = step
        if step % self.spe == 0:
            self.end_part()
            self._end_epoch()

    def end_part(self) -> None:
        if self._part is None:
            return
        cm, w, t0, first = self._part
        self._part = None
        start = self._epoch[2] * self.spe
        samples = self.run.samples_in(first - start, self._last - start)
        flops = 3.0 * self.run.seg["flops"] * samples
        if w is not None:
            w.flops = flops
        cm.__exit__(None, None, None)
        self._epoch[4] += flops
        self.run.add_part(time.perf_counter() - t0, w)

    def abandon(self) -> None:
        """Closes the windows left open when training stops part-way (an exception): they
        cover the steps that ran; the unfinished epoch gets no record."""
        for slot in ("_part", "_epoch"):
            current = getattr(self, slot)
            setattr(self, slot, None)
            if current is not None:
                current[0].__exit__(None, None, None)

    def _end_epoch(self) -> None:
        cm, w, e, t0, flops = self._epoch
        self._epoch = None
        if w is not None:
            w.flops = flops
        cm.__exit__(None, None, None)
        duration = time.perf_counter() - t0
        metrics = {}
        if self.validation_data is not None:
            metrics = self.run.model.evaluate(
                self._validation_batches(), verbose=0, return_dict=True
            )
        self.run.epochs.append(
            EpochRecord(
                epoch=e + 1,
                duration_s=duration,
                energy_j=None if w is None or w.record is None else w.record.energy_j,
                flops=flops,
                params=int(self.run.model.count_params()),
                metrics={f"val_{k}": float(v) for k, v in metrics.items()},
            )
        )
        self.run.epoch_done(e + 1)

    def _validation_batches(self):
        """The validation data in batches of `batch_size`, one input pipeline for every epoch.

        `evaluate` on arrays builds a new input pipeline on every call (about as costly as a
        few train steps of a small model); `fit` caches its validation iterator across epochs
        for the same reason. Same batches, same order, so the same metrics.
        """
        if self._validation is None:
            import tensorflow as tf

            data = keras.tree.map_structure(tf.convert_to_tensor, tuple(self.validation_data))
            batches = tf.data.Dataset.from_tensor_slices(data).batch(self.run.kw["batch_size"])
            self._validation = batches.prefetch(tf.data.AUTOTUNE)
        return self._validation


class Batches:
    """The batches of a run: epoch `e`'s are `orders[e]` cut in `batch_size` pieces (the last of
    an epoch may be smaller); `steps(a, b)` is a `tf.data.Dataset` of the batches of steps
    [a, b), gathered from one copy of the data."""

    def __init__(self, x, y, orders, batch_size, steps_per_epoch):
        import tensorflow as tf

        self._tf = tf
        self.data = keras.tree.map_structure(tf.convert_to_tensor, (x, y))
        self.orders = orders
        self.bs = batch_size
        self.spe = steps_per_epoch

    def steps(self, start: int, stop: int):
        tf, bs, spe = self._tf, self.bs, self.spe
        parts = None
        for e in range(start // spe, (stop - 1) // spe + 1):
            a, b = max(start - e * spe, 0), min(stop - e * spe, spe)
            idx = self.orders[e][a * bs : b * bs]
            ds = tf.data.Dataset.from_tensor_slices(idx.astype(np.int64)).batch(bs)
            parts = ds if parts is None else parts.concatenate(ds)
        data = self.data
        gather = lambda i: keras.tree.map_structure(lambda t: tf.gather(t, i), data)  # noqa: E731
        return parts.map(gather).prefetch(tf.data.AUTOTUNE)
