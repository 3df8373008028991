"""Structured pruning benchmark: FLOPs removed vs. latency realized, and accuracy after fine-tuning.

Part 1 - two ResNet-style conv nets (three residual stages, batch norm, 32x32x3 inputs, random
weights: latency does not depend on the values): `narrow` (stage widths 32/64/128, 0.3 M params)
and `wide` (128/256/512, 4.9 M params). Each is pruned one-shot at ratios 0.3 / 0.5 / 0.7 of the
channels of every group (L1 importance), once with `round_to=1` (exact ratios) and once with
`round_to="auto"` (surviving widths rounded up to this CPU's float32 vector lanes, 16 with
AVX-512). For each it prints the surviving conv widths, the FLOPs ratio (pruned / base, from
`keras_lean.flops`) and, for Keras (a `tf.function` of the model call, the graph Keras' own
predict runs), Keras+XLA (the same with `jit_compile=True`) and TFLite (the SavedModel
converted, default XNNPACK delegate, 2 threads), at batch 1 and 32:

    latency ratio = t(pruned) / t(base)
    quotient      = (t(base) / t(pruned)) / (FLOPs(base) / FLOPs(pruned))
                  = speedup realized / FLOPs reduction   (target >= 0.8 at batch 32)

Timings interleave base and pruned models round by round and report medians; the spread column
is (max - min) / median of the base model's rounds, a noise gauge (the machine is shared). A
summary lists, per model and round_to, the batch-32 cells that meet the target.

What it shows on a 2-core AVX-512 VM: the quotient is a property of the surviving widths and the
runtime, not of the surgery (which removes exactly the FLOPs counted). Kernels compute output
channels in tiles of the vector width, so 22 channels cost what 32 do; rounding widths to the
lanes recovers the speed. Narrow layers also leave the Keras/XLA graph runtimes dominated by
per-op and element-wise costs that shrink with the width, not with its square.

Part 2 - the pipeline's built-in digits CNN (`keras_lean.pipeline.models.build_model("cnn")`) is
trained, then pruned gradually to 50 % of its channels during fine-tuning
(`prune_structured_gradually` + `shrink`), and also one-shot + fine-tune; prints the accuracy drop
(target <= 1 point) and the FLOPs ratio.

Run: `python scripts/bench_structured.py` (about 4 minutes on 2 CPU cores). `--quick` for a
smoke run with fewer repeats and epochs; `--part 1 --model wide --round-to 8 auto` picks the
part 1 cases; `--fold-batchnorm` times the deploy form (`keras_lean.export.fold_batchnorm`, what
`keras-lean deploy` exports), BatchNormalization folded into the convolutions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_lean.export import fold_batchnorm  # noqa: E402
from keras_lean.flops import count_flops  # noqa: E402
from keras_lean.structured import (  # noqa: E402
    prune_structured,
    prune_structured_gradually,
    resolve_round_to,
    shrink,
    structure_report,
)

L = keras.layers


def resnet_like(input_shape=(32, 32, 3), widths=(32, 64, 128), classes=10) -> keras.Model:
    """Three residual stages (two 3x3 convs + BatchNorm each, 1x1 projection when the shape
    changes), global average pooling and a Dense head."""
    inputs = keras.Input(input_shape, name="image")
    x = L.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.ReLU()(L.BatchNormalization(name="stem_bn")(x))
    for s, w in enumerate(widths):
        stride = 1 if s == 0 else 2
        shortcut = x
        y = L.Conv2D(w, 3, strides=stride, padding="same", use_bias=False, name=f"s{s}_c1")(x)
        y = L.ReLU()(L.BatchNormalization(name=f"s{s}_bn1")(y))
        y = L.Conv2D(w, 3, padding="same", use_bias=False, name=f"s{s}_c2")(y)
        y = L.BatchNormalization(name=f"s{s}_bn2")(y)
        if stride != 1 or shortcut.shape[-1] != w:
            shortcut = L.Conv2D(w, 1, strides=stride, use_bias=False, name=f"s{s}_proj")(x)
            shortcut = L.BatchNormalization(name=f"s{s}_proj_bn")(shortcut)
        x = L.ReLU()(L.Add(name=f"s{s}_add")([shortcut, y]))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(classes, name="logits")(x), name="resnet_like")


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights(
                [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()]
            )


def _tflite_runner(model, batch, threads=2):
    with tempfile.TemporaryDirectory() as d:
        model.export(d, format="tf_saved_model", verbose=False)
        content = tf.lite.TFLiteConverter.from_saved_model(d).convert()
    interp = tf.lite.Interpreter(model_content=content, num_threads=threads)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], (batch, *model.input_shape[1:]))
    interp.allocate_tensors()
    out_index = interp.get_output_details()[0]["index"]

    def run(x):
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out_index)

    return run


def _runners(model, batch):
    spec = tf.TensorSpec((batch, *model.input_shape[1:]), tf.float32)
    keras_fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    xla_fn = tf.function(
        lambda x: model(x, training=False), input_signature=[spec], jit_compile=True
    )
    return {
        "keras": lambda x: keras_fn(x).numpy(),
        "keras+xla": lambda x: xla_fn(x).numpy(),
        "tflite": _tflite_runner(model, batch),
    }


def _time_calls(fn, x, min_time):
    n, t = 0, 0.0
    start = time.perf_counter()
    while t < min_time or n < 3:
        fn(x)
        n += 1
        t = time.perf_counter() - start
    return t / n


def latency_table(models: dict, batch: int, rounds: int, min_time: float) -> dict:
    """{runtime: {model name: (median seconds per call, spread)}}, base and pruned interleaved."""
    x = np.random.default_rng(0).normal(size=(batch, *next(iter(models.values())).input_shape[1:]))
    x = x.astype("float32")
    runners = {name: _runners(m, batch) for name, m in models.items()}
    out = {}
    for runtime in ("keras", "keras+xla", "tflite"):
        samples = {name: [] for name in models}
        for name in models:  # warm-up (tracing, XLA compilation, delegate set-up)
            for _ in range(3):
                runners[name][runtime](x)
        for _ in range(rounds):
            for name in models:
                samples[name].append(_time_calls(runners[name][runtime], x, min_time))
        out[runtime] = {
            name: (statistics.median(s), (max(s) - min(s)) / statistics.median(s))
            for name, s in samples.items()
        }
    return out


MODELS = {  # name -> (input shape, stage widths)
    "narrow": ((32, 32, 3), (32, 64, 128)),
    "wide": ((32, 32, 3), (128, 256, 512)),
}
TARGET = 0.8


def part1(model_name: str, rounds: int, min_time: float, round_to, fold: bool = False) -> list:
    """Prints the tables for one model and round_to; returns the batch-32 (ratio, runtime, q)."""
    keras.utils.set_random_seed(0)
    input_shape, widths = MODELS[model_name]
    base = resnet_like(input_shape, widths)
    _randomize_bn(base)
    models = {"base": base}
    for r in (0.3, 0.5, 0.7):
        models[f"r{r}"] = prune_structured(base, r, "l1", round_to=round_to)
    if fold:  # the deployment form: BatchNormalization folded into the convolutions
        models = {name: fold_batchnorm(m)[0] for name, m in models.items()}
    flops = {name: count_flops(m).total for name, m in models.items()}
    f_base = flops["base"]
    lanes = f" ({resolve_round_to(round_to)} lanes)" if round_to == "auto" else ""
    print(
        f"\nPart 1: {model_name} resnet_like {'x'.join(map(str, input_shape))}, widths {widths}, "
        f"base {f_base / 1e6:.1f} MFLOPs/sample, {base.count_params():,} params, "
        f"round_to={round_to}{lanes}{', BatchNormalization folded' if fold else ''}"
    )
    for name, m in models.items():
        if name != "base":
            w = [layer.filters for layer in m.layers if isinstance(layer, L.Conv2D)]
            print(f"  {name[1:]}: conv widths {w}")
    results = []
    for batch in (1, 32):
        table = latency_table(models, batch, rounds, min_time)
        print(f"\nbatch {batch}")
        print(
            f"{'ratio':>6} {'FLOPs':>7} | {'runtime':<10} {'base ms':>8} {'spread':>7} "
            f"{'pruned ms':>9} {'lat.ratio':>9} {'quotient':>8}"
        )
        for name in models:
            if name == "base":
                continue
            fr = flops[name] / f_base
            for runtime, row in table.items():
                tb, spread = row["base"]
                tp, _ = row[name]
                quotient = (tb / tp) / (1 / fr)
                verdict = ""
                if batch == 32:
                    verdict = "  met" if quotient >= TARGET else "  missed"
                    results.append((name[1:], runtime, quotient))
                print(
                    f"{name[1:]:>6} {fr:7.3f} | {runtime:<10} {tb * 1e3:8.2f} {spread:7.1%} "
                    f"{tp * 1e3:9.2f} {tp / tb:9.3f} {quotient:8.2f}{verdict}"
                )
    return results


def part2(epochs: int, finetune_epochs: int):
    from sklearn.datasets import load_digits

    from keras_lean.pipeline.models import build_model
    from keras_lean.sparsity.schedules import PolynomialDecay

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int32")
    idx = np.random.default_rng(0).permutation(len(x))
    x, y = x[idx], y[idx]
    x_tr, y_tr, x_val, y_val = x[360:], y[360:], x[:360], y[:360]

    def compile_(m, lr):
        m.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return m

    keras.utils.set_random_seed(0)
    base = compile_(build_model("cnn", (8, 8, 1), 10), 1e-3)
    base.fit(x_tr, y_tr, batch_size=32, epochs=epochs, verbose=0)
    acc_base = base.evaluate(x_val, y_val, verbose=0)[1]
    steps = int(np.ceil(len(x_tr) / 32)) * finetune_epochs
    end = max(10, int(steps * 0.6) // 10 * 10)  # a pruning step, so the target is reached
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=end, frequency=10)
    masked = compile_(prune_structured_gradually(base, schedule, "l1"), 5e-4)
    masked.fit(x_tr, y_tr, batch_size=32, epochs=finetune_epochs, verbose=0)
    gradual = compile_(shrink(masked), 5e-4)
    acc_gradual = gradual.evaluate(x_val, y_val, verbose=0)[1]
    oneshot = compile_(prune_structured(base, 0.5, "l1"), 5e-4)
    acc_oneshot_0 = oneshot.evaluate(x_val, y_val, verbose=0)[1]
    oneshot.fit(x_tr, y_tr, batch_size=32, epochs=finetune_epochs, verbose=0)
    acc_oneshot = oneshot.evaluate(x_val, y_val, verbose=0)[1]
    rep = structure_report(base, gradual)
    print(
        f"\nPart 2: digits CNN (pipeline build_model('cnn')), {epochs} epochs baseline, "
        f"{finetune_epochs} epochs fine-tune, 50 % of channels removed"
    )
    print(f"  baseline accuracy            {acc_base:.4f}")
    drop = 100 * (acc_base - acc_gradual)
    print(f"  gradual + shrink             {acc_gradual:.4f}  drop {drop:+.2f} points")
    print(f"  one-shot (no fine-tune)      {acc_oneshot_0:.4f}")
    drop = 100 * (acc_base - acc_oneshot)
    print(f"  one-shot + fine-tune         {acc_oneshot:.4f}  drop {drop:+.2f} points")
    print(f"  FLOPs ratio {rep.flops_ratio:.3f}, params ratio {rep.params_ratio:.3f}")
    widths = {r.name: (r.width_before, r.width_after) for r in rep.layers if r.width_before}
    print(f"  widths {widths}")


def _round_to(text: str):
    return "auto" if text == "auto" else int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and epochs")
    parser.add_argument("--part", choices=("1", "2", "both"), default="both")
    parser.add_argument(
        "--model", choices=(*MODELS, "all"), default="all", help="part 1 conv net (default all)"
    )
    parser.add_argument(
        "--round-to",
        type=_round_to,
        nargs="+",
        default=[1, "auto"],
        help='part 1 round_to values: integers or "auto" (default: 1 auto)',
    )
    parser.add_argument(
        "--fold-batchnorm",
        action="store_true",
        help="part 1: fold BatchNormalization into the convolutions (the deploy form) first",
    )
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
    t0 = time.perf_counter()
    if args.part in ("1", "both"):
        summary = {}
        for model_name in MODELS if args.model == "all" else (args.model,):
            for round_to in args.round_to:
                summary[(model_name, round_to)] = part1(
                    model_name,
                    rounds=3 if args.quick else 7,
                    min_time=0.05 if args.quick else 0.25,
                    round_to=round_to,
                    fold=args.fold_batchnorm,
                )
        print(f"\nPart 1 summary: quotient at batch 32 (target >= {TARGET}); cells met / all")
        for (model_name, round_to), rows in summary.items():
            met = sum(q >= TARGET for _, _, q in rows)
            cells = "  ".join(f"{r}/{rt} {q:.2f}" for r, rt, q in rows)
            print(f"  {model_name:<7} round_to={str(round_to):<5} {met}/{len(rows)}: {cells}")
    if args.part in ("2", "both"):
        part2(epochs=3 if args.quick else 20, finetune_epochs=2 if args.quick else 10)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
