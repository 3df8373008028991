"""Real check of the NVML backends on a machine with an NVIDIA GPU.

Runs a Keras training load on one GPU for about 30 s inside one window measured twice at once:
by NVML's energy counter (`measured:nvml-counter`) and by NVML power sampling integrated with the
trapezoid rule (`measured:nvml-power`). The two must agree within 5 %.

Usage:
    python scripts/gpu_energy_check.py [--seconds 30] [--gpu 0] [--period 0.05] [--tolerance 0.05]

Exit codes:
    0   the two energies agree within the tolerance (PASS)
    1   they do not (FAIL)
    77  nothing to check here: no pynvml, no NVIDIA driver, no GPU, or the GPU has no energy
        counter (the automake/meson "skipped" code). A message says which.

Notes:
    On recent GPUs `nvmlDeviceGetPowerUsage` reports power averaged over about a second, which
    lags a load step; the window therefore ends with a short idle tail (--tail) so the sampled
    figure sees the whole decay of the power curve that the counter already counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SKIPPED = 77


def _skip(message: str) -> int:
    print(f"SKIPPED (exit {SKIPPED}): {message}")
    return SKIPPED


def _probe_gpu(index: int):
    """pynvml module, or the reason there is nothing to check."""
    try:
        from keras_lean.energy.meters import load_pynvml

        nvml = load_pynvml()
    except ImportError as e:
        return None, f"pynvml (nvidia-ml-py) is not installed: {e}"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return None, f"no NVIDIA driver or GPU on this machine (NVML: {e})"
    count = nvml.nvmlDeviceGetCount()
    if not 0 <= index < count:
        return None, f"GPU index {index} not present (NVML sees {count} GPU(s))"
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except nvml.NVMLError as e:
        return None, f"GPU {index} has no NVML energy counter (needs Volta or newer): {e}"
    return nvml, ""


def _training_load(seconds: float, gpu: int) -> tuple[int, float]:
    """Train a mid-size MLP on random data on one GPU until `seconds` have passed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise RuntimeError("TensorFlow sees no GPU although NVML does (CUDA libraries missing?)")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((65536, 1024), dtype=np.float32)
    y = rng.integers(0, 100, size=65536)
    with tf.device(f"/GPU:{gpu}" if gpu < len(gpus) else "/GPU:0"):
        model = keras.Sequential(
            [keras.Input((1024,))]
            + [keras.layers.Dense(4096, activation="relu") for _ in range(4)]
            + [keras.layers.Dense(100)]
        )
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x[:2048], y[:2048], batch_size=1024, epochs=1, verbose=0)  # compile / warm up
        epochs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.fit(x, y, batch_size=1024, epochs=1, verbose=0)
            epochs += 1
    return epochs, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="training load length")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU")
    parser.add_argument("--period", type=float, default=0.05, help="power sampling period, s")
    parser.add_argument("--tail", type=float, default=3.0, help="idle seconds before closing")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed relative gap")
    args = parser.parse_args(argv)

    nvml, reason = _probe_gpu(args.gpu)
    if nvml is None:
        return _skip(reason)

    from keras_lean.energy import EnergyTracker
    from keras_lean.energy.meters import NvmlCounterMeter, NvmlPowerMeter

    counter = NvmlCounterMeter(nvml, args.gpu)
    power = NvmlPowerMeter(nvml, args.gpu, sample_period_s=args.period)
    with EnergyTracker(meters=[counter, power], run_name="gpu_energy_check") as tracker:
        with tracker.window("training_load") as window:
            epochs, load_s = _training_load(args.seconds, args.gpu)
            time.sleep(args.tail)
    record = window.record
    by_method = {d.method: d for d in record.devices}
    e_counter = by_method["measured:nvml-counter"].energy_j
    e_power = by_method["measured:nvml-power"].energy_j
    gap = abs(e_power - e_counter) / e_counter if e_counter > 0 else float("inf")

    print(f"GPU {args.gpu}: {counter.name}")
    print(
        f"window: {record.duration_s:.2f} s ({load_s:.2f} s training, {epochs} epochs, "
        f"{args.tail:g} s idle tail)"
    )
    print(
        f"counter (measured:nvml-counter): {e_counter:10.1f} J  "
        f"mean {e_counter / record.duration_s:6.1f} W"
    )
    samples = by_method["measured:nvml-power"].details["samples"]
    print(
        f"sampled (measured:nvml-power):   {e_power:10.1f} J  "
        f"mean {e_power / record.duration_s:6.1f} W  ({samples} samples, period {args.period} s)"
    )
    for d in record.devices:
        for note in d.notes:
            print(f"note [{d.method}]: {note}")
    verdict = "PASS" if gap <= args.tolerance else "FAIL"
    print(f"{verdict}: relative gap {gap * 100:.2f} % (tolerance {args.tolerance * 100:.1f} %)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
