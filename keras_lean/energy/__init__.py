"""Energy of every stage: measured where the hardware allows, estimated and labelled where not.

Backends per device, best first: NVML energy counter, NVML power sampling (GPUs); RAPL package and
DRAM counters, CPU-time x TDP estimate (CPU). Results are `EnergyRecord`s, written as JSON and as
a CSV with CodeCarbon's column names.

Example:
    >>> from keras_lean.energy import EnergyTracker
    >>> with EnergyTracker("runs/demo", carbon_intensity="FR") as tracker:
    ...     with tracker.window("train"):
    ...         model.fit(x, y, callbacks=[tracker.callback()])
"""

from __future__ import annotations

from keras_lean.energy.carbon import (
    WORLD_AVERAGE_G_PER_KWH,
    CarbonIntensity,
    known_countries,
    resolve_carbon_intensity,
)
from keras_lean.energy.meters import (
    DEFAULT_TDP_W_PER_LOGICAL_CORE,
    AbsentMeter,
    CpuEstimateMeter,
    Meter,
    NvmlCounterMeter,
    NvmlPowerMeter,
    RaplMeter,
    Reading,
)
from keras_lean.energy.records import (
    CSV_COLUMNS,
    DeviceEnergy,
    EnergyRecord,
    read_records,
)
from keras_lean.energy.tracker import EnergyTracker, TrackerConfig, Window, measure_command

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_TDP_W_PER_LOGICAL_CORE",
    "WORLD_AVERAGE_G_PER_KWH",
    "AbsentMeter",
    "CarbonIntensity",
    "CpuEstimateMeter",
    "DeviceEnergy",
    "EnergyRecord",
    "EnergyTracker",
    "Meter",
    "NvmlCounterMeter",
    "NvmlPowerMeter",
    "RaplMeter",
    "Reading",
    "TrackerConfig",
    "Window",
    "known_countries",
    "measure_command",
    "read_records",
    "resolve_carbon_intensity",
]
