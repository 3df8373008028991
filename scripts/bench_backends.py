"""Per-training-step time, plain vs keras_lean-wrapped, on TensorFlow and JAX (XLA on).

Each backend runs in its own subprocess (the Keras backend is fixed per process). Models: a small
CNN (28x28x1) and MobileNetV2 (weights=None) at `--image-size` (96 by default, its smallest
ImageNet size; 224 is the full one, minutes per compile on a small CPU). "wrapped" is
`prune_low_magnitude` with a PolynomialDecay that recomputes the masks every `--frequency` steps
(100, TFMOT's default; `--frequency 1` is the worst case, a mask update in every step). Plain and
wrapped steps alternate after both are compiled, and the ratio is the median of the paired
per-round ratios, so load from other processes hits both alike. Target: wrapped / plain <= 1.10.

    python scripts/bench_backends.py                      # both models, both backends, minutes
    python scripts/bench_backends.py --models cnn --backends jax --steps 30 --frequency 1
    python scripts/bench_backends.py --models mobilenetv2 --image-size 224 --batch 8
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


def _model(name: str, image_size: int):
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
    shape = (image_size, image_size, 3)
    return keras.applications.MobileNetV2(weights=None, input_shape=shape, classes=10)


def _compiled(model, x, y, warmup: int):
    import keras

    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    t0 = time.perf_counter()
    for _ in range(warmup):  # the first compiles the step
        model.train_on_batch(x, y)
    return time.perf_counter() - t0


def _one_step(model, x, y) -> float:
    t0 = time.perf_counter()
    model.train_on_batch(x, y)  # returns host floats: the step has finished
    return time.perf_counter() - t0


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _measure(models, steps, warmup, batch, frequency, image_size) -> list[dict]:
    import keras
    import numpy as np

    import keras_lean as kl
    from keras_lean.sparsity import PolynomialDecay

    rows = []
    for name in models:
        keras.utils.set_random_seed(0)
        plain = _model(name, image_size)
        shape = (batch, *plain.input_shape[1:])
        x = np.random.default_rng(0).random(shape, dtype="float32")
        y = np.random.default_rng(1).integers(0, 10, batch).astype("int32")
        schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=10_000, frequency=frequency)
        wrapped = kl.prune_low_magnitude(plain, schedule)
        compile_plain = _compiled(plain, x, y, warmup)
        compile_wrapped = _compiled(wrapped, x, y, warmup)
        pairs = [(_one_step(plain, x, y), _one_step(wrapped, x, y)) for _ in range(steps)]
        rows.append(
            {
                "backend": keras.backend.backend(),
                "model": name,
                "input": list(shape[1:]),
                "batch": batch,
                "frequency": frequency,
                "plain_ms": 1e3 * _median([p for p, _ in pairs]),
                "wrapped_ms": 1e3 * _median([w for _, w in pairs]),
                "ratio": _median([w / p for p, w in pairs]),
                "warmup_s_plain": compile_plain,
                "warmup_s_wrapped": compile_wrapped,
            }
        )
    return rows


def _faster_lines(rows) -> list[str]:
    """Which backend trains each model faster (plain steps), and by how much."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["backend"]: r for r in rows if r["model"] == model}
        if len(by) < 2:
            continue
        (fast, f), (slow, s) = sorted(by.items(), key=lambda kv: kv[1]["plain_ms"])[:2]
        out.append(
            f"{model}: {fast} is {s['plain_ms'] / f['plain_ms']:.2f}x faster than {slow} "
            f"(plain step {f['plain_ms']:.1f} vs {s['plain_ms']:.1f} ms; wrapped "
            f"{f['wrapped_ms']:.1f} vs {s['wrapped_ms']:.1f} ms)"
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="cnn,mobilenetv2")
    p.add_argument("--backends", default=",".join(BACKENDS), help="tensorflow,jax")
    p.add_argument("--steps", type=int, default=8, help="timed step pairs per model (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=96, help="MobileNetV2 input (96..224)")
    p.add_argument("--frequency", type=int, default=100, help="mask update every N steps")
    p.add_argument("--timeout", type=int, default=900, help="seconds per backend subprocess")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in MODELS] + [
        b for b in a.backends.split(",") if b not in BACKENDS
    ]
    if bad or a.steps < 1 or a.batch < 1 or a.warmup < 1 or a.image_size < 32:
        p.error(f"unknown model/backend {bad}, or steps/batch/warmup < 1, or image size < 32")
    if a._child:
        rows = _measure(models, a.steps, a.warmup, a.batch, a.frequency, a.image_size)
        print(json.dumps(rows))
        return 0
    rows = []
    for backend in a.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, __file__, "--_child", "--models", ",".join(models)]
        cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch)]
        cmd += ["--frequency", str(a.frequency), "--image-size", str(a.image_size)]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(f"{backend}: no result within --timeout {a.timeout} s", file=sys.stderr)
            return 1
        if r.returncode:
            print(f"{backend}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows += json.loads(r.stdout.strip().splitlines()[-1])
    print(f"mask update every {a.frequency} steps; medians of {a.steps} alternating step pairs")
    print(
        f"{'backend':<11} {'model':<12} {'input':<10} {'batch':>5} {'plain ms':>9} "
        f"{'wrapped ms':>10} ratio"
    )
    for r in rows:
        size = "x".join(map(str, r["input"]))
        print(
            f"{r['backend']:<11} {r['model']:<12} {size:<10} {r['batch']:>5} "
            f"{r['plain_ms']:>9.2f} {r['wrapped_ms']:>10.2f} {r['ratio']:.3f}"
            f"{'' if r['ratio'] <= 1.10 else '  > 1.10'}"
        )
    for line in _faster_lines(rows):
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
