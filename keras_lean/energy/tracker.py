"""EnergyTracker: named, nestable energy windows, a Keras callback, and `measure_command`."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from keras_lean.energy import meters as _meters
from keras_lean.energy.carbon import CarbonIntensity, emissions_kg, resolve_carbon_intensity
from keras_lean.energy.records import (
    J_PER_KWH,
    EnergyRecord,
    RecordLog,
    atomic_write_text,
    host_info,
)

TRACKER_CONFIG_VERSION = 1
JSON_NAME = "energy.json"
CSV_NAME = "energy.csv"


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """Settings of an `EnergyTracker`.

    Attributes:
        output_dir: folder for energy.json and energy.csv (rewritten after every window), or None.
        carbon_intensity: gCO2e/kWh as a number, or an ISO country code of the bundled table.
        pue: power usage effectiveness (>= 1), applied to energy and power alike.
        cpu_tdp_w: CPU package TDP in watts (all sockets) for the estimate; None for the default
            per logical core.
        gpu_indices: NVML indices of the GPUs to measure; None for all.
        rapl_root: powercap folder holding the RAPL zones.
        sample_period_s: NVML power-sampling period, in (0, 0.1] seconds.
        run_name: project name written in records and the CSV's project_name.
        version: config format version.
    """

    output_dir: str | None = None
    carbon_intensity: float | str = 475.0
    pue: float = 1.0
    cpu_tdp_w: float | None = None
    gpu_indices: tuple[int, ...] | None = None
    rapl_root: str = "/sys/class/powercap"
    sample_period_s: float = 0.1
    run_name: str | None = None
    version: int = TRACKER_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        object.__setattr__(self, "rapl_root", os.fspath(self.rapl_root))
        resolve_carbon_intensity(self.carbon_intensity)  # raises on a bad value
        if (
            isinstance(self.pue, bool)
            or not isinstance(self.pue, (int, float))
            or not (1.0 <= self.pue < float("inf"))
        ):
            raise ValueError(f"pue must be a finite number >= 1.0. Received: pue={self.pue!r}")
        if self.cpu_tdp_w is not None and (
            isinstance(self.cpu_tdp_w, bool)
            or not isinstance(self.cpu_tdp_w, (int, float))
            or not 0 < self.cpu_tdp_w < float("inf")
        ):
            raise ValueError(
                f"cpu_tdp_w must be None or a positive number of watts. "
                f"Received: cpu_tdp_w={self.cpu_tdp_w!r}"
            )
        if self.gpu_indices is not None:
            indices = tuple(self.gpu_indices)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
                raise ValueError(
                    f"gpu_indices must be None or non-negative integers. "
                    f"Received: gpu_indices={self.gpu_indices!r}"
                )
            object.__setattr__(self, "gpu_indices", indices)
        if (
            isinstance(self.sample_period_s, bool)
            or not isinstance(self.sample_period_s, (int, float))
            or not 0 < self.sample_period_s <= 0.1
        ):
            raise ValueError(
                f"sample_period_s must be in (0, 0.1] seconds. "
                f"Received: sample_period_s={self.sample_period_s!r}"
            )
        if self.run_name is not None and not isinstance(self.run_name, str):
            raise ValueError(f"run_name must be a string or None. Received: {self.run_name!r}")
        if self.version != TRACKER_CONFIG_VERSION:
            raise ValueError(
                f"version must be {TRACKER_CONFIG_VERSION}. Received: version={self.version!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gpu_indices"] = None if self.gpu_indices is None else list(self.gpu_indices)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackerConfig:
        """Inverse of `to_dict`; unknown keys are errors that name the key."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in allowed:
                raise ValueError(
                    f"Unknown key {key!r} for TrackerConfig; allowed keys are "
                    f"{', '.join(sorted(allowed))}."
                )
        return cls(**data)


class Window:
    """An open (then closed) energy window; `flops` may be set before it closes.

    Attributes:
        name: window name.
        parent: name of the enclosing window or None.
        flops: training compute of the window in FLOPs (settable until the window closes).
        record: the `EnergyRecord`, once the window has closed.
    """

    def __init__(self, name: str, parent: str | None, flops: float | None) -> None:
        self.name = name
        self.parent = parent
        self._flops: float | None = None
        self.record: EnergyRecord | None = None
        self.flops = flops
        self._start_iso = ""
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._readings: list[Any] = []

    @property
    def flops(self) -> float | None:
        return self._flops

    @flops.setter
    def flops(self, value: float | None) -> None:
        _check_flops(value)
        if self.record is not None:
            raise RuntimeError(f"Window {self.name!r} is closed; set flops before it closes.")
        self._flops = None if value is None else float(value)

    def __repr__(self) -> str:
        state = "closed" if self.record is not None else "open"
        return f"Window({self.name!r}, parent={self.parent!r}, {state})"


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _sync_devices() -> None:
    """Wait for queued device work (JAX's async dispatch, TensorFlow's queues), for each
    framework only if it is already imported."""
    jax = sys.modules.get("jax")
    if jax is not None and hasattr(jax, "live_arrays"):
        # Every pending JAX computation ends in a live array: waiting on them drains the queue.
        for value in jax.live_arrays():
            value.block_until_ready()
        jax.effects_barrier()
    tf = sys.modules.get("tensorflow")
    # tf.test.experimental.sync_devices (TF >= 2.13) waits for every device's queued ops.
    sync = getattr(getattr(getattr(tf, "test", None), "experimental", None), "sync_devices", None)
    if sync is None:
        return
    try:
        sync()
    except RuntimeError:  # inside a tf.function or before any device exists: nothing to wait on
        pass


class EnergyTracker:
    """Measures energy in named, nestable windows, with the best backend per device.

    Backends, per device: NVML energy counter, else NVML power sampling (GPUs); RAPL package (+
    DRAM) counters, else the CPU-time x TDP estimate (CPU). Backends that are unavailable are
    listed, with the reason, in every record's `skipped`.

    Args:
        output_dir: folder for energy.json and energy.csv, rewritten atomically after every
            window; None keeps records in memory only.
        carbon_intensity: gCO2e/kWh, or an ISO country code ("FRA" / "FR") of the bundled table.
            Default 475, the world average (IEA 2019, CodeCarbon's default).
        pue: power usage effectiveness of the facility, >= 1.
        cpu_tdp_w: CPU package TDP in watts for the estimate (None: 10 W per logical core).
        gpu_indices: NVML GPU indices to measure (None: all).
        rapl_root: powercap folder (tests pass a fake tree).
        sample_period_s: NVML power-sampling period, at most 0.1 s.
        run_name: project name for records and the CSV.
        meters: ready meters to use instead of discovering them (advanced; tests).

    Raises:
        ValueError: an invalid setting, naming the parameter.

    Example:
        >>> with EnergyTracker("runs/a") as tracker:
        ...     with tracker.window("finetune", flops=1.2e12):
        ...         model.fit(x, y, callbacks=[tracker.callback()])
        >>> tracker.records[-1].energy_kwh
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        *,
        carbon_intensity: float | str = 475.0,
        pue: float = 1.0,
        cpu_tdp_w: float | None = None,
        gpu_indices: Sequence[int] | None = None,
        rapl_root: str | os.PathLike = "/sys/class/powercap",
        sample_period_s: float = 0.1,
        run_name: str | None = None,
        meters: Sequence[Any] | None = None,
    ) -> None:
        self.config = TrackerConfig(
            output_dir=output_dir,
            carbon_intensity=carbon_intensity,
            pue=pue,
            cpu_tdp_w=cpu_tdp_w,
            gpu_indices=None if gpu_indices is None else tuple(gpu_indices),
            rapl_root=rapl_root,
            sample_period_s=sample_period_s,
            run_name=run_name,
        )
        self.carbon: CarbonIntensity = resolve_carbon_intensity(carbon_intensity)
        self.run_id = str(uuid.uuid4())
        self.project_name = run_name or "keras_lean"
        self.output_dir = None if output_dir is None else Path(output_dir)
        if meters is None:
            meters = _meters.gpu_meters(
                self.config.gpu_indices, sample_period_s=sample_period_s
            ) + _meters.cpu_meters(rapl_root, cpu_tdp_w=cpu_tdp_w)
        all_meters = list(meters)
        for m in all_meters:
            if not isinstance(m, _meters.Meter):
                raise TypeError(f"meters must follow the Meter protocol. Received: {m!r}")
        self.meters = [m for m in all_meters if m.available]
        self.skipped = tuple(
            f"{m.device} {m.method}: {m.reason}" for m in all_meters if not m.available
        )
        self._log = RecordLog(host_info(self.carbon.country_name))
        self._stack: list[Window] = []
        self._lock = threading.RLock()
        self._host = self._log.host
        self._closed = False

    # ------------------------------------------------------------------ windows

    @property
    def records(self) -> list[EnergyRecord]:
        """Records of closed windows, in closing order (inner windows before outer ones)."""
        with self._lock:
            return list(self._log.records)

    @contextlib.contextmanager
    def window(self, name: str, flops: float | None = None) -> Iterator[Window]:
        """Measure the enclosed block as one named window.

        Args:
            name: window name (e.g. "finetune"); windows may nest.
            flops: the block's training compute in FLOPs, if known (or set `window.flops`).

        Yields:
            The `Window`; its `record` is set on exit.

        Raises:
            ValueError: an empty name or a negative `flops`.
            RuntimeError: the tracker is closed.
        """
        w = self.open_window(name, flops)
        try:
            yield w
        finally:
            self.close_window(w)

    def open_window(self, name: str, flops: float | None = None) -> Window:
        """Open a window by hand (prefer `window`); close it with `close_window`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string. Received: name={name!r}")
        if self._closed:
            raise RuntimeError("This EnergyTracker is closed; make a new one to measure more.")
        _sync_devices()
        with self._lock:
            parent = self._stack[-1].name if self._stack else None
            w = Window(name, parent, flops)
            self._stack.append(w)
            w._start_iso = _now_iso()
            w._cpu0 = _meters.process_cpu_time_s()
            w._t0 = time.perf_counter()
            w._readings = [m.read() for m in self.meters]
        return w

    def close_window(self, w: Window) -> EnergyRecord:
        """Close a window opened with `open_window`, append and return its record."""
        if w.record is not None:
            return w.record
        _sync_devices()
        with self._lock:
            ends = [m.read() for m in self.meters]
            t1 = time.perf_counter()
            cpu1 = _meters.process_cpu_time_s()
            end_iso = _now_iso()
            if w in self._stack:
                self._stack.remove(w)
            devices = tuple(
                m.measure(s, e) for m, s, e in zip(self.meters, w._readings, ends, strict=True)
            )
            pue = float(self.config.pue)
            by_kind = {
                k: sum(d.energy_j for d in devices if d.kind == k) for k in ("cpu", "gpu", "ram")
            }
            it_j = sum(d.energy_j for d in devices)
            energy_j = it_j * pue
            energy_kwh = energy_j / J_PER_KWH
            record = EnergyRecord(
                name=w.name,
                parent=w.parent,
                start_time=w._start_iso,
                end_time=end_iso,
                duration_s=t1 - w._t0,
                cpu_time_s=cpu1 - w._cpu0,
                energy_j=energy_j,
                energy_kwh=energy_kwh,
                cpu_energy_j=by_kind["cpu"] * pue,
                gpu_energy_j=by_kind["gpu"] * pue,
                ram_energy_j=by_kind["ram"] * pue,
                devices=devices,
                method="+".join(dict.fromkeys(d.method for d in devices)),
                carbon_intensity_g_per_kwh=self.carbon.g_per_kwh,
                carbon_source=self.carbon.source,
                pue=pue,
                emissions_kg=emissions_kg(energy_kwh, self.carbon.g_per_kwh),
                flops=None if w.flops is None else float(w.flops),
                it_energy_j=it_j,
                country_iso_code=self.carbon.country_iso_code,
                skipped=self.skipped,
                run_id=self.run_id,
                project_name=self.project_name,
            )
            w.record = record
            self._log.append(record)
            if self.output_dir is not None:
                self._write_locked()
        return record

    # ------------------------------------------------------------------ files

    def _run_info(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "project_name": self.project_name,
            "config": self.config.to_dict(),
            "carbon_source": self.carbon.source,
            "meters": [f"{m.device} {m.method} ({m.scope})" for m in self.meters],
            "skipped": list(self.skipped),
            "host": self._host,
        }

    def _write_locked(self) -> None:
        atomic_write_text(self.output_dir / JSON_NAME, self._log.json_text(self._run_info()))
        atomic_write_text(self.output_dir / CSV_NAME, self._log.csv_text())

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write all records to `path` as JSON (atomically) and return the path."""
        with self._lock:
            return atomic_write_text(path, self._log.json_text(self._run_info()))

    def write_csv(self, path: str | os.PathLike) -> Path:
        """Write all records to `path` as CodeCarbon-style CSV (atomically) and return the path."""
        with self._lock:
            return atomic_write_text(path, self._log.csv_text())

    # ------------------------------------------------------------------ Keras

    def callback(self, prefix: str = "energy") -> Any:
        """A Keras callback that measures every epoch as a window and logs its energy.

        Adds `<prefix>_j`, `<prefix>_kwh` and `<prefix>_kg_co2e` to the epoch logs (and so to
        `History`). Epoch windows are named "epoch_<n>" (1-based) and nest under the window that
        is open around `fit`, if any.

        Args:
            prefix: prefix of the log keys.

        Returns:
            A `keras.callbacks.Callback`.

        Raises:
            ValueError: an empty prefix.
        """
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string. Received: prefix={prefix!r}")
        import keras  # lazy: energy needs Keras only for this callback

        tracker = self

        class EnergyCallback(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self._window: Window | None = None

            def on_epoch_begin(self, epoch, logs=None):
                self._window = tracker.open_window(f"epoch_{epoch + 1}")

            def on_epoch_end(self, epoch, logs=None):
                if self._window is None:
                    return
                record = tracker.close_window(self._window)
                self._window = None
                if logs is not None:
                    logs[f"{prefix}_j"] = record.energy_j
                    logs[f"{prefix}_kwh"] = record.energy_kwh
                    logs[f"{prefix}_kg_co2e"] = record.emissions_kg

            def on_train_end(self, logs=None):
                if self._window is not None:  # fit stopped mid-epoch
                    tracker.close_window(self._window)
                    self._window = None

        return EnergyCallback()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close open windows and stop background samplers. Safe to call twice."""
        if self._closed:
            return
        for w in list(reversed(self._stack)):
            self.close_window(w)
        self._closed = True
        for m in self.meters:
            m.close()

    def __enter__(self) -> EnergyTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        methods = ", ".join(f"{m.device}={m.method}" for m in self.meters)
        return f"EnergyTracker({methods}; {len(self._log.records)} records)"


def _check_flops(flops: float | None) -> None:
    if flops is None:
        return
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not flops >= 0:
        raise ValueError(f"flops must be None or a number >= 0. Received: flops={flops!r}")


def measure_command(
    argv: Sequence[str],
    output_dir: str | os.PathLike | None = None,
    *,
    window_name: str | None = None,
    **tracker_kwargs: Any,
) -> tuple[int, EnergyRecord]:
    """Run a command as a child process inside one energy window.

    The CPU estimate counts the child's CPU time (getrusage RUSAGE_CHILDREN, available once the
    child has been waited for); NVML and RAPL measure the devices whoever uses them.

    Args:
        argv: the command and its arguments, e.g. ["python", "train.py"].
        output_dir: folder for energy.json / energy.csv, or None.
        window_name: the window's name (default: the command line).
        **tracker_kwargs: passed to `EnergyTracker` (carbon_intensity, pue, cpu_tdp_w, ...).

    Returns:
        (exit code of the command, its `EnergyRecord`).

    Raises:
        ValueError: `argv` is empty or not a list of strings.
        OSError: the command cannot be started (e.g. not found).

    Example:
        >>> code, record = measure_command(["python", "-c", "print(1)"])
    """
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise ValueError(f"argv must be a non-empty list of strings. Received: argv={argv!r}")
    argv = list(argv)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"argv must be a non-empty list of strings. Received: argv={argv!r}")
    with EnergyTracker(output_dir, **tracker_kwargs) as tracker:
        with tracker.window(window_name or shlex.join(argv)) as w:
            proc = subprocess.run(argv, check=False)
    return proc.returncode, w.record
