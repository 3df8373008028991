"""The floor of progressive shrinking's saving: what one epoch costs at the final width.

`structured50-progressive` can cost no less than an epoch of the already-shrunk model, however
early its schedule ends and however cheap its shrinks are. This script measures that floor
directly: the network of `bench_energy_savings.py` (`--net digits|wide`, the same baseline
pre-training on half of the training split), one-shot `prune_structured` at each `--ratios`
(the l1 ranking the benchmark's arms use), then plain `model.fit` of the dense baseline and of
each pruned copy, `--epochs` epochs after one warm-up epoch (so no trace or compile is counted),
at each `--batch-sizes` and `--steps-per-execution`. Printed per configuration: CPU seconds per
epoch (process time, both cores), wall seconds per epoch, forward FLOPs per sample, and the
ratio pruned / dense of the CPU time and of the FLOPs.

Where the CPU-time ratio sits well above the FLOPs ratio, the step is paying a fixed cost
(Keras' per-step dispatch, TensorFlow's per-op overhead, the input pipeline) that no amount of
channel removal touches; a progressive run's energy ratio cannot fall below that CPU-time ratio
(its first segment runs at full width, and every shrink costs a retrace on top).

    python scripts/bench_step_floor.py                       # digits, batch 32 / 128 / 512
    python scripts/bench_step_floor.py --net wide --batch-sizes 32

The figures are measured, not targets; CPU time is what `estimated:cpu-tdp` energy scales with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
from bench_energy_savings import build_net, digits, generated  # noqa: E402

from keras_lean.flops import count_flops  # noqa: E402
from keras_lean.structured import prune_structured  # noqa: E402


def baseline(net: str, seed: int, base_epochs: int, batch_size: int):
    """The benchmark's baseline: `build_net(net)` trained on half of the training split."""
    data = generated(seed) if net == "wide" else digits(seed)
    (x, y), _ = data
    keras.utils.set_random_seed(seed)
    base = build_net(net)
    base.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    half = len(y) // 2
    base.fit(x[:half], y[:half], batch_size=batch_size, epochs=base_epochs, verbose=0)
    return base, x, y


def epoch_cost(model, x, y, batch_size: int, spe: int, epochs: int) -> tuple[float, float]:
    """(CPU s, wall s) per epoch of `fit` on a fresh copy of `model`, after a warm-up epoch."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.compile(
        keras.optimizers.Adam(3e-4), "sparse_categorical_crossentropy", steps_per_execution=spe
    )
    copy.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)  # traces, builds the slots
    cpu, wall = time.process_time(), time.perf_counter()
    copy.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
    return (time.process_time() - cpu) / epochs, (time.perf_counter() - wall) / epochs


def measure(args) -> list[dict]:
    base, x, y = baseline(args.net, args.seed, args.base_epochs, 32)
    models = {0.0: base}
    for ratio in args.ratios:
        models[ratio] = prune_structured(base, ratio, "l1")
    flops = {r: float(count_flops(m).total) for r, m in models.items()}
    rows = []
    for bs in args.batch_sizes:
        for spe in args.steps_per_execution:
            dense_cpu, dense_wall = epoch_cost(base, x, y, bs, spe, args.epochs)
            for ratio, model in models.items():
                if ratio == 0.0:
                    cpu, wall = dense_cpu, dense_wall
                else:
                    cpu, wall = epoch_cost(model, x, y, bs, spe, args.epochs)
                rows.append(
                    dict(
                        batch_size=bs,
                        steps_per_execution=spe,
                        ratio=ratio,
                        params=int(model.count_params()),
                        flops=flops[ratio],
                        cpu_s=cpu,
                        wall_s=wall,
                        cpu_vs_dense=cpu / dense_cpu,
                        flops_vs_dense=flops[ratio] / flops[0.0],
                    )
                )
                print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    name = "dense" if r["ratio"] == 0 else f"structured {100 * r['ratio']:.0f} %"
    return (
        f"batch {r['batch_size']:4d}  steps/execution {r['steps_per_execution']:3d}  "
        f"{name:15s} params {r['params']:8d}  FLOPs/sample {r['flops']:12.0f}  "
        f"CPU {1e3 * r['cpu_s']:7.1f} ms/epoch  wall {1e3 * r['wall_s']:7.1f} ms/epoch  "
        f"CPU vs dense {r['cpu_vs_dense']:.3f}  FLOPs vs dense {r['flops_vs_dense']:.3f}"
    )


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=("digits", "wide"), default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=6, help="timed epochs per configuration")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--steps-per-execution", type=int, nargs="+", default=[1])
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = _parse(argv)
    print(
        f"{args.net}: seed {args.seed}, {args.epochs} timed epochs after one warm-up, "
        "one-shot prune_structured(l1); plain model.fit on the training split",
        flush=True,
    )
    rows = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
