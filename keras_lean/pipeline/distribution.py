"""Data-parallel training across processes and machines, on JAX's engine.

Keras 3 does not support TensorFlow multi-worker training (keras-team/keras#20585: `fit` under
`MultiWorkerMirroredStrategy` fails with "Attempt to convert a value (PerReplica ...) to a Tensor"
even for a plain model). The multi-process engine that works with Keras 3 is JAX's:
`jax.distributed.initialize` joins the processes (CPU collectives over gloo) and
`keras.distribution.DataParallel` replicates the model on every device of every process, so the
optimizer sees the gradient of the global batch and every process ends with the same weights and
masks (keras_lean's masks are computed from the replicated weights inside the jitted step).

Each process feeds its own slice of every global batch (`auto_shard_dataset=False`, see
`local_rows`), computes the same update, measures its own energy; only process 0 writes files.

Settings come from `--coordinator HOST:PORT --num-processes N --process-id I` or from the standard
environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.
See docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time

import numpy as np

__all__ = [
    "DISTRIBUTIONS",
    "MULTIWORKER_REFUSAL",
    "DistributionError",
    "DistributionSpec",
    "initialize",
    "is_writer",
    "local_rows",
    "parse_coordinator",
    "process_count",
    "process_index",
    "gather_over_processes",
]

DISTRIBUTIONS = ("none", "data-parallel")

MULTIWORKER_REFUSAL = (
    "--strategy multiworker is not supported: Keras 3 cannot train with TensorFlow's "
    "MultiWorkerMirroredStrategy (keras-team/keras#20585); run several processes with "
    "KERAS_BACKEND=jax and --distribution data-parallel instead (docs/distributed.md)."
)

_ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


class DistributionError(ValueError):
    """Bad distribution settings, or a coordinator that cannot be reached (one line)."""


def parse_coordinator(text: str) -> tuple[str, int]:
    """`"HOST:PORT"` -> `(host, port)`; DistributionError naming the field otherwise."""
    if not isinstance(text, str) or ":" not in text:
        raise DistributionError(
            f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:12345). Received: {text!r}"
        )
    host, _, port = text.rpartition(":")
    if not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributionError(
            "--coordinator must be HOST:PORT with a host name or address and a port in "
            f"1..65535 (e.g. 10.0.0.1:12345). Received: {text!r}"
        )
    return host, int(port)


def _int_setting(name: str, value, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise DistributionError(
            f"--{name.replace('_', '-')} must be an integer >= {minimum}. Received: {value!r}"
        )
    return number


@dataclasses.dataclass(frozen=True)
class DistributionSpec:
    """Where this process sits in a multi-process run.

    Args:
        coordinator: `HOST:PORT` of process 0's coordinator service (None: one process).
        num_processes: how many processes join.
        process_id: this process's index, 0 .. num_processes - 1 (0 writes the files).
        timeout_s: how long to wait for every process to reach the coordinator.
    """

    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    timeout_s: int = 120

    def __post_init__(self):
        n = _int_setting("num_processes", self.num_processes, 1)
        i = _int_setting("process_id", self.process_id, 0)
        if i >= n:
            raise DistributionError(
                f"--process-id must be in 0..{n - 1} for --num-processes {n}. Received: {i}"
            )
        if n > 1 and self.coordinator is None:
            raise DistributionError(
                "--coordinator HOST:PORT is needed with --num-processes > 1 (or set "
                "JAX_COORDINATOR_ADDRESS)."
            )
        if self.coordinator is not None:
            parse_coordinator(self.coordinator)
        object.__setattr__(self, "num_processes", n)
        object.__setattr__(self, "process_id", i)
        object.__setattr__(self, "timeout_s", _int_setting("timeout", self.timeout_s, 1))

    @classmethod
    def resolve(cls, coordinator=None, num_processes=None, process_id=None, timeout_s=120):
        """Options given on the command line win; missing ones come from the environment."""
        given = {"coordinator": coordinator, "num_processes": num_processes}
        given["process_id"] = process_id
        values = {k: v if v is not None else os.environ.get(_ENV[k]) for k, v in given.items()}
        return cls(
            coordinator=values["coordinator"],
            num_processes=1 if values["num_processes"] is None else values["num_processes"],
            process_id=0 if values["process_id"] is None else values["process_id"],
            timeout_s=timeout_s,
        )


def check_backend(step: str = "--distribution data-parallel") -> None:
    """DistributionError unless this process runs the JAX backend."""
    from keras_lean import _backend  # lazy: `--help` must not import Keras
    if not _backend.is_jax():
        raise DistributionError(
            f"{step} needs the JAX backend (KERAS_BACKEND=jax); this process runs "
            f"{_backend.name()}. On TensorFlow use --strategy mirrored (one machine's devices)."
        )


def initialize(spec: DistributionSpec, *, auto_shard_dataset: bool = False):
    """Joins the processes (if several) and sets `keras.distribution.DataParallel` on all devices.

    Returns:
        The `keras.distribution.DataParallel` now in effect.

    Raises:
        DistributionError: not on JAX, or the coordinator was not reached within the timeout.
    """
    check_backend()
    import jax
    import keras

    if spec.num_processes > 1 and not _joined():
        if spec.process_id != 0:  # XLA aborts the process when it cannot connect: check first
            _wait_for_coordinator(spec)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(
                coordinator_address=spec.coordinator,
                num_processes=spec.num_processes,
                process_id=spec.process_id,
                initialization_timeout=spec.timeout_s,
            )
        except Exception as e:  # noqa: BLE001 - XLA raises its own runtime errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributionError(
                f"process {spec.process_id} could not join the coordinator "
                f"{spec.coordinator} within {spec.timeout_s} s ({first[:200]}). Start process 0 "
                "first and check the address, port and firewall."
            ) from None
    distribution = keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=auto_shard_dataset
    )
    keras.distribution.set_distribution(distribution)
    return distribution


def _wait_for_coordinator(spec: DistributionSpec) -> None:
    host, port = parse_coordinator(spec.coordinator)
    deadline = time.monotonic() + spec.timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributionError(
                    f"process {spec.process_id} could not reach the coordinator "
                    f"{spec.coordinator} within {spec.timeout_s} s ({e.strerror or e}). Start "
                    "process 0 first and check the address, port and firewall."
                ) from None
            time.sleep(0.5)


def _joined() -> bool:
    import jax

    return jax.distributed.is_initialized()  # without touching the XLA backend


def process_index() -> int:
    """This process's index (0 without JAX or outside a multi-process run)."""
    from keras_lean import _backend  # lazy: `--help` must not import Keras
    if not _backend.is_jax():
        return 0
    import jax

    return jax.process_index()


def process_count() -> int:
    from keras_lean import _backend  # lazy: `--help` must not import Keras
    if not _backend.is_jax():
        return 1
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """True on the process that writes artifacts and reports (process 0)."""
    return process_index() == 0


def local_rows(n_rows: int, global_batch: int, index: int, count: int) -> np.ndarray:
    """Row indices process `index` of `count` feeds: its slice of every global batch.

    With these rows and `batch_size = global_batch // count`, the processes' local batches form
    exactly the global batches a single process would train on (in order, no shuffling), so the
    run equals a one-process run with `global_batch`.
    """
    if global_batch % count:
        raise DistributionError(
            f"the batch size {global_batch} must be a multiple of the {count} processes."
        )
    local = global_batch // count
    rows = np.arange(n_rows - n_rows % global_batch).reshape(-1, count, local)
    return rows[:, index, :].reshape(-1)


def gather_over_processes(values: dict[str, float]) -> list[dict[str, float]]:
    """Every process's `values` (same keys everywhere), in process order, on every process
    (the report lists them and sums them)."""
    keys = sorted(values)
    if process_count() == 1:
        return [{k: float(values[k]) for k in keys}]
    from jax.experimental import multihost_utils

    local = np.asarray([float(values[k]) for k in keys], dtype=np.float64)
    gathered = np.asarray(multihost_utils.process_allgather(local.astype(np.float32)))
    return [
        dict(zip(keys, map(float, row), strict=True)) for row in gathered.reshape(-1, len(keys))
    ]


def setup_from_cli(distribution: str, coordinator=None, num_processes=None, process_id=None):
    """What `keras-lean run --distribution ...` does first; DistributionError (exit 2) on bad
    settings, before any training.

    Returns:
        The DistributionSpec in effect, or None without `--distribution data-parallel`.
    """
    if distribution not in DISTRIBUTIONS:
        raise DistributionError(
            f"--distribution must be one of {', '.join(DISTRIBUTIONS)}. Received: {distribution!r}"
        )
    if distribution == "none":
        if any(v is not None for v in (coordinator, num_processes, process_id)):
            raise DistributionError(
                "--coordinator, --num-processes and --process-id need --distribution data-parallel."
            )
        return None
    spec = DistributionSpec.resolve(coordinator, num_processes, process_id)
    check_backend()
    if spec.num_processes > 1:
        raise DistributionError(
            "the pipeline runs data-parallel over one process's devices for now; for several "
            "processes use the library (keras_lean.pipeline.distribution, docs/distributed.md)."
        )
    initialize(spec)
    return spec
