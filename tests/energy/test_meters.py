"""Meters: RAPL on a fake powercap tree, NVML through a fake pynvml, the CPU-time estimate."""

from __future__ import annotations

import threading
import time

import pytest

from keras_lean.energy import meters as m


def wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# ----------------------------------------------------------------------------- RAPL


def test_rapl_sums_top_level_packages_only(powercap):
    meter = m.RaplMeter(powercap.root, "package", start_poller=False)
    assert [z.zone_id for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    start = meter.read()
    powercap.add("intel-rapl:0", 2_000_000)
    powercap.add("intel-rapl:1", 3_000_000)
    # Nested / containing / duplicate zones move too but must not be added.
    powercap.add("intel-rapl:0:0", 1_500_000)
    powercap.add("intel-rapl:0:1", 400_000)
    powercap.add("intel-rapl:2", 9_000_000)
    powercap.add("intel-rapl-mmio:0", 2_000_000)
    powercap.add("intel-rapl:0:2", 700_000)
    energy = meter.measure(start, meter.read())
    assert energy.energy_j == pytest.approx(5.0)
    assert (energy.device, energy.method, energy.scope) == ("cpu", "measured:rapl", "package")
    assert energy.details["zones"] == ["intel-rapl:0:package-0", "intel-rapl:1:package-1"]
    assert any("psys" in s for s in energy.details["not_summed"])


def test_rapl_dram_is_its_own_device(powercap):
    meter = m.RaplMeter(powercap.root, "dram", start_poller=False)
    start = meter.read()
    powercap.add("intel-rapl:0:2", 700_000)
    powercap.add("intel-rapl:0", 5_000_000)
    energy = meter.measure(start, meter.read())
    assert energy.device == "ram"
    assert energy.energy_j == pytest.approx(0.7)


def test_rapl_wraparound_adds_the_range_back(make_powercap):
    tree = make_powercap({"intel-rapl:0": ("package-0", 10_000_000, 9_000_000)})
    meter = m.RaplMeter(tree.root, "package", start_poller=False)
    start = meter.read()
    tree.set("intel-rapl:0", 1_000_000)  # 9.0 J -> wrap at 10.0 J -> 1.0 J: 2 J used
    end = meter.read()
    energy = meter.measure(start, end)
    assert energy.energy_j == pytest.approx(2.0)
    assert len(energy.notes) == 1 and "wrapped" in energy.notes[0]
    # A later window without a wrap carries no note.
    tree.add("intel-rapl:0", 500_000)
    later = meter.measure(end, meter.read())
    assert later.energy_j == pytest.approx(0.5) and later.notes == ()


def test_rapl_poller_catches_each_wrap(make_powercap):
    # Range 1 J: the poll period is clamped to the 10 ms floor, far below a wrap at 1 kW.
    tree = make_powercap({"intel-rapl:0": ("package-0", 1_000_000, 100_000)})
    meter = m.RaplMeter(tree.root, "package")
    try:
        assert meter.sample_period_s == pytest.approx(0.01)
        start = meter.read()
        tree.set("intel-rapl:0", 50_000)  # first wrap: +0.95 J
        assert wait_until(lambda: len(meter.events) == 1), "poller did not read the counter"
        tree.set("intel-rapl:0", 20_000)  # second wrap: +0.97 J
        energy = meter.measure(start, meter.read())
    finally:
        meter.close()
    # A reader that only looked at the window boundaries would see a single wrap (0.92 J).
    assert energy.energy_j == pytest.approx(1.92)
    assert len(energy.notes) == 2


def test_rapl_poll_period_cannot_miss_a_wrap(make_powercap):
    big = make_powercap({"intel-rapl:0": ("package-0", 262_143_328_850, 0)}, "big")
    small = make_powercap({"intel-rapl:0": ("package-0", 4_294_967_295, 0)}, "small")
    for tree in (big, small):
        meter = m.RaplMeter(tree.root, "package", start_poller=False)
        range_j = meter.zones[0].max_energy_range_uj * 1e-6
        # At 1 kW the counter needs range_j / 1000 s to wrap; we read at least twice as often.
        assert meter.sample_period_s <= range_j / 1000.0 / 2
        assert meter.sample_period_s <= 5.0


def test_rapl_permission_error_says_how_to_grant_access(powercap):
    def reader(path):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text()

    with pytest.raises(PermissionError, match=r"sudo chmod o\+r .*energy_uj"):
        m.RaplMeter(powercap.root, "package", reader=reader, start_poller=False)
    meters = m.cpu_meters(powercap.root, reader=reader)
    absent = [x for x in meters if not x.available]
    estimate = [x for x in meters if x.available]
    assert len(estimate) == 1 and estimate[0].method == "estimated:cpu-tdp"
    assert absent[0].method == "absent:rapl" and "chmod o+r" in absent[0].reason
    assert "udev" in absent[0].reason


def test_rapl_missing_root_falls_back_to_estimate(tmp_path):
    with pytest.raises(FileNotFoundError, match="no powercap folder"):
        m.RaplMeter(tmp_path / "nope")
    meters = m.cpu_meters(tmp_path / "nope")
    assert [x.method for x in meters] == ["absent:rapl", "estimated:cpu-tdp"]
    assert "RAPL unavailable" in meters[1].fallback_reason


def test_rapl_tree_without_packages_is_not_found(make_powercap):
    tree = make_powercap({"intel-rapl:1": ("psys", 1_000_000, 0)})
    with pytest.raises(FileNotFoundError, match="no RAPL package zone"):
        m.RaplMeter(tree.root, start_poller=False)


def test_find_rapl_zones_rejects_unknown_kind(powercap):
    with pytest.raises(ValueError, match="kind must be 'package' or 'dram'"):
        m.find_rapl_zones(powercap.root, "core")


# ----------------------------------------------------------------------------- CPU estimate


def test_estimate_arithmetic_with_fake_clocks():
    cpu, wall = [10.0], [100.0]
    meter = m.CpuEstimateMeter(
        80.0, logical_cores=4, cpu_time=lambda: cpu[0], clock=lambda: wall[0]
    )
    start = meter.read()
    cpu[0] += 3.0
    wall[0] += 6.0
    energy = meter.measure(start, meter.read())
    # 80 W x (3 s / 6 s) / 4 cores x 6 s = 60 J
    assert energy.energy_j == pytest.approx(60.0)
    assert energy.method == "estimated:cpu-tdp" and energy.scope == "process"
    d = energy.details
    assert d["cpu_share"] == pytest.approx(0.125) and d["power_w"] == pytest.approx(10.0)
    assert d["tdp_w"] == 80.0 and "tdp_w * cpu_time_s / logical_cores" in d["formula"]


def test_estimate_default_tdp_is_stated():
    meter = m.CpuEstimateMeter(logical_cores=6)
    assert meter.tdp_w == pytest.approx(6 * m.DEFAULT_TDP_W_PER_LOGICAL_CORE)
    r = meter.read()
    assert "default" in meter.measure(r, r).details["tdp_source"]


def _burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_estimate_burning_cpu_matches_tdp_times_cpu_share():
    tdp, cores = 65.0, 2
    meter = m.CpuEstimateMeter(tdp, logical_cores=cores)
    start = meter.read()
    t0 = time.perf_counter()
    _burn_cpu(0.6)  # a fixed amount of CPU time, however busy the machine is
    wall = time.perf_counter() - t0
    energy = meter.measure(start, meter.read())
    cpu_share = 0.6 / wall / cores
    expected = tdp * cpu_share * wall
    assert energy.method == "estimated:cpu-tdp"
    assert energy.energy_j == pytest.approx(expected, rel=0.10)


def test_estimate_sleeping_costs_almost_nothing():
    tdp = 100.0
    meter = m.CpuEstimateMeter(tdp, logical_cores=2)
    start = meter.read()
    time.sleep(0.3)
    energy = meter.measure(start, meter.read())
    wall = energy.details["wall_time_s"]
    # Wall-time based (wrong) accounting would give tdp * wall / cores = 15 J.
    assert energy.energy_j < 0.1 * tdp * wall / 2


@pytest.mark.parametrize("tdp", [0, -5, True], ids=["zero", "negative", "bool"])
def test_estimate_rejects_bad_tdp(tdp):
    with pytest.raises(ValueError, match="cpu_tdp_w must be a positive number"):
        m.CpuEstimateMeter(tdp)


# ----------------------------------------------------------------------------- NVML


def test_nvml_counter_difference(fake_nvml):
    fake_nvml.energy_mj[0] = 1_000
    meter = m.NvmlCounterMeter(fake_nvml, 0)
    start = meter.read()
    fake_nvml.energy_mj[0] = 6_500
    energy = meter.measure(start, meter.read())
    assert energy.energy_j == pytest.approx(5.5)
    assert (energy.device, energy.method, energy.scope) == (
        "gpu:0",
        "measured:nvml-counter",
        "device",
    )
    assert energy.details["name"] == "Fake GPU" and energy.notes == ()


def test_nvml_counter_reset_is_flagged(fake_nvml):
    fake_nvml.energy_mj[0] = 50_000
    meter = m.NvmlCounterMeter(fake_nvml, 0)
    start = meter.read()
    fake_nvml.energy_mj[0] = 60_000  # +10 J
    meter.read()
    fake_nvml.energy_mj[0] = 2_000  # driver reloaded: counter restarted, 2 J since then
    end = meter.read()
    energy = meter.measure(start, end)
    assert energy.energy_j == pytest.approx(12.0)
    assert meter.resets == 1
    assert len(energy.notes) == 1 and "driver reset" in energy.notes[0]
    fake_nvml.energy_mj[0] = 3_000
    assert meter.measure(end, meter.read()).notes == ()


def test_nvml_power_trapezoid_with_fake_clock(fake_nvml):
    clock = [0.0]
    fake_nvml.power_mw[0] = 100_000  # 100 W
    meter = m.NvmlPowerMeter(
        fake_nvml, 0, sample_period_s=0.1, clock=lambda: clock[0], start_sampler=False
    )
    start = meter.read()  # t=0, 100 W
    for t, watts in ((0.1, 200), (0.2, 200)):
        clock[0], fake_nvml.power_mw[0] = t, watts * 1000
        meter.sample()
    clock[0], fake_nvml.power_mw[0] = 0.3, 100_000
    energy = meter.measure(start, meter.read())
    # 0.1 * (100+200)/2 + 0.1 * 200 + 0.1 * (200+100)/2 = 15 + 20 + 15
    assert energy.energy_j == pytest.approx(50.0)
    assert energy.method == "measured:nvml-power" and energy.sample_period_s == 0.1
    assert energy.details["samples"] == 3


def test_nvml_power_thread_sees_load_between_boundaries(fake_nvml):
    busy = threading.Event()
    fake_nvml.power_mw[0] = lambda: 300_000 if busy.is_set() else 0
    meter = m.NvmlPowerMeter(fake_nvml, 0, sample_period_s=0.01)
    try:
        start = meter.read()  # 0 W at the boundary
        busy.set()
        t0 = time.monotonic()
        time.sleep(0.3)
        busy.clear()
        busy_s = time.monotonic() - t0
        time.sleep(0.05)
        energy = meter.measure(start, meter.read())  # 0 W at the boundary
    finally:
        meter.close()
    # Boundary samples alone would give 0 J; the sampler integrates the 300 W plateau.
    assert energy.energy_j == pytest.approx(300 * busy_s, rel=0.2)
    assert energy.details["samples"] >= 10


def test_nvml_power_rejects_slow_sampling(fake_nvml):
    with pytest.raises(ValueError, match=r"sample_period_s must be in \(0, 0.1\]"):
        m.NvmlPowerMeter(fake_nvml, 0, sample_period_s=0.5, start_sampler=False)


def test_gpu_meters_prefers_counter_then_power(make_nvml):
    FakeNvml = make_nvml
    fake = FakeNvml(count=2)
    meters = m.gpu_meters(nvml=fake)
    assert [x.method for x in meters] == ["measured:nvml-counter"] * 2
    no_counter = FakeNvml(count=1, counter=False)
    meters = m.gpu_meters(nvml=no_counter, sample_period_s=0.05)
    try:
        assert meters[0].method == "measured:nvml-power"
        assert meters[0].sample_period_s == 0.05
        assert "energy counter not supported" in meters[0].events[0]
    finally:
        for x in meters:
            x.close()
    nothing = m.gpu_meters(nvml=FakeNvml(counter=False, power=False))
    assert nothing[0].available is False and "power reading failed" in nothing[0].reason


def test_gpu_meters_selects_indices(make_nvml):
    FakeNvml = make_nvml
    meters = m.gpu_meters([1], nvml=FakeNvml(count=2))
    assert [x.device for x in meters] == ["gpu:1"]
    with pytest.raises(ValueError, match=r"gpu_indices must hold integers in \[0, 2\)"):
        m.gpu_meters([2], nvml=FakeNvml(count=2))


def test_gpu_meters_without_driver_or_library_is_absent(monkeypatch, make_nvml):
    FakeNvml = make_nvml
    meters = m.gpu_meters(nvml=FakeNvml(init_error="NVML Shared Library Not Found"))
    assert len(meters) == 1 and meters[0].available is False
    assert "no NVIDIA driver" in meters[0].reason and "Library Not Found" in meters[0].reason
    assert m.gpu_meters(nvml=FakeNvml(count=0))[0].reason == "NVML found no GPU"

    def no_pynvml():
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(m, "load_pynvml", no_pynvml)
    assert "not installed" in m.gpu_meters()[0].reason


def test_every_meter_follows_the_protocol(powercap, fake_nvml):
    power = m.NvmlPowerMeter(fake_nvml, 0, start_sampler=False)
    meters = [
        m.CpuEstimateMeter(),
        m.RaplMeter(powercap.root, start_poller=False),
        m.NvmlCounterMeter(fake_nvml, 0),
        power,
        m.AbsentMeter("gpu", "nvml", "why"),
    ]
    for meter in meters:
        assert isinstance(meter, m.Meter)
        r = meter.read()
        assert meter.measure(r, meter.read()).energy_j >= 0
        meter.close()
