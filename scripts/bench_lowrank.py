"""SVD factorization of the digits CNN's Dense layers: parameters saved vs accuracy kept.

Trains a small CNN on scikit-learn's digits (the bundled default data set), then for several
settings (retained spectral energy, or a fixed rank) factorizes its Dense layers with
`keras_lean.lowrank.factorize`, measures validation accuracy right after factorization and after a
short fine-tune, and prints the Dense-layer parameters before/after. Target: >= 2x fewer
parameters in those layers for <= 1 point of accuracy lost after the fine-tune.

    python scripts/bench_lowrank.py                   # about 1-2 minutes on 2 CPU cores
    python scripts/bench_lowrank.py --energy 0.9 0.7 --rank 8 --finetune-epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def digits(seed: int = 0, n_val: int = 360):
    """Same split as the test suite's `digits` fixture: float32 (N, 8, 8, 1) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int32")
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def digits_cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def compile_model(model, lr):
    model.compile(
        keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )


def dense_params(model) -> int:
    """Parameters of the Dense layers, or of the LowRankDense layers that replaced them."""
    return sum(
        layer.count_params()
        for layer in model.layers
        if isinstance(layer, keras.layers.Dense) or type(layer).__name__ == "LowRankDense"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--energy", type=float, nargs="*", default=[0.95, 0.9, 0.8, 0.7])
    parser.add_argument("--rank", type=int, nargs="*", default=[32, 16])
    parser.add_argument("--epochs", type=int, default=20, help="baseline training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    from keras_lean.lowrank import factorize

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_val, y_val = digits(args.seed)
    base = digits_cnn()
    compile_model(base, 1e-3)
    t0 = time.perf_counter()
    base.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    base_acc = accuracy(base, x_val, y_val)
    base_dense = dense_params(base)
    print(
        f"baseline digits CNN: {base.count_params():,} params ({base_dense:,} in Dense layers), "
        f"val acc {100 * base_acc:.2f}% after {args.epochs} epochs "
        f"({time.perf_counter() - t0:.0f} s); fine-tune {args.finetune_epochs} epochs at lr 3e-4"
    )
    header = (
        f"{'setting':12s} {'ranks':>9s} {'Dense params':>17s} {'x fewer':>8s} "
        f"{'rel.err':>8s} {'acc before ft':>14s} {'acc after ft':>13s} {'drop':>7s}"
    )
    print(header)
    rows = []
    settings = [("energy", e) for e in args.energy] + [("rank", r) for r in args.rank]
    for kind, value in settings:
        if kind == "energy":  # every Dense layer, each at its own rank
            small, report = factorize(base, energy=value, filters="^(dense|logits)$")
        else:  # a fixed rank only fits the wide layer (logits has 10 outputs)
            small, report = factorize(base, rank=value, filters="^dense$")
        acc0 = accuracy(small, x_val, y_val)
        keras.utils.set_random_seed(args.seed)
        compile_model(small, 3e-4)
        small.fit(
            x_train, y_train, batch_size=args.batch_size, epochs=args.finetune_epochs, verbose=0
        )
        acc1 = accuracy(small, x_val, y_val)
        ranks = "/".join(str(e.rank) if e.factorized else "-" for e in report.layers)
        errors = max((e.relative_error for e in report.factorized), default=0.0)
        after = dense_params(small)
        ratio = base_dense / after
        drop = 100 * (base_acc - acc1)
        row = {
            "setting": f"{kind}={value}",
            "ranks": ranks,
            "dense_params_before": base_dense,
            "dense_params_after": after,
            "ratio": ratio,
            "max_relative_error": errors,
            "acc_before_finetune": acc0,
            "acc_after_finetune": acc1,
            "drop_points": drop,
            "meets_target": ratio >= 2 and drop <= 1,
            "layers": report.to_dict()["layers"],
        }
        rows.append(row)
        params = f"{base_dense:>8,d}->{after:<8,d}"
        print(
            f"{row['setting']:12s} {ranks:>9s} {params}"
            f" {ratio:>8.2f} {errors:>8.3f} {100 * acc0:>13.2f}% {100 * acc1:>12.2f}% "
            f"{drop:>+7.2f}{'  meets target' if row['meets_target'] else ''}"
        )
    print(
        "ranks: dense/logits for energy settings, dense only for fixed ranks; '-' = left alone "
        "(factoring would not save parameters); rel.err = largest ||W - UV|| / ||W|| factored"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"baseline_accuracy": base_acc, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
