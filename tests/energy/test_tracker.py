"""EnergyTracker windows, backend choice, files, the Keras callback and measure_command."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import keras
import pytest

from keras_lean.energy import (
    CSV_COLUMNS,
    EnergyTracker,
    TrackerConfig,
    measure_command,
    read_records,
)
from keras_lean.energy import meters as m


def burn(cpu_s: float) -> None:
    end = time.process_time() + cpu_s
    x = 0
    while time.process_time() < end:
        x += 1


@pytest.fixture
def no_gpu(monkeypatch, make_nvml):
    """Make NVML discovery deterministic: a machine whose NVML library is missing."""
    monkeypatch.setattr(
        m, "load_pynvml", lambda: make_nvml(init_error="NVML Shared Library Not Found")
    )


def test_nested_windows_and_parents(tmp_path, no_gpu):
    with EnergyTracker(rapl_root=tmp_path / "none", cpu_tdp_w=40.0) as tracker:
        with tracker.window("pipeline") as outer:
            with tracker.window("train", flops=1e9):
                burn(0.2)
            with tracker.window("prune") as prune:
                burn(0.1)
                prune.flops = 5e8
            time.sleep(0.05)
    names = [(r.name, r.parent) for r in tracker.records]
    assert names == [("train", "pipeline"), ("prune", "pipeline"), ("pipeline", None)]
    train, prune_r, pipe = tracker.records
    assert outer.record is pipe and prune.record is prune_r
    assert train.flops == 1e9 and prune_r.flops == 5e8 and pipe.flops is None
    assert pipe.energy_j >= train.energy_j + prune_r.energy_j
    assert pipe.duration_s >= train.duration_s + prune_r.duration_s
    assert train.cpu_time_s >= 0.2
    assert train.method == "estimated:cpu-tdp"
    assert train.cpu_energy_j == pytest.approx(train.energy_j) and train.gpu_energy_j == 0
    # Whatever the core count: energy = tdp x CPU time / logical cores.
    est = train.devices[0].details
    assert train.cpu_energy_j == pytest.approx(40.0 * est["cpu_time_s"] / est["logical_cores"])
    assert any("NVML not available" in s for s in train.skipped)
    assert any("rapl" in s for s in train.skipped)


def test_fake_gpu_counter_and_estimate_together(tmp_path, monkeypatch, make_nvml):
    fake = make_nvml(count=1)
    fake.energy_mj[0] = 10_000
    monkeypatch.setattr(m, "load_pynvml", lambda: fake)
    with EnergyTracker(rapl_root=tmp_path / "none") as tracker:
        with tracker.window("fit") as w:
            fake.energy_mj[0] += 250_000  # 250 J on the GPU
    record = w.record
    assert record.method == "measured:nvml-counter+estimated:cpu-tdp"
    assert record.gpu_energy_j == pytest.approx(250.0)
    assert record.energy_j == pytest.approx(250.0 + record.cpu_energy_j)
    assert [d.device for d in record.devices] == ["gpu:0", "cpu"]
    assert record.device("gpu")[0].details["name"] == "Fake GPU"


def test_rapl_tree_is_used_when_present(powercap, no_gpu):
    with EnergyTracker(rapl_root=powercap.root) as tracker:
        with tracker.window("stage") as w:
            powercap.add("intel-rapl:0", 3_000_000)
            powercap.add("intel-rapl:1", 1_000_000)
            powercap.add("intel-rapl:0:2", 500_000)
    record = w.record
    assert record.method == "measured:rapl"  # labels are de-duplicated
    assert [d.device for d in record.devices] == ["cpu", "ram"]
    assert record.cpu_energy_j == pytest.approx(4.0)
    assert record.ram_energy_j == pytest.approx(0.5)
    assert record.energy_j == pytest.approx(4.5)
    assert {d.scope for d in record.devices} == {"package"}


def test_pue_and_carbon_arithmetic(make_nvml):
    fake = make_nvml()
    meter = m.NvmlCounterMeter(fake, 0)
    tracker = EnergyTracker(carbon_intensity="FR", pue=1.5, meters=[meter])
    with tracker.window("w") as w:
        fake.energy_mj[0] += 7_200_000  # 7200 J at the device = 0.002 kWh
    r = w.record
    assert r.it_energy_j == pytest.approx(7200.0)
    assert r.energy_j == pytest.approx(10800.0) and r.gpu_energy_j == pytest.approx(10800.0)
    assert r.devices[0].energy_j == pytest.approx(7200.0)  # devices stay before PUE
    assert r.energy_kwh == pytest.approx(0.003)
    assert r.carbon_intensity_g_per_kwh == pytest.approx(53.26)
    assert r.emissions_kg == pytest.approx(0.003 * 53.26 / 1000)
    assert r.country_iso_code == "FRA" and "Ember" in r.carbon_source
    tracker.close()


def test_files_are_rewritten_after_each_window(tmp_path, make_nvml):
    fake = make_nvml()
    out = tmp_path / "run"
    with EnergyTracker(out, meters=[m.NvmlCounterMeter(fake, 0)], run_name="demo") as tracker:
        with tracker.window("a", flops=3.0):
            fake.energy_mj[0] += 3_600_000_000  # 3.6 MJ = 1 kWh
        assert [r.name for r in read_records(out / "energy.json")] == ["a"]
        with tracker.window("b"):
            fake.energy_mj[0] += 1_000
    back = read_records(out)
    assert back == tracker.records
    assert sorted(os.listdir(out)) == ["energy.csv", "energy.json"]  # no temp files left
    with open(out / "energy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    a = rows[0]
    assert a["window"] == "a" and a["project_name"] == "demo" and a["flops"] == "3.0"
    assert float(a["energy_consumed"]) == pytest.approx(1.0)  # kWh
    assert float(a["gpu_energy"]) == pytest.approx(1.0)
    assert float(a["gpu_power"]) == pytest.approx(3.6e6 / float(a["duration"]), rel=1e-6)
    assert float(a["emissions"]) == pytest.approx(0.475)
    assert a["tracking_mode"] == "machine" and a["gpu_method"] == "measured:nvml-counter"
    # write_json / write_csv to other paths give the same content
    tracker.write_json(tmp_path / "copy.json")
    tracker.write_csv(tmp_path / "copy.csv")
    assert read_records(tmp_path / "copy.json") == back
    assert (tmp_path / "copy.csv").read_text() == (out / "energy.csv").read_text()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pue": 0.9}, r"pue must be a finite number >= 1.0. Received: pue=0.9"),
        ({"carbon_intensity": "XXX"}, r"carbon_intensity country code must be one of"),
        ({"carbon_intensity": -1}, r"carbon_intensity must be a positive finite number"),
        ({"sample_period_s": 0.5}, r"sample_period_s must be in \(0, 0.1\]"),
        ({"cpu_tdp_w": -3}, r"cpu_tdp_w must be None or a positive number"),
        ({"gpu_indices": [-1]}, r"gpu_indices must be None or non-negative integers"),
    ],
    ids=["pue", "country", "negative-intensity", "sample-period", "tdp", "gpu-index"],
)
def test_tracker_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyTracker(meters=[], **kwargs)


def test_window_errors():
    tracker = EnergyTracker(meters=[m.CpuEstimateMeter()])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        with tracker.window(""):
            pass
    with pytest.raises(ValueError, match="flops must be None or a number >= 0"):
        with tracker.window("x", flops=-1):
            pass
    with tracker.window("y") as w:
        with pytest.raises(ValueError, match="flops must be None or a number >= 0"):
            w.flops = "many"
    with pytest.raises(RuntimeError, match="Window 'y' is closed; set flops before it closes"):
        w.flops = 1.0
    with pytest.raises(ValueError, match="prefix must be a non-empty string"):
        tracker.callback(prefix="")
    with pytest.raises(TypeError, match="meters must follow the Meter protocol"):
        EnergyTracker(meters=[object()])
    tracker.close()
    with pytest.raises(RuntimeError, match="EnergyTracker is closed"):
        with tracker.window("late"):
            pass


def test_close_closes_open_windows():
    tracker = EnergyTracker(meters=[m.CpuEstimateMeter()])
    tracker.open_window("left-open")
    tracker.close()
    tracker.close()  # twice is fine
    assert [r.name for r in tracker.records] == ["left-open"]


def test_config_round_trip_and_unknown_key():
    config = TrackerConfig(output_dir="x", carbon_intensity="DE", gpu_indices=[0, 1])
    assert TrackerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown key 'pew' for TrackerConfig"):
        TrackerConfig.from_dict({"pew": 1.2})


def test_energy_never_imports_tensorflow_or_keras():
    code = (
        "import sys\n"
        "import keras_lean.energy as e\n"
        "assert 'pynvml' not in sys.modules\n"
        "t = e.EnergyTracker(rapl_root='/nonexistent')\n"
        "with t.window('a'):\n"
        "    pass\n"
        "t.close()\n"
        "print(sorted(k for k in ('tensorflow', 'keras') if k in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_tensorflow_is_synced_at_boundaries_when_imported(monkeypatch):
    import tensorflow as tf

    calls = []
    monkeypatch.setattr(tf.test.experimental, "sync_devices", lambda: calls.append(1))
    tracker = EnergyTracker(meters=[m.CpuEstimateMeter()])
    with tracker.window("a"):
        assert len(calls) == 1
    assert len(calls) == 2


def test_keras_callback_puts_energy_in_epoch_logs(digits, no_gpu, tmp_path, keras_session):
    x, y, _, _ = digits
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False
    )
    tracker = EnergyTracker(tmp_path / "run", rapl_root=tmp_path / "none")
    with tracker.window("fit"):
        history = model.fit(
            x[:256], y[:256], epochs=2, batch_size=64, verbose=0, callbacks=[tracker.callback()]
        )
    tracker.close()
    assert len(history.history["energy_j"]) == 2
    assert all(j > 0 for j in history.history["energy_j"])
    epochs = [r for r in tracker.records if r.name.startswith("epoch_")]
    assert [(r.name, r.parent) for r in epochs] == [("epoch_1", "fit"), ("epoch_2", "fit")]
    assert history.history["energy_j"] == [r.energy_j for r in epochs]
    assert history.history["energy_kwh"][0] == pytest.approx(epochs[0].energy_j / 3.6e6)
    assert [r.name for r in read_records(tmp_path / "run")] == ["epoch_1", "epoch_2", "fit"]


def test_measure_command_counts_the_child_cpu(tmp_path, no_gpu):
    burn_s = 0.5
    code = (
        "import time\n"
        f"end = time.process_time() + {burn_s}\n"
        "while time.process_time() < end:\n"
        "    pass\n"
    )
    rc, record = measure_command(
        [sys.executable, "-c", code],
        tmp_path / "m",
        cpu_tdp_w=50.0,
        rapl_root=tmp_path / "none",
        window_name="burn",
    )
    assert rc == 0 and record.name == "burn"
    assert record.cpu_time_s >= burn_s  # the child's CPU time, seen through RUSAGE_CHILDREN
    cores = record.devices[0].details["logical_cores"]
    est = record.devices[0].details
    assert record.cpu_energy_j == pytest.approx(50.0 * est["cpu_time_s"] / cores)
    assert est["cpu_time_s"] == pytest.approx(record.cpu_time_s, rel=0.05)
    # Interpreter start-up adds some CPU on top of the burn; stay within 10 % of burn + 0.1 s.
    assert 50.0 * burn_s / cores <= record.cpu_energy_j <= 1.1 * 50.0 * (burn_s + 0.1) / cores
    assert read_records(tmp_path / "m")[0] == record


def test_measure_command_returns_the_exit_code(tmp_path, no_gpu):
    rc, record = measure_command(
        [sys.executable, "-c", "import sys; sys.exit(3)"], rapl_root=tmp_path / "none"
    )
    assert rc == 3 and record.name.endswith("'import sys; sys.exit(3)'")


@pytest.mark.parametrize("argv", [[], "python -c 1", [1, 2]], ids=["empty", "string", "ints"])
def test_measure_command_rejects_bad_argv(argv):
    with pytest.raises(ValueError, match="argv must be a non-empty list of strings"):
        measure_command(argv)
