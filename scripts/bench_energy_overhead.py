"""How much slower is a `fit` measured by EnergyTracker than an untracked one?

Alternates untracked and tracked fits of the same small model on the digits data (tracked: a new
EnergyTracker, one window around `fit`, the per-epoch callback, and energy.json / energy.csv
rewritten after every epoch), after one warm-up fit of each, and compares medians.

Three figures are reported:
- wall: the medians of wall time, the figure the 2 % budget is about;
- cpu: the medians of process CPU time (all threads, getrusage);
- self: time spent inside the tracker on the training thread (creating it, opening and closing
  every window, i.e. meter reads, TensorFlow syncs and file rewrites, and closing it), summed per
  fit, over the untracked median. On a shared machine the first two swing by tens of percent
  with other people's load; `self` does not, and bounds what the tracker adds to the training
  thread (background samplers excluded: the estimate and NVML counter have none).
`--metric` picks the one the verdict uses.

Usage:
    python scripts/bench_energy_overhead.py [--pairs 9] [--epochs 5] [--max-overhead 0.02]
                                            [--metric wall|cpu]

Exit codes: 0 if the overhead of the medians is within --max-overhead, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=9, help="untracked/tracked pairs")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-overhead", type=float, default=0.02)
    parser.add_argument("--metric", choices=("wall", "cpu", "self"), default="wall")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from sklearn.datasets import load_digits

    from keras_lean.energy import EnergyTracker
    from keras_lean.energy.meters import process_cpu_time_s

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    initial = model.get_weights()
    out = tempfile.mkdtemp(prefix="bench_energy_")
    methods: list[str] = []
    self_times: list[float] = []

    class TimedTracker(EnergyTracker):
        """EnergyTracker that adds up the time spent in its own window bookkeeping."""

        spent = 0.0

        def open_window(self, *a, **k):
            t = time.perf_counter()
            try:
                return super().open_window(*a, **k)
            finally:
                TimedTracker.spent += time.perf_counter() - t

        def close_window(self, *a, **k):
            t = time.perf_counter()
            try:
                return super().close_window(*a, **k)
            finally:
                TimedTracker.spent += time.perf_counter() - t

    def untracked() -> tuple[float, float]:
        model.set_weights(initial)
        c0, t0 = process_cpu_time_s(), time.perf_counter()
        model.fit(x, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0)
        return time.perf_counter() - t0, process_cpu_time_s() - c0

    def tracked() -> tuple[float, float]:
        model.set_weights(initial)
        c0, t0 = process_cpu_time_s(), time.perf_counter()
        TimedTracker.spent = 0.0
        tc = time.perf_counter()
        tracker = TimedTracker(out)
        TimedTracker.spent += time.perf_counter() - tc
        with tracker:
            with tracker.window("fit"):
                model.fit(
                    x,
                    y,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    verbose=0,
                    callbacks=[tracker.callback()],
                )
            tc = time.perf_counter()
        TimedTracker.spent += time.perf_counter() - tc  # tracker.close() on leaving the with
        elapsed = time.perf_counter() - t0, process_cpu_time_s() - c0
        self_times.append(TimedTracker.spent)
        methods[:] = [f"{m.device}={m.method}" for m in tracker.meters]
        return elapsed

    untracked()
    tracked()  # warm-up: tracing, first NVML / file set-up
    plain, measured = [], []
    for i in range(args.pairs):
        # Alternate which goes first so drifts in machine load hit both sides alike.
        order = (untracked, tracked) if i % 2 == 0 else (tracked, untracked)
        for fn in order:
            (plain if fn is untracked else measured).append(fn())
        print(
            f"pair {i + 1}: untracked {plain[-1][0]:.3f} s wall / {plain[-1][1]:.3f} s cpu   "
            f"tracked {measured[-1][0]:.3f} s wall / {measured[-1][1]:.3f} s cpu"
        )
    print(f"tracker meters: {', '.join(methods)}; records in {out}")
    print(f"{args.pairs} pairs, {args.epochs} epochs of {len(x)} samples, batch {args.batch_size}")
    overheads = {}
    for k, metric in enumerate(("wall", "cpu")):
        p = statistics.median(r[k] for r in plain)
        t = statistics.median(r[k] for r in measured)
        paired = statistics.median(b[k] / a[k] - 1.0 for a, b in zip(plain, measured, strict=True))
        overheads[metric] = t / p - 1.0
        print(
            f"{metric:>4}: median untracked {p:.3f} s, tracked {t:.3f} s -> overhead of medians "
            f"{overheads[metric] * 100:+.2f} %, median paired overhead {paired * 100:+.2f} %"
        )
    overheads["self"] = statistics.median(self_times) / statistics.median(r[0] for r in plain)
    print(
        f"self: median {statistics.median(self_times) * 1000:.1f} ms inside the tracker per fit "
        f"-> {overheads['self'] * 100:+.2f} % of the untracked median wall time"
    )
    ok = overheads[args.metric] <= args.max_overhead
    print(
        f"{'PASS' if ok else 'FAIL'} ({args.metric}): {overheads[args.metric] * 100:+.2f} % "
        f"against a limit of {args.max_overhead * 100:.1f} %"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
