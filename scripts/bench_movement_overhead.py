"""Time per training step of movement pruning vs magnitude pruning (issue 17: <= 1.15x).

    python scripts/bench_movement_overhead.py [--steps 60] [--batch 64] [--repeats 5] [--jit]

Same model, data and timing rule as `bench_pruning_overhead.py` (MNIST-sized CNN, Adam, one
warm-up epoch excluded, minimum epoch time per step over `--repeats`, median alongside); the
criteria are interleaved twice so slow phases of a shared machine hit all of them; CPU time
of the process per step (all threads) is shown too, less disturbed by other load. The
schedule prunes every 10 steps, so mask updates are part of the timed steps. Movement carries a
trainable score per pruned weight (its gradient and Adam state), magnitude a mask constraint.
"""

from __future__ import annotations

import argparse
import os
import statistics

CRITERIA = ("magnitude", "movement", "soft_movement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jit", action="store_true", help="compile with XLA (jit_compile)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from bench_pruning_overhead import _data, _layers

    from keras_lean.sparsity import PolynomialDecay, prune_low_magnitude

    x, y = _data(args.steps, args.batch)
    schedule = PolynomialDecay(0.0, 0.8, 0, 4 * args.steps, frequency=10)
    models = {}
    for criterion in CRITERIA:
        keras.utils.set_random_seed(0)
        plain = keras.Sequential([keras.Input((28, 28, 1)), *_layers(keras)])
        model = prune_low_magnitude(plain, schedule, criterion=criterion)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=args.jit,
        )
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)  # trace + warm up
        models[criterion] = model
    import time

    wall: dict[str, list[float]] = {c: [] for c in CRITERIA}
    cpu: dict[str, list[float]] = {c: [] for c in CRITERIA}
    for _ in range(2):
        for criterion, model in models.items():
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
                wall[criterion].append((time.perf_counter() - start) / args.steps)
                cpu[criterion].append((time.process_time() - start_cpu) / args.steps)
    base, base_cpu = min(wall["magnitude"]), min(cpu["magnitude"])
    print(
        f"{'criterion':<16}{'min ms/step':>12}{'median':>9}{'vs magnitude':>14}"
        f"{'CPU ms/step':>13}{'vs magnitude':>14}"
    )
    for criterion in CRITERIA:
        times, cpus = wall[criterion], cpu[criterion]
        print(
            f"{criterion:<16}{1e3 * min(times):>12.2f}{1e3 * statistics.median(times):>9.2f}"
            f"{min(times) / base:>13.2f}x{1e3 * min(cpus):>13.2f}{min(cpus) / base_cpu:>13.2f}x"
        )


if __name__ == "__main__":
    main()
