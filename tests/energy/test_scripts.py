"""The GPU check script: a clear skip without a GPU, the real check with one (opt-in)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keras_lean.energy import meters as energy_meters

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_energy_check.py"


def _has_nvml_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # no library, no driver: no GPU to check
        return False


@pytest.mark.skipif(_has_nvml_gpu(), reason="this machine has a GPU; see the gpu test")
def test_gpu_check_skips_cleanly_without_a_gpu():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 77
    assert out.stdout.startswith("SKIPPED (exit 77): ")
    assert "NVIDIA" in out.stdout or "pynvml" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.gpu
def test_gpu_check_counter_and_power_agree():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "30"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_energy_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("counter_scale, code", [(1.0, 0), (1.5, 1)], ids=["agree", "disagree"])
def test_gpu_check_verdict_with_a_fake_gpu(monkeypatch, make_nvml, capsys, counter_scale, code):
    """The script's plumbing and verdict; the GPU is a fake pynvml, the load a sleep."""
    t0 = time.monotonic()

    class SteadyGpu(make_nvml):
        # 200 W, steady: the counter is the exact integral of the sampled power (x scale).
        def nvmlDeviceGetTotalEnergyConsumption(self, handle):
            return int(counter_scale * 200.0 * (time.monotonic() - t0) * 1000)

    fake = SteadyGpu()
    fake.power_mw[0] = 200_000
    script = _load_script()
    monkeypatch.setattr(energy_meters, "load_pynvml", lambda: fake)
    monkeypatch.setattr(script, "_training_load", lambda s, gpu: (time.sleep(s), (1, s))[1])
    rc = script.main(["--seconds", "0.4", "--tail", "0.1", "--period", "0.02"])
    out = capsys.readouterr().out
    assert rc == code
    assert ("PASS" if code == 0 else "FAIL") in out
    assert "measured:nvml-counter" in out and "measured:nvml-power" in out
