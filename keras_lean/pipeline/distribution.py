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

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "DISTRIBUTIONS",
    "DistributionError",
    "DistributionSpec",
    "MULTIWORKER_REFUSAL",
    "check_backend",
    "check_global_batch",
    "combine_stage_entry",
    "from_float32_pairs",
    "gather_over_processes",
    "initialize",
    "is_writer",
    "local_arrays",
    "local_batch",
    "local_rows",
    "merge_process_entries",
    "parse_coordinator",
    "process_count",
    "process_energy_lines",
    "process_index",
    "replicated_predictions",
    "run_on_every_process",
    "setup_from_cli",
    "stage_figures",
    "to_float32_pairs",
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
        timeout = _int_setting("coordinator_timeout", self.timeout_s, 1)
        object.__setattr__(self, "timeout_s", timeout)

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


def local_arrays(x, y, global_batch: int):
    """`(x, y, batch_size)` this process feeds `fit` to train on batches of `global_batch` rows:
    its rows of every global batch (`local_rows`) and its share of the batch; with one process,
    the arrays and `global_batch` unchanged. `x` may be an array or a dict / list of arrays."""
    count = process_count()
    if count == 1:
        return x, y, global_batch
    rows = local_rows(len(y), global_batch, process_index(), count)
    if isinstance(x, dict):
        x = {k: np.asarray(v)[rows] for k, v in x.items()}
    elif isinstance(x, (list, tuple)):
        x = type(x)(np.asarray(v)[rows] for v in x)
    else:
        x = np.asarray(x)[rows]
    return x, np.asarray(y)[rows], global_batch // count


def local_rows(n_rows: int, global_batch: int, index: int, count: int) -> np.ndarray:
    """Row indices process `index` of `count` feeds: its slice of every global batch.

    With these rows and `batch_size = global_batch // count`, the processes' local batches form
    exactly the global batches a single process would train on (in order, no shuffling), so the
    run equals a one-process run with `global_batch`.
    """
    check_global_batch(global_batch, count)
    local = global_batch // count
    rows = np.arange(n_rows - n_rows % global_batch).reshape(-1, count, local)
    return rows[:, index, :].reshape(-1)


def gather_over_processes(values: dict[str, float]) -> list[dict[str, float]]:
    """Every process's `values` (same keys everywhere), in process order, on every process
    (the report lists them and sums them). A collective: every process must call it.

    JAX without x64 has no float64 on the wire, so each value travels as two float32 (the value
    rounded, and what the rounding lost): about 14 significant digits come back.
    """
    keys = sorted(values)
    if process_count() == 1:
        return [{k: float(values[k]) for k in keys}]
    from jax.experimental import multihost_utils

    wire = to_float32_pairs(np.asarray([float(values[k]) for k in keys]))
    gathered = np.asarray(multihost_utils.process_allgather(wire)).reshape(-1, *wire.shape)
    return [dict(zip(keys, map(float, from_float32_pairs(row)), strict=True)) for row in gathered]


def to_float32_pairs(values: np.ndarray) -> np.ndarray:
    """float64 values as a (2, n) float32 array: each value rounded, and what rounding lost."""
    values = np.asarray(values, dtype=np.float64)
    high = values.astype(np.float32)
    return np.stack([high, (values - high.astype(np.float64)).astype(np.float32)])


def from_float32_pairs(pairs: np.ndarray) -> np.ndarray:
    """The float64 values back from `to_float32_pairs` (about 14 significant digits)."""
    pairs = np.asarray(pairs, dtype=np.float64)
    return pairs[0] + pairs[1]


def process_energy_lines(entries) -> list[str]:
    """The report's lines for a multi-process run: each stage's energy by process."""
    rows = [(e.stage, e.details.get("processes")) for e in entries]
    rows = [(stage, procs) for stage, procs in rows if isinstance(procs, list) and procs]
    if not rows:
        return []
    out = ["", "energy by process (J; each process measured its own, the table sums them):"]
    for stage, procs in rows:
        cells = ", ".join(f"{p['process']}: {p['energy_j']:.1f}" for p in procs)
        out.append(f"  {stage}: {cells}")
    return out


#: The StageEntry fields summed over processes (duration is the slowest process's: they overlap).
_SUMMED = ("energy_j", "energy_kwh", "emissions_kg")


def merge_process_entries(entry: dict, gathered: list[dict[str, float]]) -> dict:
    """One stage's report entry for the whole run, from process 0's `entry` and every process's
    figures (`gathered`, in process order, as `stage_figures` makes them).

    Energy, kWh and CO2e are the sums over the processes; the duration is the longest (the
    processes run side by side); `details["processes"]` lists each process's own figures.
    """
    merged = dict(entry)
    for key in _SUMMED:
        merged[key] = float(sum(g[key] for g in gathered))
    merged["duration_s"] = float(max(g["duration_s"] for g in gathered))
    n, measured = len(gathered), sum(1 for g in gathered if g["measured"])
    mixed = "" if measured in (0, n) else f"; {measured} of {n} measured"
    merged["energy_method"] = f"{entry['energy_method']} (sum of {n} processes{mixed})"
    merged["details"] = {
        **(entry.get("details") or {}),
        "processes": [
            {"process": i, **{k: g[k] for k in ("duration_s", *_SUMMED)}, "measured": g["measured"]}
            for i, g in enumerate(gathered)
        ],
    }
    return merged


def stage_figures(entry: dict) -> dict[str, float]:
    """What each process contributes to a stage's entry (see `merge_process_entries`)."""
    figures = {k: float(entry[k] or 0.0) for k in ("duration_s", *_SUMMED)}
    figures["measured"] = float(str(entry.get("energy_method", "")).startswith("measured"))
    return figures


def combine_stage_entry(entry: dict) -> dict:
    """In a multi-process run, the stage entry with every process's energy summed and listed;
    unchanged in a one-process run. A collective: every process calls it as its stage ends."""
    if process_count() == 1:
        return entry
    gathered = gather_over_processes(stage_figures(entry))
    for g in gathered:
        g["measured"] = bool(g["measured"])
    return merge_process_entries(entry, gathered)


def check_global_batch(batch_size: int, count: int | None = None) -> None:
    """DistributionError unless `batch_size` rows split evenly over the processes (or `count`)."""
    count = process_count() if count is None else count
    if count > 1 and batch_size % count:
        raise DistributionError(
            f"the batch size {batch_size} must be a multiple of the {count} processes "
            "(each feeds batch_size / processes rows per step)."
        )


def local_batch(indices: np.ndarray, index: int | None = None, count: int | None = None):
    """This process's part of a global batch's row `indices` (all of them with one process).

    The processes' parts, in process order, make up the global batch, so training on them with
    `DataParallel` equals one process training on the whole batch. A last batch whose size is not
    a multiple of the process count loses its few trailing rows (every process must feed as many
    rows: their local batches form one global array). `index` / `count` default to this
    process's.
    """
    count = process_count() if count is None else count
    if count == 1:
        return indices
    local = len(indices) // count
    if local == 0:
        raise DistributionError(
            f"a batch of {len(indices)} rows cannot be split over {count} processes; use a "
            f"batch size of at least {count}."
        )
    index = process_index() if index is None else index
    return indices[index * local : (index + 1) * local]


@contextlib.contextmanager
def replicated_predictions() -> Iterator[None]:
    """While active in a multi-process run, `Model.predict` and `predict_on_batch` run with no
    data distribution: every process feeds the same inputs and gets the whole output.

    Under `DataParallel` each process would feed its own rows and get back an output array that
    spans the other processes' devices, which no process can read (Keras' predict converts it to
    NumPy). Every process of a pipeline run evaluates the same data in the same order, so they
    all take part in each replicated computation. Outside a multi-process run this does nothing.
    """
    if process_count() == 1:
        yield
        return
    import keras

    originals = {name: getattr(keras.Model, name) for name in ("predict", "predict_on_batch")}

    def replicated(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            current = keras.distribution.distribution()
            keras.distribution.set_distribution(None)
            try:
                return method(self, *args, **kwargs)
            finally:
                keras.distribution.set_distribution(current)

        return call

    for name, method in originals.items():
        setattr(keras.Model, name, replicated(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(keras.Model, name, method)


def run_on_every_process(run_fn: Callable[..., Any], out: str | os.PathLike, **kwargs) -> Any:
    """`run_fn(out, **kwargs)` (the pipeline's `run`) on every process of the run.

    Every process trains (each on its part of every batch, see `local_batch`) and measures its
    own energy; process 0 works in `out` and writes the artifacts and the report (whose stage
    entries sum every process's energy); the others work in a scratch folder of their own,
    removed at the end. One process: just `run_fn(out, **kwargs)`.
    """
    if process_count() == 1:
        return run_fn(out, **kwargs)
    with replicated_predictions():
        if is_writer():
            return run_fn(out, **kwargs)
        scratch = tempfile.mkdtemp(prefix=f"keras-lean-process{process_index()}-")
        try:
            return run_fn(scratch, **kwargs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def setup_from_cli(
    distribution: str, coordinator=None, num_processes=None, process_id=None, timeout_s=None
):
    """What `keras-lean run --distribution ...` does first; DistributionError (exit 2) on bad
    settings or an unreachable coordinator, before any training.

    Returns:
        The DistributionSpec in effect, or None without `--distribution data-parallel`.
    """
    if distribution not in DISTRIBUTIONS:
        raise DistributionError(
            f"--distribution must be one of {', '.join(DISTRIBUTIONS)}. Received: {distribution!r}"
        )
    if distribution == "none":
        if any(v is not None for v in (coordinator, num_processes, process_id, timeout_s)):
            raise DistributionError(
                "--coordinator, --num-processes, --process-id and --coordinator-timeout need "
                "--distribution data-parallel."
            )
        return None
    timeout = DistributionSpec.timeout_s if timeout_s is None else timeout_s
    spec = DistributionSpec.resolve(coordinator, num_processes, process_id, timeout)
    check_backend()
    initialize(spec)
    return spec
