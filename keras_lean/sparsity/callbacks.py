"""Keras callbacks: TensorBoard sparsity summaries, and a TFMOT-compatible step callback."""

from __future__ import annotations

import keras
import numpy as np

__all__ = ["PruningSummaries", "UpdatePruningStep"]


def _scalar(tag: str, value: float, step: int) -> None:
    """Writes a TensorBoard scalar without needing the tensorboard package installed.

    `tf.summary.scalar` lives in tensorboard; `tf.summary.write` with the "scalars" plugin
    metadata writes the same event that TensorBoard's scalar dashboard reads.
    """
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    )
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


class UpdatePruningStep(keras.callbacks.Callback):
    """TFMOT compatibility: accepted, never required.

    keras_lean advances the pruning step inside the compiled train step, so this callback does
    nothing during training; code written for TFMOT (`callbacks=[UpdatePruningStep()]`) runs
    unchanged.
    """


class PruningSummaries(keras.callbacks.Callback):
    """Writes each pruned layer's sparsity (and the pruning step) to TensorBoard during fit.

    Scalars are named `sparsity/<layer>/<weight>` (e.g. `sparsity/dense/kernel`) and
    `pruning_step`, with the optimizer's iteration count as the step.

    Args:
        log_dir: TensorBoard log directory (created if missing).
        update_freq: "epoch" (after every epoch) or an int N (every N batches).
    """

    def __init__(self, log_dir: str, update_freq="epoch"):
        super().__init__()
        if not (update_freq == "epoch" or (isinstance(update_freq, int) and update_freq > 0)):
            raise ValueError(
                "update_freq must be 'epoch' or a positive int (batches). "
                f"Received: update_freq={update_freq!r}"
            )
        self.log_dir = str(log_dir)
        self.update_freq = update_freq
        self._writer = None

    def _write(self) -> None:
        import tensorflow as tf  # tf.summary: TensorBoard event files

        from keras_lean.sparsity.api import pruning_wrappers

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        step = int(self.model.optimizer.iterations.numpy()) if self.model.optimizer else 0
        with self._writer.as_default():
            for wrapper in pruning_wrappers(self.model):
                for w, m in zip(wrapper.pruned_weights, wrapper.mask_variables, strict=True):
                    sparsity = 1.0 - float(np.mean(np.asarray(m.numpy())))
                    _scalar(f"sparsity/{wrapper.layer.name}/{w.name}", sparsity, step)
                _scalar(
                    f"pruning_step/{wrapper.layer.name}",
                    float(wrapper.pruning_step.numpy()),
                    step,
                )
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch" and (batch + 1) % self.update_freq == 0:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
