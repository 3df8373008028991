"""Energy meters: NVML energy counter, NVML power sampling, RAPL, and the CPU-time estimate.

Every meter follows one small protocol (`Meter`): `read()` returns a cumulative `Reading` since the
meter was made, and `measure(start, end)` turns two readings into a `DeviceEnergy`. Windows may
nest because a window only keeps two readings; meters never reset. A device that cannot be
measured yields an `AbsentMeter` that says why, instead of an exception.

This is the only module that imports `pynvml`, and only when a GPU meter is asked for.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from keras_lean.energy.records import DeviceEnergy

#: Default CPU power per logical core when no TDP is given, in watts. An assumption, stated in
#: every record that uses it: server parts sit around 3-8 W per hardware thread at TDP (e.g.
#: 270 W / 80 threads, 205 W / 56 threads), desktop and laptop parts higher per thread;
#: Green Algorithms' generic default is 12 W per core. 10 W per logical core sits in between.
#: Pass `cpu_tdp_w` (the package TDP of your CPU, all sockets) for a better estimate.
DEFAULT_TDP_W_PER_LOGICAL_CORE = 10.0

ESTIMATE_FORMULA = (
    "energy_j = tdp_w * (cpu_time_s / wall_time_s) / logical_cores * wall_time_s "
    "= tdp_w * cpu_time_s / logical_cores  (CodeCarbon process mode)"
)

# RAPL counters are polled at least this often even when they could not wrap sooner, so that a
# window's reading never depends on a single read far in the past.
_RAPL_MAX_POLL_S = 5.0
_RAPL_MIN_POLL_S = 0.01
# Upper bound of a RAPL zone's power used to size the poll period (a counter must not wrap twice
# between two reads): well above any single socket or DRAM domain.
_RAPL_ASSUMED_MAX_POWER_W = 1000.0
# AMD Zen CPUs appear under the same "intel-rapl:*" zone names: the kernel's intel_rapl_msr
# powercap driver serves them too (Linux 5.8+ for Zen 2/3), so one prefix covers both vendors.
RAPL_PREFIXES = ("intel-rapl",)


@dataclasses.dataclass(frozen=True)
class Reading:
    """A cumulative reading of one meter.

    Attributes:
        energy_j: joules since the meter was made.
        time_s: monotonic time of the reading.
        n_events: how many notes the meter had logged at that time (see `Meter.events`).
        extra: method-specific cumulative inputs (CPU seconds, sample counts...).
    """

    energy_j: float
    time_s: float
    n_events: int = 0
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Meter(Protocol):
    """What every meter offers.

    Attributes:
        device: "cpu", "gpu:<index>" or "ram".
        method: label such as "measured:rapl"; "absent:<backend>" for an `AbsentMeter`.
        scope: "device", "package" or "process".
        sample_period_s: sampling or polling period, None when read only at window boundaries.
        available: False for an absent meter.
        reason: why the meter is absent ("" when available).
    """

    device: str
    method: str
    scope: str
    sample_period_s: float | None
    available: bool
    reason: str

    def read(self) -> Reading: ...

    def measure(self, start: Reading, end: Reading) -> DeviceEnergy: ...

    def close(self) -> None: ...


class _BaseMeter:
    """Event log, lock and the default `measure` shared by the real meters."""

    device = "cpu"
    method = ""
    scope = "device"
    sample_period_s: float | None = None
    available = True
    reason = ""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[str] = []

    @property
    def events(self) -> tuple[str, ...]:
        """Notes logged so far (counter resets, wraparounds, read errors)."""
        with self._lock:
            return tuple(self._events)

    def _note(self, text: str) -> None:
        # Caller holds the lock.
        self._events.append(text)

    def _details(self, start: Reading, end: Reading) -> dict[str, Any]:
        return {}

    def measure(self, start: Reading, end: Reading) -> DeviceEnergy:
        """The `DeviceEnergy` between two readings of this meter."""
        with self._lock:
            notes = tuple(self._events[start.n_events : end.n_events])
        return DeviceEnergy(
            device=self.device,
            method=self.method,
            scope=self.scope,
            energy_j=max(end.energy_j - start.energy_j, 0.0),
            sample_period_s=self.sample_period_s,
            details=self._details(start, end),
            notes=notes,
        )

    def close(self) -> None:
        """Release resources (background threads)."""


class AbsentMeter:
    """A device that cannot be measured, and why. Reads zero; trackers list it as skipped."""

    scope = "device"
    sample_period_s = None
    available = False

    def __init__(self, device: str, backend: str, reason: str) -> None:
        self.device = device
        self.method = f"absent:{backend}"
        self.reason = reason

    def read(self) -> Reading:
        return Reading(0.0, time.monotonic())

    def measure(self, start: Reading, end: Reading) -> DeviceEnergy:
        return DeviceEnergy(self.device, self.method, self.scope, 0.0, notes=(self.reason,))

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"AbsentMeter({self.device!r}, {self.method!r}, reason={self.reason!r})"


# ----------------------------------------------------------------------------- CPU estimate


def process_cpu_time_s() -> float:
    """User + system CPU seconds of this process and of the children it has waited for."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return time.process_time()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuEstimateMeter(_BaseMeter):
    """CPU energy estimated from TDP and CPU time (CodeCarbon's process mode).

    power = TDP x (process CPU time / wall time) / logical cores, so over a window
    energy = TDP x CPU time / logical cores.

    Args:
        tdp_w: package TDP of the machine's CPUs in watts, all sockets; None uses
            `DEFAULT_TDP_W_PER_LOGICAL_CORE` x logical cores and says so in the record.
        logical_cores: logical cores of the machine; None uses `os.cpu_count()`.
        cpu_time: callable returning cumulative CPU seconds (the process and reaped children).
        clock: monotonic clock in seconds.
        reason: why the estimate is used instead of a measurement (stored in each record).

    Raises:
        ValueError: a non-positive `tdp_w` or `logical_cores`.
    """

    device = "cpu"
    method = "estimated:cpu-tdp"
    scope = "process"

    def __init__(
        self,
        tdp_w: float | None = None,
        *,
        logical_cores: int | None = None,
        cpu_time: Callable[[], float] = process_cpu_time_s,
        clock: Callable[[], float] = time.perf_counter,
        reason: str = "",
    ) -> None:
        super().__init__()
        cores = logical_cores if logical_cores is not None else (os.cpu_count() or 1)
        if not isinstance(cores, int) or cores < 1:
            raise ValueError(f"logical_cores must be an integer >= 1. Received: {cores!r}")
        if tdp_w is None:
            self.tdp_w = DEFAULT_TDP_W_PER_LOGICAL_CORE * cores
            self.tdp_source = (
                f"default {DEFAULT_TDP_W_PER_LOGICAL_CORE:g} W per logical core x {cores} "
                f"logical cores (no cpu_tdp_w given)"
            )
        else:
            if isinstance(tdp_w, bool) or not float(tdp_w) > 0:
                raise ValueError(
                    f"cpu_tdp_w must be a positive number of watts. Received: {tdp_w!r}"
                )
            self.tdp_w = float(tdp_w)
            self.tdp_source = "cpu_tdp_w given by the caller"
        self.logical_cores = cores
        self._cpu_time = cpu_time
        self._clock = clock
        self._cpu0 = cpu_time()
        self._t0 = clock()
        self.fallback_reason = reason

    def read(self) -> Reading:
        cpu = self._cpu_time() - self._cpu0
        t = self._clock()
        energy = self.tdp_w * cpu / self.logical_cores
        with self._lock:
            n = len(self._events)
        return Reading(energy, t, n, {"cpu_time_s": cpu, "wall_s": t - self._t0})

    def _details(self, start: Reading, end: Reading) -> dict[str, Any]:
        cpu = end.extra["cpu_time_s"] - start.extra["cpu_time_s"]
        wall = end.extra["wall_s"] - start.extra["wall_s"]
        share = cpu / wall / self.logical_cores if wall > 0 else 0.0
        details = {
            "formula": ESTIMATE_FORMULA,
            "tdp_w": self.tdp_w,
            "tdp_source": self.tdp_source,
            "cpu_time_s": cpu,
            "wall_time_s": wall,
            "logical_cores": self.logical_cores,
            "cpu_share": share,
            "power_w": self.tdp_w * share,
        }
        if self.fallback_reason:
            details["why_estimated"] = self.fallback_reason
        return details


# ----------------------------------------------------------------------------- RAPL


def _read_sysfs(path: Path) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def rapl_permission_message(path: Path | str, root: Path | str) -> str:
    """How to grant read access to RAPL counters, for the error a reader sees."""
    return (
        f"Permission denied reading {path}. Since Linux 5.10 (CVE-2020-8694, 'Platypus') the RAPL "
        f"energy counters are readable by root only. Grant read access with "
        f"`sudo chmod o+r {root}/intel-rapl:*/energy_uj {root}/intel-rapl:*:*/energy_uj` (the same "
        f"zone names on AMD Zen; reset at reboot), or persistently with a udev rule such as "
        f'`ACTION=="add", SUBSYSTEM=="powercap", RUN+="/bin/chmod o+r /sys%p/energy_uj"` in '
        f"/etc/udev/rules.d/, or run as root (in a container: mount /sys/class/powercap readable)."
    )


@dataclasses.dataclass(frozen=True)
class RaplZone:
    """One powercap zone: its folder, its `name` file and its counter range."""

    path: Path
    name: str
    max_energy_range_uj: int

    @property
    def zone_id(self) -> str:
        return self.path.name


def find_rapl_zones(
    root: str | os.PathLike, kind: str, reader: Callable[[Path], str] = _read_sysfs
) -> tuple[list[RaplZone], list[str]]:
    """The zones to sum for `kind`, and the zones left out with why.

    Zones nest (`intel-rapl:0` is a package, `intel-rapl:0:0` its core, uncore or DRAM
    sub-zone), so only top-level "package-N" zones count as CPU: their sub-zones core/uncore are
    parts of them, and the top-level "psys" zone (whole SoC) contains them. DRAM, which a package
    does not include, is its own field. `intel-rapl-mmio` duplicates the MSR package zone and is
    skipped.

    Args:
        root: the powercap folder, normally /sys/class/powercap.
        kind: "package" or "dram".
        reader: reads a sysfs file (a fake in tests).

    Returns:
        (zones, skipped notes).

    Raises:
        ValueError: `kind` is neither "package" nor "dram".
        FileNotFoundError: `root` does not exist.
        PermissionError: a zone's files cannot be read, with how to grant access.
    """
    if kind not in ("package", "dram"):
        raise ValueError(f"kind must be 'package' or 'dram'. Received: kind={kind!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no powercap folder at {root} (no RAPL on this machine)")
    zones, skipped = [], []
    for d in sorted(root.iterdir()):
        prefix, sep, index = d.name.partition(":")
        if prefix not in RAPL_PREFIXES or not sep:
            continue
        top_level = ":" not in index
        try:
            name = reader(d / "name").strip()
            if (kind == "package" and top_level and name.startswith("package")) or (
                kind == "dram" and name == "dram"
            ):
                rng = int(reader(d / "max_energy_range_uj").strip())
                zones.append(RaplZone(d, name, rng))
            elif kind == "package" and name not in ("dram",):
                skipped.append(f"{d.name} ({name}) not summed: nested in or containing a package")
        except PermissionError as e:
            raise PermissionError(rapl_permission_message(e.filename or d, root)) from e
    return zones, skipped


class RaplMeter(_BaseMeter):
    """CPU package (or DRAM) energy from the Linux powercap RAPL counters.

    Each zone's `energy_uj` counter wraps at `max_energy_range_uj`; a background poller reads
    the counters often enough that none can wrap twice between two reads, and every read adds
    the difference, adding the range back when the counter went down.

    Args:
        root: the powercap folder (a fake tree in tests).
        kind: "package" (device "cpu") or "dram" (device "ram").
        reader: reads a sysfs file; raises PermissionError like `open` would.
        start_poller: run the background poller (tests drive `read()` by hand instead).

    Raises:
        FileNotFoundError: no zone of that kind under `root`.
        PermissionError: the counters are not readable, with how to grant access.
    """

    method = "measured:rapl"
    scope = "package"

    def __init__(
        self,
        root: str | os.PathLike = "/sys/class/powercap",
        kind: str = "package",
        *,
        reader: Callable[[Path], str] = _read_sysfs,
        start_poller: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.kind = kind
        self.device = "cpu" if kind == "package" else "ram"
        self._reader = reader
        self.zones, self.skipped_zones = find_rapl_zones(self.root, kind, reader)
        if not self.zones:
            raise FileNotFoundError(f"no RAPL {kind} zone under {self.root}")
        self._last = [self._raw(z) for z in self.zones]
        self._acc_uj = 0
        self._wraps = [0 for _ in self.zones]
        fastest_wrap_s = (
            min(z.max_energy_range_uj for z in self.zones) * 1e-6 / (_RAPL_ASSUMED_MAX_POWER_W)
        )
        self.sample_period_s = min(_RAPL_MAX_POLL_S, max(_RAPL_MIN_POLL_S, fastest_wrap_s / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_poller:
            self._thread = threading.Thread(
                target=self._poll, name=f"keras_lean-rapl-{kind}", daemon=True
            )
            self._thread.start()

    def _raw(self, zone: RaplZone) -> int:
        path = zone.path / "energy_uj"
        try:
            return int(self._reader(path).strip())
        except PermissionError as e:
            raise PermissionError(rapl_permission_message(path, self.root)) from e

    def _update(self) -> None:
        # Caller holds the lock.
        for i, zone in enumerate(self.zones):
            raw = self._raw(zone)
            delta = raw - self._last[i]
            if delta < 0:
                delta += zone.max_energy_range_uj
                self._wraps[i] += 1
                self._note(
                    f"{zone.zone_id} ({zone.name}) energy_uj wrapped around "
                    f"(max_energy_range_uj={zone.max_energy_range_uj}); range added back"
                )
            self._acc_uj += delta
            self._last[i] = raw

    def _poll(self) -> None:
        while not self._stop.wait(self.sample_period_s):
            with self._lock:
                try:
                    self._update()
                except OSError as e:
                    self._note(f"RAPL poll failed: {e}")

    def read(self) -> Reading:
        with self._lock:
            self._update()
            return Reading(self._acc_uj * 1e-6, time.monotonic(), len(self._events))

    def _details(self, start: Reading, end: Reading) -> dict[str, Any]:
        return {
            "zones": [f"{z.zone_id}:{z.name}" for z in self.zones],
            "not_summed": list(self.skipped_zones),
            "poll_period_s": self.sample_period_s,
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None


# ----------------------------------------------------------------------------- NVML


def load_pynvml() -> Any:
    """Import `pynvml` (package nvidia-ml-py). The only place it is imported."""
    import pynvml

    return pynvml


def _nvml_name(nvml: Any, handle: Any) -> str:
    try:
        name = nvml.nvmlDeviceGetName(handle)
    except nvml.NVMLError:
        return ""
    return name.decode() if isinstance(name, bytes) else str(name)


class NvmlCounterMeter(_BaseMeter):
    """GPU energy from NVML's total-energy counter (mJ since driver load; Volta and newer).

    A reading lower than the previous one means the driver reloaded and the counter restarted:
    the meter notes it and counts the new value (energy since the reset), so the window's figure
    is then a lower bound.

    Args:
        nvml: the `pynvml` module (a fake in tests), already initialised.
        index: NVML device index.
    """

    method = "measured:nvml-counter"
    scope = "device"

    def __init__(self, nvml: Any, index: int) -> None:
        super().__init__()
        self._nvml = nvml
        self.index = index
        self.device = f"gpu:{index}"
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.name = _nvml_name(nvml, self._handle)
        self._last_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        self._acc_mj = 0
        self.resets = 0

    def read(self) -> Reading:
        with self._lock:
            raw = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            delta = raw - self._last_mj
            if delta < 0:
                self.resets += 1
                self._note(
                    f"NVML energy counter of GPU {self.index} went down "
                    f"({self._last_mj} -> {raw} mJ): driver reset; energy before the reset "
                    f"is missing, figure is a lower bound"
                )
                delta = raw
            self._acc_mj += delta
            self._last_mj = raw
            return Reading(self._acc_mj / 1000.0, time.monotonic(), len(self._events))

    def _details(self, start: Reading, end: Reading) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "counter_unit": "mJ"}


class NvmlPowerMeter(_BaseMeter):
    """GPU energy integrated from NVML power samples (trapezoid rule) taken by a thread.

    Each `read()` also takes a sample, so window boundaries are exact in time.

    Args:
        nvml: the `pynvml` module (a fake in tests), already initialised.
        index: NVML device index.
        sample_period_s: seconds between samples, at most 0.1.
        clock: monotonic clock in seconds (a fake in tests).
        start_sampler: run the background thread (tests call `sample()` by hand).

    Raises:
        ValueError: `sample_period_s` not in (0, 0.1].
    """

    method = "measured:nvml-power"
    scope = "device"

    def __init__(
        self,
        nvml: Any,
        index: int,
        *,
        sample_period_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        start_sampler: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < sample_period_s <= 0.1:
            raise ValueError(
                f"sample_period_s must be in (0, 0.1] seconds. "
                f"Received: sample_period_s={sample_period_s!r}"
            )
        self._nvml = nvml
        self.index = index
        self.device = f"gpu:{index}"
        self.sample_period_s = sample_period_s
        self._clock = clock
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.name = _nvml_name(nvml, self._handle)
        self._t = clock()
        self._p = self._power_w()
        self._acc_j = 0.0
        self._samples = 1
        self._max_gap_s = 0.0
        self._errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start_sampler:
            self._thread = threading.Thread(
                target=self._run, name=f"keras_lean-nvml-power-{index}", daemon=True
            )
            self._thread.start()

    def _power_w(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0  # mW -> W

    def sample(self) -> None:
        """Take one power sample and add the trapezoid since the previous one."""
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        try:
            p = self._power_w()
        except self._nvml.NVMLError as e:
            self._errors += 1
            if self._errors == 1:
                self._note(f"NVML power read failed on GPU {self.index}: {e}; sample skipped")
            return
        t = self._clock()
        dt = t - self._t
        self._acc_j += 0.5 * (p + self._p) * dt
        self._max_gap_s = max(self._max_gap_s, dt)
        self._t, self._p = t, p
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.sample_period_s):
            self.sample()

    def read(self) -> Reading:
        with self._lock:
            self._sample_locked()
            return Reading(
                self._acc_j,
                self._t,
                len(self._events),
                {"samples": float(self._samples), "max_gap_s": self._max_gap_s},
            )

    def _details(self, start: Reading, end: Reading) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "integration": "trapezoid over power samples (mW)",
            "samples": int(end.extra["samples"] - start.extra["samples"]),
            "max_gap_s_so_far": end.extra["max_gap_s"],
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None


# ----------------------------------------------------------------------------- discovery


def gpu_meters(
    gpu_indices: Sequence[int] | None = None,
    *,
    sample_period_s: float = 0.1,
    nvml: Any = None,
) -> list[Any]:
    """One meter per GPU: NVML energy counter if supported, else NVML power sampling.

    Without pynvml, a driver or a GPU, returns a single `AbsentMeter("gpu", ...)` with the reason.

    Args:
        gpu_indices: NVML indices to measure; None means all.
        sample_period_s: period of the power-sampling fallback.
        nvml: a pynvml-like module; None imports `pynvml`.

    Returns:
        A list of meters (counter, power or absent).

    Raises:
        ValueError: an index in `gpu_indices` that is not a visible GPU.
    """
    if nvml is None:
        try:
            nvml = load_pynvml()
        except ImportError as e:
            return [AbsentMeter("gpu", "nvml", f"pynvml (nvidia-ml-py) is not installed: {e}")]
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return [AbsentMeter("gpu", "nvml", f"NVML not available (no NVIDIA driver or GPU): {e}")]
    count = int(nvml.nvmlDeviceGetCount())
    if count == 0:
        return [AbsentMeter("gpu", "nvml", "NVML found no GPU")]
    indices = list(range(count)) if gpu_indices is None else list(gpu_indices)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
            raise ValueError(
                f"gpu_indices must hold integers in [0, {count}). "
                f"Received: gpu_indices={gpu_indices!r}"
            )
    meters: list[Any] = []
    for i in indices:
        try:
            meters.append(NvmlCounterMeter(nvml, i))
            continue
        except nvml.NVMLError as counter_error:
            why = f"energy counter not supported ({counter_error})"
        try:
            meter = NvmlPowerMeter(nvml, i, sample_period_s=sample_period_s)
        except nvml.NVMLError as e:
            meters.append(AbsentMeter(f"gpu:{i}", "nvml", f"{why}; power reading failed ({e})"))
            continue
        with meter._lock:
            meter._note(f"GPU {i}: {why}; using power sampling")
        meters.append(meter)
    return meters


def cpu_meters(
    rapl_root: str | os.PathLike = "/sys/class/powercap",
    *,
    cpu_tdp_w: float | None = None,
    reader: Callable[[Path], str] = _read_sysfs,
    start_poller: bool = True,
) -> list[Any]:
    """RAPL package (+ DRAM) meters when readable, else the CPU-time estimate.

    The returned list always measures the CPU; an `AbsentMeter` in it records why RAPL (or its
    DRAM zone) was not used.
    """
    absent: list[Any] = []
    try:
        package = RaplMeter(rapl_root, "package", reader=reader, start_poller=start_poller)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        absent.append(AbsentMeter("cpu", "rapl", str(e)))
        return absent + [CpuEstimateMeter(cpu_tdp_w, reason=f"RAPL unavailable: {e}")]
    meters: list[Any] = [package]
    try:
        meters.append(RaplMeter(rapl_root, "dram", reader=reader, start_poller=start_poller))
    except (FileNotFoundError, PermissionError) as e:
        absent.append(AbsentMeter("ram", "rapl", f"no DRAM energy: {e}"))
    return meters + absent
