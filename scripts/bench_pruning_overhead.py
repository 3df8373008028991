"""Time per training step: Keras 3 plain vs keras_lean-pruned, tf_keras plain vs TFMOT-pruned.

    python scripts/bench_pruning_overhead.py [--steps 60] [--batch 64] [--repeats 5]

The tf_keras/TFMOT half runs in a subprocess with TF_USE_LEGACY_KERAS=1 (the way TFMOT users run
it), so neither half pollutes the other. Each configuration is compiled, warmed up for one epoch
(tracing excluded), then timed over `--repeats` epochs of `--steps` steps; the minimum epoch time
per step is reported (least disturbed by other load on the machine), with the median alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _data(steps: int, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((steps * batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, steps * batch)
    return x, y


def _layers(lib):
    return [
        lib.layers.Conv2D(16, 3, activation="relu", name="conv1"),
        lib.layers.MaxPooling2D(name="pool1"),
        lib.layers.Conv2D(32, 3, activation="relu", name="conv2"),
        lib.layers.MaxPooling2D(name="pool2"),
        lib.layers.Flatten(name="flatten"),
        lib.layers.Dense(64, activation="relu", name="fc"),
        lib.layers.Dense(10, name="logits"),
    ]


def _time(model, lib, x, y, batch: int, steps: int, repeats: int, extra_callbacks=()):
    model.compile(
        optimizer=lib.optimizers.Adam(1e-3),
        loss=lib.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=list(extra_callbacks))
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=list(extra_callbacks))
        per_step.append((time.perf_counter() - start) / steps)
    return {"min_ms": 1e3 * min(per_step), "median_ms": 1e3 * statistics.median(per_step)}


def run_keras3(steps: int, batch: int, repeats: int) -> dict:
    import keras

    from keras_lean.sparsity import ConstantSparsity, prune_low_magnitude

    x, y = _data(steps, batch)
    keras.utils.set_random_seed(0)
    plain = keras.Sequential([keras.Input((28, 28, 1)), *_layers(keras)])
    pruned = prune_low_magnitude(plain, ConstantSparsity(0.5, begin_step=0, frequency=100))
    out = {}
    # interleave the two so slow phases of a shared machine hit both
    results = {"plain": [], "pruned": []}
    for _ in range(2):
        results["plain"].append(_time(plain, keras, x, y, batch, steps, repeats))
        results["pruned"].append(_time(pruned, keras, x, y, batch, steps, repeats))
    for key, runs in results.items():
        out[key] = {
            "min_ms": min(r["min_ms"] for r in runs),
            "median_ms": statistics.median(r["median_ms"] for r in runs),
        }
    return out


def run_legacy(steps: int, batch: int, repeats: int) -> dict:
    import tensorflow_model_optimization as tfmot
    import tf_keras

    x, y = _data(steps, batch)
    tf_keras.utils.set_random_seed(0)
    plain = tf_keras.Sequential([tf_keras.Input((28, 28, 1)), *_layers(tf_keras)])
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        plain,
        pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=100),
    )
    step_cb = [tfmot.sparsity.keras.UpdatePruningStep()]
    results = {"plain": [], "pruned": []}
    for _ in range(2):
        results["plain"].append(_time(plain, tf_keras, x, y, batch, steps, repeats))
        results["pruned"].append(_time(pruned, tf_keras, x, y, batch, steps, repeats, step_cb))
    return {
        key: {
            "min_ms": min(r["min_ms"] for r in runs),
            "median_ms": statistics.median(r["median_ms"] for r in runs),
        }
        for key, runs in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--legacy-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.legacy_child:
        print("JSON" + json.dumps(run_legacy(args.steps, args.batch, args.repeats)))
        return

    keras3 = run_keras3(args.steps, args.batch, args.repeats)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--legacy-child",
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--repeats",
            str(args.repeats),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        print(child.stderr[-3000:], file=sys.stderr)
        raise SystemExit("tf_keras/TFMOT half failed")
    legacy = json.loads([ln for ln in child.stdout.splitlines() if ln.startswith("JSON")][0][4:])

    rows = [
        ("Keras 3 plain", keras3["plain"]),
        ("Keras 3 + keras_lean", keras3["pruned"]),
        ("tf_keras plain", legacy["plain"]),
        ("tf_keras + TFMOT", legacy["pruned"]),
    ]
    print(
        f"small CNN 28x28x1, batch {args.batch}, {args.steps} steps/epoch, "
        f"{args.repeats} timed epochs x 2 rounds; ms per training step"
    )
    print(f"{'configuration':<24}{'min ms/step':>14}{'median ms/step':>16}")
    for name, r in rows:
        print(f"{name:<24}{r['min_ms']:>14.2f}{r['median_ms']:>16.2f}")
    ratio_lean = keras3["pruned"]["min_ms"] / keras3["plain"]["min_ms"]
    ratio_tfmot = legacy["pruned"]["min_ms"] / legacy["plain"]["min_ms"]
    ratio_lean_med = keras3["pruned"]["median_ms"] / keras3["plain"]["median_ms"]
    ratio_tfmot_med = legacy["pruned"]["median_ms"] / legacy["plain"]["median_ms"]
    print(
        f"keras_lean / Keras 3 plain : {ratio_lean:.3f} (median {ratio_lean_med:.3f}); "
        f"target <= 1.10: {'met' if ratio_lean <= 1.10 else 'NOT met'}"
    )
    print(f"TFMOT / tf_keras plain     : {ratio_tfmot:.3f} (median {ratio_tfmot_med:.3f})")


if __name__ == "__main__":
    main()
