"""`tf.distribute` strategy set-up (the only pipeline module that touches `tf.distribute`)."""

from __future__ import annotations

from typing import Any

STRATEGIES = ("default", "mirrored", "multiworker")


def get_strategy(name: str = "default") -> Any:
    """Returns the `tf.distribute.Strategy` that training runs under.

    Args:
        name: `"default"` (no distribution: the default strategy), `"mirrored"` (synchronous
            data parallelism over this machine's GPUs, or over its logical CPU devices when there
            is no GPU). `"multiworker"` is refused: Keras 3 cannot train under TensorFlow's
            `MultiWorkerMirroredStrategy` (keras-team/keras#20585); several processes train
            on JAX's engine instead (`keras_lean.pipeline.distribution`, docs/distributed.md).
            Under the JAX backend only `"default"` applies.

    Returns:
        The strategy; build, load and compile models inside `strategy.scope()`.

    Raises:
        ValueError: unknown `name`, `"multiworker"`, or a tf.distribute strategy under JAX.
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(STRATEGIES)}. Received: strategy={name!r}"
        )
    from keras_lean import _backend
    from keras_lean.pipeline.distribution import MULTIWORKER_REFUSAL

    if name == "multiworker":
        raise ValueError(MULTIWORKER_REFUSAL)
    if name != "default" and _backend.name() != "tensorflow":
        raise ValueError(
            f"--strategy {name} is a tf.distribute strategy and needs KERAS_BACKEND=tensorflow; "
            f"this process runs {_backend.name()} (use --distribution data-parallel there)."
        )
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if tf.config.list_logical_devices("GPU"):  # "mirrored"
        return tf.distribute.MirroredStrategy()
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    # Reduce through one device: CPU collectives keep process-wide group/instance keys, so a
    # second MirroredStrategy in the same process (a later stage, a test) collides with the
    # first one's collectives and aborts them.
    return tf.distribute.MirroredStrategy(
        devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
