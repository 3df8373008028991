"""Fakes at the hardware boundary only: a pynvml stand-in and a powercap tree in tmp_path."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Overrides the suite-wide fixture for energy tests: seed only.

    Most energy tests never build a Keras model, and `clear_session` costs ~0.4 s per test;
    tests that do build one request `keras_session`.
    """
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def keras_session():
    """A clean Keras name scope after a test that builds models."""
    yield
    keras.backend.clear_session()


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeNvml:
    """A module-like object with the pynvml functions the meters call.

    Tests drive it by setting `energy_mj[i]` (the total-energy counter) and `power_mw[i]`
    (a number, or a callable returning one) between reads.
    """

    NVMLError = FakeNVMLError

    def __init__(
        self,
        count: int = 1,
        *,
        counter: bool = True,
        power: bool = True,
        init_error: str | None = None,
    ) -> None:
        self.count = count
        self.counter = counter
        self.power = power
        self.init_error = init_error
        self.energy_mj = [0] * count
        self.power_mw: list = [0.0] * count
        self.initialised = 0

    def nvmlInit(self):
        if self.init_error:
            raise FakeNVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < self.count:
            raise FakeNVMLError("Invalid Argument")
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise FakeNVMLError("Not Supported")
        return self.energy_mj[handle[1]]

    def nvmlDeviceGetPowerUsage(self, handle):
        if not self.power:
            raise FakeNVMLError("Not Supported")
        p = self.power_mw[handle[1]]
        return int(p() if callable(p) else p)


@pytest.fixture
def fake_nvml():
    return FakeNvml()


@pytest.fixture
def make_nvml():
    """The FakeNvml class, to build fakes with other settings."""
    return FakeNvml


# zone folder -> (name, max_energy_range_uj, initial energy_uj)
DEFAULT_ZONES = {
    "intel-rapl:0": ("package-0", 262_143_328_850, 1_000_000),
    "intel-rapl:0:0": ("core", 262_143_328_850, 1_000_000),
    "intel-rapl:0:1": ("uncore", 262_143_328_850, 1_000_000),
    "intel-rapl:0:2": ("dram", 65_712_999_613, 1_000_000),
    "intel-rapl:1": ("package-1", 262_143_328_850, 1_000_000),
    "intel-rapl:2": ("psys", 262_143_328_850, 1_000_000),
    "intel-rapl-mmio:0": ("package-0", 262_143_328_850, 1_000_000),
}


class PowercapTree:
    """A fake /sys/class/powercap: one folder per zone with name, max range and energy_uj."""

    def __init__(self, root: Path, zones: dict[str, tuple[str, int, int]]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "intel-rapl").mkdir()  # the control-type folder sits beside the zones
        (root / "intel-rapl" / "enabled").write_text("1\n")
        for zone, (name, max_range, energy) in zones.items():
            d = root / zone
            d.mkdir()
            (d / "name").write_text(name + "\n")
            (d / "max_energy_range_uj").write_text(f"{max_range}\n")
            (d / "energy_uj").write_text(f"{energy}\n")

    def energy(self, zone: str) -> int:
        return int((self.root / zone / "energy_uj").read_text())

    def set(self, zone: str, uj: int) -> None:
        (self.root / zone / "energy_uj").write_text(f"{uj}\n")

    def add(self, zone: str, uj: int) -> None:
        self.set(zone, self.energy(zone) + uj)


@pytest.fixture
def powercap(tmp_path):
    return PowercapTree(tmp_path / "powercap", DEFAULT_ZONES)


@pytest.fixture
def make_powercap(tmp_path):
    def make(zones, name="powercap"):
        return PowercapTree(tmp_path / name, zones)

    return make
