"""Energy records and their files: JSON (primary) and a CodeCarbon-style CSV.

Units are in the field names. Per-device `DeviceEnergy.energy_j` is what the device itself used;
the record's totals (`energy_j`, `cpu_energy_j`, ...) are facility energy, i.e. device energy x
PUE, and `it_energy_j` keeps the sum before PUE.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from keras_lean._files import default_mode

RECORDS_VERSION = 1
J_PER_KWH = 3.6e6

#: CodeCarbon's `emissions.csv` columns that we can fill honestly (same names and units:
#: duration s, emissions kg, emissions_rate kg/s, *_power W, *_energy and energy_consumed kWh,
#: ram_total_size GB), followed by our own columns.
CODECARBON_COLUMNS = (
    "timestamp",
    "project_name",
    "run_id",
    "duration",
    "emissions",
    "emissions_rate",
    "cpu_power",
    "gpu_power",
    "ram_power",
    "cpu_energy",
    "gpu_energy",
    "ram_energy",
    "energy_consumed",
    "country_name",
    "country_iso_code",
    "os",
    "python_version",
    "cpu_count",
    "cpu_model",
    "gpu_count",
    "gpu_model",
    "tracking_mode",
    "pue",
)
EXTRA_COLUMNS = (
    "window",
    "parent",
    "start_time",
    "end_time",
    "cpu_time_s",
    "energy_j",
    "method",
    "cpu_method",
    "gpu_method",
    "ram_method",
    "carbon_intensity_g_per_kwh",
    "carbon_source",
    "flops",
)
CSV_COLUMNS = CODECARBON_COLUMNS + EXTRA_COLUMNS


def _check_keys(cls: type, data: dict[str, Any]) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"Unknown key {unknown[0]!r} for {cls.__name__}; allowed keys are "
            f"{', '.join(sorted(allowed))}."
        )


@dataclasses.dataclass(frozen=True)
class DeviceEnergy:
    """Energy of one device (or device group) over one window.

    Attributes:
        device: "cpu", "gpu:<index>" or "ram".
        method: how it was obtained: "measured:nvml-counter", "measured:nvml-power",
            "measured:rapl" or "estimated:cpu-tdp".
        scope: what the figure covers: "device" (one GPU, all its processes), "package" (CPU
            packages / DRAM, all processes) or "process" (this process and its reaped children).
        energy_j: joules used by the device in the window (before PUE).
        sample_period_s: sampling period for sampled methods, else None.
        details: inputs and formula for estimates, zones for RAPL, device name for NVML.
        notes: anything the reader must know: counter resets, wraparounds, fallbacks.
    """

    device: str
    method: str
    scope: str
    energy_j: float
    sample_period_s: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """Device kind: "cpu", "gpu" or "ram"."""
        return self.device.split(":", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceEnergy:
        _check_keys(cls, data)
        data = dict(data)
        data["notes"] = tuple(data.get("notes", ()))
        data["details"] = dict(data.get("details", {}))
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class EnergyRecord:
    """What one named window used.

    Attributes:
        name: window name.
        parent: name of the enclosing window, or None at top level.
        start_time: ISO 8601 UTC start.
        end_time: ISO 8601 UTC end.
        duration_s: wall time.
        cpu_time_s: CPU time (user + system) of this process and of the children it reaped.
        energy_j: total facility energy (device energy x PUE).
        energy_kwh: `energy_j` in kWh.
        cpu_energy_j: CPU share of `energy_j`.
        gpu_energy_j: GPU share of `energy_j`.
        ram_energy_j: RAM share of `energy_j` (0 unless RAPL reports a DRAM zone).
        devices: per-device energies, before PUE.
        method: the device methods joined by "+", e.g. "measured:nvml-counter+estimated:cpu-tdp".
        carbon_intensity_g_per_kwh: grid intensity used for `emissions_kg`.
        carbon_source: where that intensity comes from.
        pue: power usage effectiveness applied to every device's energy.
        emissions_kg: kg CO2e.
        flops: training compute of the window in FLOPs, when the caller knows it.
        it_energy_j: device energy before PUE (sum of `devices`).
        country_iso_code: ISO alpha-3 code when the intensity was chosen by country.
        skipped: backends that were not used and why (e.g. no NVIDIA driver).
        run_id: id of the tracker that made the record.
        project_name: run name of that tracker.
        version: record format version.
    """

    name: str
    parent: str | None
    start_time: str
    end_time: str
    duration_s: float
    cpu_time_s: float
    energy_j: float
    energy_kwh: float
    cpu_energy_j: float
    gpu_energy_j: float
    ram_energy_j: float
    devices: tuple[DeviceEnergy, ...]
    method: str
    carbon_intensity_g_per_kwh: float
    carbon_source: str
    pue: float
    emissions_kg: float
    flops: float | None = None
    it_energy_j: float = 0.0
    country_iso_code: str | None = None
    skipped: tuple[str, ...] = ()
    run_id: str = ""
    project_name: str = ""
    version: int = RECORDS_VERSION

    def device(self, kind: str) -> tuple[DeviceEnergy, ...]:
        """The devices of one kind ("cpu", "gpu" or "ram")."""
        return tuple(d for d in self.devices if d.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["devices"] = [dev.to_dict() for dev in self.devices]
        d["skipped"] = list(self.skipped)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergyRecord:
        """Inverse of `to_dict`; unknown keys are errors that name the key."""
        _check_keys(cls, data)
        data = dict(data)
        version = data.get("version", RECORDS_VERSION)
        if version != RECORDS_VERSION:
            raise ValueError(
                f"EnergyRecord version must be {RECORDS_VERSION}. Received: version={version!r}"
            )
        data["devices"] = tuple(DeviceEnergy.from_dict(d) for d in data.get("devices", ()))
        data["skipped"] = tuple(data.get("skipped", ()))
        return cls(**data)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, default_mode())  # mkstemp's 0600 would survive the rename
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _record_json(record: EnergyRecord) -> str:
    return json.dumps(record.to_dict(), indent=2)


def _json_document(record_chunks: Sequence[str], run: dict[str, Any] | None) -> str:
    # Assembled from per-record chunks so a tracker can cache them: rewriting energy.json after
    # every epoch then costs a string join, not a re-encode of every earlier record.
    head = json.dumps({"version": RECORDS_VERSION, "run": dict(run or {})}, indent=2)[:-2]
    body = ",\n".join(record_chunks)
    return (
        f'{head},\n  "records": [\n{body}\n  ]\n}}\n' if body else f'{head},\n  "records": []\n}}\n'
    )


def records_to_json(records: Sequence[EnergyRecord], run: dict[str, Any] | None = None) -> str:
    """The JSON text of `energy.json`: {"version", "run", "records"}."""
    return _json_document([_record_json(r) for r in records], run)


def write_json(records: Sequence[EnergyRecord], path: str | os.PathLike, run=None) -> Path:
    """Write records to `path` as JSON, atomically."""
    return atomic_write_text(path, records_to_json(records, run))


def read_records(path: str | os.PathLike) -> list[EnergyRecord]:
    """Read the records of an `energy.json` written by `EnergyTracker` (or `write_json`).

    Args:
        path: the JSON file, or the folder that holds `energy.json`.

    Returns:
        The records, in the order they were written.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an energy.json of a known version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "energy.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or "records" not in doc:
        raise ValueError(f"{path} is not an energy.json: expected an object with 'records'.")
    if doc.get("version") != RECORDS_VERSION:
        raise ValueError(
            f"energy.json version must be {RECORDS_VERSION}. "
            f"Received: version={doc.get('version')!r}"
        )
    return [EnergyRecord.from_dict(r) for r in doc["records"]]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _methods(record: EnergyRecord, kind: str) -> str:
    return "+".join(sorted({d.method for d in record.device(kind)}))


def csv_row(record: EnergyRecord, host: dict[str, Any] | None = None) -> dict[str, Any]:
    """One CSV row for `record`, CodeCarbon columns first."""
    host = host if host is not None else host_info()
    duration = record.duration_s
    gpus = record.device("gpu")
    gpu_names = sorted({str(d.details.get("name", "")) for d in gpus if d.details.get("name")})
    power = (lambda j: j / duration) if duration > 0 else (lambda j: 0.0)
    measured = any(d.method.startswith("measured:") for d in record.devices)
    return {
        "timestamp": record.end_time,
        "project_name": record.project_name,
        "run_id": record.run_id,
        "duration": duration,
        "emissions": record.emissions_kg,
        "emissions_rate": record.emissions_kg / duration if duration > 0 else 0.0,
        "cpu_power": power(record.cpu_energy_j),
        "gpu_power": power(record.gpu_energy_j),
        "ram_power": power(record.ram_energy_j),
        "cpu_energy": record.cpu_energy_j / J_PER_KWH,
        "gpu_energy": record.gpu_energy_j / J_PER_KWH,
        "ram_energy": record.ram_energy_j / J_PER_KWH,
        "energy_consumed": record.energy_kwh,
        "country_name": host.get("country_name") or "",
        "country_iso_code": record.country_iso_code or "",
        "os": host["os"],
        "python_version": host["python_version"],
        "cpu_count": host["cpu_count"],
        "cpu_model": host["cpu_model"],
        "gpu_count": len(gpus),
        "gpu_model": ", ".join(gpu_names),
        "tracking_mode": "machine" if measured else "process",
        "pue": record.pue,
        "window": record.name,
        "parent": record.parent or "",
        "start_time": record.start_time,
        "end_time": record.end_time,
        "cpu_time_s": record.cpu_time_s,
        "energy_j": record.energy_j,
        "method": record.method,
        "cpu_method": _methods(record, "cpu"),
        "gpu_method": _methods(record, "gpu"),
        "ram_method": _methods(record, "ram"),
        "carbon_intensity_g_per_kwh": record.carbon_intensity_g_per_kwh,
        "carbon_source": record.carbon_source,
        "flops": "" if record.flops is None else record.flops,
    }


def host_info(country_name: str | None = None) -> dict[str, Any]:
    """The host columns of the CSV (cheap to compute; no hardware probing)."""
    return {
        "os": platform.platform(),
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count() or 1,
        "cpu_model": _cpu_model(),
        "country_name": country_name,
    }


def _csv_line(record: EnergyRecord, host: dict[str, Any]) -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n").writerow(
        csv_row(record, host)
    )
    return buf.getvalue()


def _csv_header() -> str:
    return ",".join(CSV_COLUMNS) + "\n"


def records_to_csv(records: Iterable[EnergyRecord], host: dict[str, Any] | None = None) -> str:
    """CSV text with `CSV_COLUMNS` and one row per record."""
    host = host if host is not None else host_info()
    return _csv_header() + "".join(_csv_line(r, host) for r in records)


def write_csv(records: Iterable[EnergyRecord], path: str | os.PathLike, host=None) -> Path:
    """Write records to `path` as CodeCarbon-style CSV, atomically."""
    return atomic_write_text(path, records_to_csv(records, host))


class RecordLog:
    """Records plus their cached JSON and CSV text, for cheap rewrites after every window."""

    def __init__(self, host: dict[str, Any] | None = None) -> None:
        self.host = host if host is not None else host_info()
        self.records: list[EnergyRecord] = []
        self._json: list[str] = []
        self._csv: list[str] = []

    def append(self, record: EnergyRecord) -> None:
        self.records.append(record)
        self._json.append(_record_json(record))
        self._csv.append(_csv_line(record, self.host))

    def json_text(self, run: dict[str, Any] | None = None) -> str:
        return _json_document(self._json, run)

    def csv_text(self) -> str:
        return _csv_header() + "".join(self._csv)
