"""`tf.distribute` strategy set-up (the only pipeline module that touches `tf.distribute`)."""

from __future__ import annotations

from typing import Any

STRATEGIES = ("default", "mirrored", "multiworker")


def get_strategy(name: str = "default") -> Any:
    """Returns the `tf.distribute.Strategy` that training runs under.

    Args:
        name: `"default"` (no distribution: the default strategy), `"mirrored"` (synchronous
            data parallelism over this machine's GPUs, or over its logical CPU devices when there
            is no GPU) or `"multiworker"` (`MultiWorkerMirroredStrategy`; the cluster comes from
            the `TF_CONFIG` environment variable, a single worker without it).

    Returns:
        The strategy; build, load and compile models inside `strategy.scope()`.

    Raises:
        ValueError: unknown `name`.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(STRATEGIES)}. Received: strategy={name!r}"
        )
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        # Reduce through one device: CPU collectives keep process-wide group/instance keys, so a
        # second MirroredStrategy in the same process (a later stage, a test) collides with the
        # first one's collectives and aborts them.
        return tf.distribute.MirroredStrategy(
            devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    return tf.distribute.MultiWorkerMirroredStrategy()
