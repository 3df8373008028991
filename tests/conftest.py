"""Shared test set-up.

TensorFlow's logical devices can only be configured before TF initializes, so the two logical CPU
devices that the `tf.distribute.MirroredStrategy` tests need are made here, once per session.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # already initialized by an earlier import in this process
    pass


# The backend is fixed per process: CI runs the suite under TensorFlow, then these backend-neutral
# files a second time under `KERAS_BACKEND=jax` (see .ci/run; the other files are not collected).
JAX_SUITE = ("jax", "pipeline/test_distribution.py")


def pytest_ignore_collect(collection_path, config):
    if keras.backend.backend() != "jax" or collection_path.is_dir():
        return None
    relative = collection_path.relative_to(config.rootpath / "tests").as_posix()
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return not any(relative == f or relative.startswith(f + "/") for f in JAX_SUITE)
    return None


_TESTS_RUN = [0]


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Every test starts from the same seeds and a clean Keras name scope.

    `clear_session()`'s own `gc.collect()` costs about 0.25 s with TensorFlow and keras-hub loaded
    (measured: a quarter of a 2-core suite's time over 1,300 tests), so a full collection runs every
    25 tests; Python's own collector runs in between as usual.
    """
    keras.utils.set_random_seed(0)
    yield
    _TESTS_RUN[0] += 1
    keras.backend.clear_session(free_memory=_TESTS_RUN[0] % 25 == 0)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits as (x_train, y_train, x_val, y_val), float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int32")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    x, y = x[idx], y[idx]
    n_val = 360
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]
