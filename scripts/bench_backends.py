"""Per-training-step time, plain vs keras_lean-wrapped, on TensorFlow and JAX (XLA on).

Each backend runs in its own subprocess (the Keras backend is fixed per process). Models: a small
CNN (28x28x1) and MobileNetV2 (weights=None) at its ImageNet input size. "wrapped" is
`prune_low_magnitude` with a PolynomialDecay that recomputes the masks every `--frequency` steps
(100, TFMOT's default; `--frequency 1` is the worst case, a full ranking of every pruned weight
in every step). The median step is timed. Target: wrapped / plain <= 1.10 on both.

    python scripts/bench_backends.py --steps 10 --batch 8
    python scripts/bench_backends.py --models cnn --backends jax --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = ("cnn", "mobilenetv2")
BACKENDS = ("tensorflow", "jax")


def _model(name: str):
    import keras

    if name == "cnn":
        return keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
    return keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classes=10)


def _step_time(model, x, y, steps: int, warmup: int) -> float:
    import keras

    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    for _ in range(warmup):  # compiles the step
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)  # returns host floats: the step has finished
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def _measure(models, steps: int, warmup: int, batch: int, frequency: int) -> list[dict]:
    import keras
    import numpy as np

    import keras_lean as kl
    from keras_lean.sparsity import PolynomialDecay

    rows = []
    for name in models:
        keras.utils.set_random_seed(0)
        plain = _model(name)
        shape = (batch, *plain.input_shape[1:])
        x = np.random.default_rng(0).random(shape, dtype="float32")
        y = np.random.default_rng(1).integers(0, 10, batch).astype("int32")
        schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=10_000, frequency=frequency)
        wrapped = kl.prune_low_magnitude(plain, schedule)
        t_plain = _step_time(plain, x, y, steps, warmup)
        t_wrapped = _step_time(wrapped, x, y, steps, warmup)
        rows.append(
            {
                "backend": keras.backend.backend(),
                "model": name,
                "batch": batch,
                "frequency": frequency,
                "plain_ms": 1e3 * t_plain,
                "wrapped_ms": 1e3 * t_wrapped,
                "ratio": t_wrapped / t_plain,
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="cnn,mobilenetv2")
    p.add_argument("--backends", default=",".join(BACKENDS), help="tensorflow,jax")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frequency", type=int, default=100, help="mask update every N steps")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in MODELS] + [
        b for b in a.backends.split(",") if b not in BACKENDS
    ]
    if bad or a.steps < 1 or a.batch < 1:
        p.error(f"unknown model/backend {bad} or steps/batch < 1")
    if a._child:
        print(json.dumps(_measure(models, a.steps, a.warmup, a.batch, a.frequency)))
        return 0
    rows = []
    for backend in a.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, __file__, "--_child", "--models", ",".join(models)]
        cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch)]
        cmd += ["--frequency", str(a.frequency)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            print(f"{backend}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows += json.loads(r.stdout.strip().splitlines()[-1])
    print(f"mask update every {a.frequency} steps; median of {a.steps} steps")
    print(f"{'backend':<11} {'model':<12} {'batch':>5} {'plain ms':>9} {'wrapped ms':>10} ratio")
    for r in rows:
        print(
            f"{r['backend']:<11} {r['model']:<12} {r['batch']:>5} {r['plain_ms']:>9.2f} "
            f"{r['wrapped_ms']:>10.2f} {r['ratio']:.3f}{'' if r['ratio'] <= 1.10 else '  > 1.10'}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
