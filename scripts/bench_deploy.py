"""Deployment benchmark: what each saving weighs in the deployed file; what distillation recovers.

On the pipeline's digits CNN (`keras_lean.pipeline.models.build_model("cnn")`, digits split as
`keras-lean` splits them), per seed:

1. Baseline: trained; its float `.tflite` is the reference of every size ratio below.
2. Magnitude pruning (`--sparsity`, default 80 %) during fine-tuning, stripped, exported as int8
   TFLite twice: dense format (zeros stored) and sparse storage
   (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY` + DEFAULT). Prints raw and gzip ratios vs the float
   baseline's file (targets: raw >= 5x, gzip >= 10.2x, TFMOT's figure), the int8 accuracy vs the
   float pruned model (target: within 0.5 point), that the sparse file computes exactly what the
   dense-format file does, and how far the sparse format's index arrays are from the entropy
   bound (n * H(density) bits for the positions). For gzip distribution, the smaller gzip of the
   two layouts with its tensor names stripped (`strip_tflite_names`: not needed at run time,
   outputs checked identical), against the float baseline's gzip as converted and stripped the
   same way (like for like), and the int8 weights' gzip against their order-0 entropy.
3. Structured pruning (`--ratio`, default 70 % of the channels, L1, one-shot) fine-tuned
   (`--structured-epochs`, default 20, Adam `--structured-lr`, default 1e-3; 10 epochs at 5e-4
   left seed 1 2.2 points short) twice, on the labels alone and distilled from the baseline
   (`keras_lean.distill`, `--alpha`, `--temperature`; the teacher is the baseline itself).
   Prints the accuracy each reaches, the share of the lost accuracy distillation recovers
   (target >= 1/2), and for the distilled model as int8 TFLite: raw size ratio vs the float
   baseline's file (target >= 20x), latency at batch 1 and 32 against the float baseline's
   `.tflite` (target: faster at both), accuracy vs the baseline (target: within 1 point). Also
   the Keras-native int8 `.keras` (`Model.quantize`) of the same model.
4. Distillation sweep (`--sweep RATIO:EPOCHS,...`, default 70 %/2, 80 %/2, 90 %/3: settings
   where labels alone lose accuracy; `--sweep-distill ALPHA:T[:HIDDEN],...`, default 0.5:1 and
   0.5:4; HIDDEN > 0 adds the hidden-state term on every layer, narrowed ones compared with the
   teacher's channels they kept, `keras_lean.distill_features`):
   labels alone vs distilled, same start, epochs and learning rate, per seed. With
   `--sweep-transfer 'none;mixup=0.4;noise=0.1;shift=1'` each transfer set
   (`keras_lean.distill_transfer.TransferConfig`) adds two arms on the same perturbed batches:
   labels alone on them (what the augmentation alone gives) and distilled on them (the teacher
   run on the perturbed batch); shares are of the loss of labels alone on clean inputs.
   `--distill-only` runs just the baselines and this sweep (about 1.5 minutes a seed for the
   three default settings and three transfer sets x two distillation settings).

Timings are medians of `--runs` calls after a warm-up, on a shared machine: read them as rough.

Distillation defaults to alpha 0.5, temperature 1 (`keras_lean.distill` says why); the labels-only
student is also exported as int8, so the 20x / 1 pt target is read for both.

Run: `python scripts/bench_deploy.py` (defaults: seeds 0 1, 20 baseline epochs, 10 magnitude
fine-tune epochs, 20 structured; about 3 minutes a seed on 2 idle CPU cores); `--quick` for a
smoke run (one seed, fewer epochs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_lean.distill import DistillConfig, TransferConfig, TransferData, distill_fit  # noqa: E402
from keras_lean.export import (  # noqa: E402
    TFLiteRunner,
    compare_outputs,
    convert_to_tflite,
    file_sizes,
    measure_latency_ms,
    quantize_keras,
    quantize_keras_artifact,
    sparse_storage,
    strip_tflite_names,
)
from keras_lean.pipeline.data import load_data  # noqa: E402
from keras_lean.pipeline.models import build_model  # noqa: E402
from keras_lean.sparsity import prune_low_magnitude, strip_pruning  # noqa: E402
from keras_lean.sparsity.schedules import PolynomialDecay  # noqa: E402
from keras_lean.structured import prune_structured  # noqa: E402

TFMOT_GZIP_RATIO = 10.2  # TFMOT's own prune + int8 flow on this task (issue 16)


def _compile(model: keras.Model, lr: float) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def _accuracy(fn, x, y) -> float:
    out = fn.predict(x, verbose=0) if hasattr(fn, "predict") else fn(x)
    return float(np.mean(np.asarray(out).argmax(-1) == y))


def _tflite(model, path, quantization, calib, sparse=False):
    return convert_to_tflite(
        model, path, quantization=quantization, calibration_x=calib, sparse=sparse
    )


def _latency(path, x, runs: int) -> dict[int, float]:
    runner = TFLiteRunner(path)
    return {b: measure_latency_ms(runner, np.resize(x, (b, *x.shape[1:])), runs) for b in (1, 32)}


def int8_weight_entropy(path) -> tuple[float, int]:
    """(order-0 entropy bytes, gzip bytes) of a dense-format file's int8 weight buffers.

    The entropy is `n * H(p)` over each tensor's int8 value histogram (zeros included), the
    fewest bytes any code that treats weights as independent symbols needs. gzip's Huffman
    codes spend at least 1 bit on every literal, where a zero among 80 % zeros carries
    -log2(0.8) = 0.32 bits; its LZ77 matches win part of that back on runs of zeros only.
    """
    import gzip

    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    bound, packed = 0.0, 0
    for t in model.subgraphs[0].tensors:
        data = model.buffers[t.buffer].data
        if data is None or int(t.type) != 9:  # 9: INT8
            continue
        a = np.frombuffer(bytes(data), np.int8).astype(int) + 128
        p = np.bincount(a, minlength=256) / a.size
        p = p[p > 0]
        bound += a.size * float(-(p * np.log2(p)).sum()) / 8
        packed += len(gzip.compress(bytes(data), 9, mtime=0))
    return bound, packed


def magnitude(base, d, out, seed, args, ref_raw, ref_gz) -> dict:
    keras.utils.set_random_seed(seed)
    steps = int(np.ceil(len(d.x_train) / 32)) * args.finetune_epochs
    end = max(10, int(steps * 0.6) // 10 * 10)
    schedule = PolynomialDecay(0.0, args.sparsity, begin_step=0, end_step=end, frequency=10)
    masked = _compile(prune_low_magnitude(base, schedule), 5e-4)
    masked.fit(d.x_train, d.y_train, batch_size=32, epochs=args.finetune_epochs, verbose=0)
    pruned = strip_pruning(masked)
    calib = d.x_train[:200]
    dense = _tflite(pruned, out / f"mag{seed}_int8_dense.tflite", "int8", calib)
    sparse = _tflite(pruned, out / f"mag{seed}_int8_sparse.tflite", "int8", calib, sparse=True)
    vs_dense = compare_outputs(TFLiteRunner(dense), TFLiteRunner(sparse), d.x_val, d.y_val)
    storage = sparse_storage(sparse)
    (d_raw, d_gz), (s_raw, s_gz) = file_sizes(dense), file_sizes(sparse)
    # For gzip distribution: the smaller gzip of the two layouts, with the tensor names (not
    # needed at run time) stripped; checked to compute exactly what the converted file does.
    best = dense if d_gz <= s_gz else sparse
    stripped = strip_tflite_names(best, out / f"{best.stem}_stripped.tflite")
    vs_stripped = compare_outputs(TFLiteRunner(best), TFLiteRunner(stripped), d.x_val, d.y_val)
    float_acc = _accuracy(pruned, d.x_val, d.y_val)
    return {
        "float_acc": float_acc,
        "int8_acc": vs_dense.candidate_accuracy,
        "dense_raw_ratio": ref_raw / d_raw,
        "sparse_raw_ratio": ref_raw / s_raw,
        "dense_gzip_ratio": ref_gz / d_gz,
        "sparse_gzip_ratio": ref_gz / s_gz,
        "sparse_vs_dense": vs_dense.max_abs_diff,
        "storage": storage,
        "sizes": (d_raw, d_gz, s_raw, s_gz),
        "stripped": (best.stem.rsplit("_", 1)[-1], *file_sizes(stripped)),
        "stripped_ratio": ref_gz / file_sizes(stripped)[1],
        "stripped_vs_converted": vs_stripped.max_abs_diff,
        "gzip_vs_entropy": int8_weight_entropy(dense),
        "latency_dense": _latency(dense, d.x_val, args.runs),
        "latency_sparse": _latency(sparse, d.x_val, args.runs),
    }


def _labels_only(base, d, seed, ratio, epochs, lr) -> keras.Model:
    """Structured one-shot prune of `base`, fine-tuned on the labels."""
    pruned = prune_structured(base, ratio, "l1")
    keras.utils.set_random_seed(seed)
    plain = _compile(keras.models.clone_model(pruned), lr)
    plain.set_weights(pruned.get_weights())
    plain.fit(d.x_train, d.y_train, batch_size=32, epochs=epochs, verbose=0)
    return plain


def _labels_augmented(base, d, seed, ratio, epochs, lr, transfer) -> keras.Model:
    """`_labels_only` on the transfer set's perturbed batches (the same as `_distilled` sees
    with `transfer`): what the augmentation alone gives, without the teacher."""
    pruned = prune_structured(base, ratio, "l1")
    keras.utils.set_random_seed(seed)
    plain = _compile(keras.models.clone_model(pruned), lr)
    plain.set_weights(pruned.get_weights())
    data = TransferData(
        d.x_train, d.y_train, config=transfer, batch_size=32, epochs=epochs, seed=seed
    )
    plain.fit(data, epochs=epochs, steps_per_epoch=data.steps_per_epoch, shuffle=False, verbose=0)
    return plain


def _distilled(base, d, seed, ratio, epochs, lr, cfg) -> keras.Model:
    """The same start and schedule as `_labels_only`, distilled from `base` (the baseline); with
    `cfg.transfer`, on the same perturbed batches as `_labels_augmented`."""
    student = prune_structured(base, ratio, "l1")
    keras.utils.set_random_seed(seed)
    distill_fit(
        student,
        base,
        d.x_train,
        d.y_train,
        config=cfg,
        optimizer=keras.optimizers.Adam(lr),
        epochs=epochs,
        batch_size=32,
        verbose=0,
        transfer_seed=seed,
    )
    return student


def _transfer_name(t: TransferConfig | None) -> str:
    if t is None or not t.enabled:
        return "none"
    return ",".join(f"{k}={getattr(t, k):g}" for k in ("shift", "noise", "mixup") if getattr(t, k))


def distill_sweep(base, d, seed, args) -> list[tuple]:
    """Labels alone vs distilled at settings where labels alone lose accuracy (short fine-tunes,
    high ratios), for each transfer set (`none`: the clean training inputs): rows of (ratio,
    epochs, transfer, alpha, T, one-shot, labels alone, labels alone on the transfer set,
    distilled) accuracies."""
    rows = []
    for ratio, epochs in args.sweep:
        one_shot = _accuracy(prune_structured(base, ratio, "l1"), d.x_val, d.y_val)
        plain = _accuracy(_labels_only(base, d, seed, ratio, epochs, args.structured_lr),
                          d.x_val, d.y_val)  # fmt: skip
        for transfer in args.sweep_transfer:
            aug = plain
            if transfer is not None:
                aug_model = _labels_augmented(
                    base, d, seed, ratio, epochs, args.structured_lr, transfer
                )
                aug = _accuracy(aug_model, d.x_val, d.y_val)
            for alpha, temperature, hidden in args.sweep_distill:
                cfg = DistillConfig(alpha=alpha, temperature=temperature, transfer=transfer,
                                    hidden=hidden)  # fmt: skip
                student = _distilled(base, d, seed, ratio, epochs, args.structured_lr, cfg)
                acc = _accuracy(student, d.x_val, d.y_val)
                rows.append((ratio, epochs, _transfer_name(transfer), alpha, temperature, hidden,
                             one_shot, plain, aug, acc))  # fmt: skip
    return rows


def structured(base, d, out, seed, args, ref_raw, ref_latency) -> dict:
    cfg = DistillConfig(alpha=args.alpha, temperature=args.temperature)
    pruned = prune_structured(base, args.ratio, "l1")
    acc_oneshot = _accuracy(pruned, d.x_val, d.y_val)
    plain = _labels_only(base, d, seed, args.ratio, args.structured_epochs, args.structured_lr)
    student = _distilled(base, d, seed, args.ratio, args.structured_epochs, args.structured_lr, cfg)
    path = _tflite(student, out / f"struct{seed}_int8.tflite", "int8", d.x_train[:200])
    plain_path = _tflite(plain, out / f"struct{seed}_plain_int8.tflite", "int8", d.x_train[:200])
    lat = _latency(path, d.x_val, args.runs)
    kq = quantize_keras_artifact(
        student, out / f"struct{seed}_int8.keras", "int8", check_x=d.x_val, check_y=d.y_val
    )
    return {
        "acc_oneshot": acc_oneshot,
        "acc_plain": _accuracy(plain, d.x_val, d.y_val),
        "acc_distilled": _accuracy(student, d.x_val, d.y_val),
        "acc_int8": _accuracy(TFLiteRunner(path), d.x_val, d.y_val),
        "acc_plain_int8": _accuracy(TFLiteRunner(plain_path), d.x_val, d.y_val),
        "raw_ratio": ref_raw / file_sizes(path)[0],
        "speedup": {b: ref_latency[b] / lat[b] for b in lat},
        "latency": lat,
        "keras_int8": kq,
    }


def run_seed(seed: int, args, d, out) -> tuple[dict, dict, dict]:
    keras.utils.set_random_seed(seed)
    base = _compile(build_model("cnn", d.x_train.shape[1:], d.num_classes), 1e-3)
    base.fit(d.x_train, d.y_train, batch_size=32, epochs=args.epochs, verbose=0)
    ref = _tflite(base, out / f"base{seed}.tflite", "none", None)
    ref_raw, ref_gz = file_sizes(ref)
    ref_latency = _latency(ref, d.x_val, args.runs)
    b = {
        "acc": _accuracy(base, d.x_val, d.y_val),
        "raw": ref_raw,
        "gz": ref_gz,
        "stripped_gz": file_sizes(strip_tflite_names(ref, out / f"base{seed}_stripped.tflite"))[1],
        "latency": ref_latency,
    }
    m = magnitude(base, d, out, seed, args, ref_raw, ref_gz)
    s = structured(base, d, out, seed, args, ref_raw, ref_latency)
    s["sweep"] = distill_sweep(base, d, seed, args) if args.sweep else []
    return b, m, s


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


def report(seed: int, b: dict, m: dict, s: dict, args) -> dict:
    st = m["storage"]
    print(f"\n== seed {seed}: baseline accuracy {b['acc']:.4f}, float .tflite {b['raw']:,} B raw")
    lat = b["latency"]
    print(f"   ({b['gz']:,} B gzip), latency b1 {lat[1]:.3f} ms b32 {lat[32]:.3f} ms")
    d_raw, d_gz, s_raw, s_gz = m["sizes"]
    drop = 100 * (m["float_acc"] - m["int8_acc"])
    print(f"-- magnitude {args.sparsity:.0%} + int8 (float pruned accuracy {m['float_acc']:.4f})")
    print(
        f"   dense format : {d_raw:>8,} B raw ({m['dense_raw_ratio']:.2f}x)  "
        f"{d_gz:>8,} B gzip ({m['dense_gzip_ratio']:.2f}x)"
    )
    print(
        f"   sparse format: {s_raw:>8,} B raw ({m['sparse_raw_ratio']:.2f}x, target >= 5x: "
        f"{_ok(m['sparse_raw_ratio'] >= 5)})  {s_gz:>8,} B gzip ({m['sparse_gzip_ratio']:.2f}x)"
    )
    best_gz = max(m["dense_gzip_ratio"], m["sparse_gzip_ratio"])
    print(
        f"   as converted: best gzip ratio {best_gz:.2f}x (TFMOT {TFMOT_GZIP_RATIO}x: "
        f"{_ok(best_gz >= TFMOT_GZIP_RATIO)}); int8 accuracy {m['int8_acc']:.4f}, "
        f"{drop:+.2f} pt vs float pruned (target <= 0.5: {_ok(drop <= 0.5)})"
    )
    print(f"   sparse vs dense-format outputs: max |diff| {m['sparse_vs_dense']:.3g}")
    layout, t_raw, t_gz = m["stripped"]
    like = b["stripped_gz"] / t_gz
    print(
        f"   gzip artifact ({layout} format, smaller gzip; tensor names stripped, outputs "
        f"max |diff| {m['stripped_vs_converted']:.3g}): {t_raw:,} B raw, {t_gz:,} B gzip: "
        f"{m['stripped_ratio']:.2f}x the float baseline's gzip, {like:.2f}x its stripped gzip "
        f"({b['stripped_gz']:,} B) (TFMOT {TFMOT_GZIP_RATIO}x, like for like: "
        f"{_ok(like >= TFMOT_GZIP_RATIO)})"
    )
    bound, packed = m["gzip_vs_entropy"]
    print(
        f"   int8 weights in the dense file: gzip {packed:,} B vs order-0 entropy {bound:,.0f} B "
        f"({packed / bound:.2f}x): gzip codes each zero in >= 1 bit where it carries 0.32"
    )
    print(
        f"   sparse tensors: values {st.values_bytes:,} B + index {st.index_bytes:,} B; position "
        f"entropy bound {st.position_entropy_bytes:,.0f} B -> index overhead "
        f"{st.index_overhead_bytes:,.0f} B ({st.index_bytes / st.position_entropy_bytes:.2f}x "
        f"the bound); values+bound {st.entropy_bound_bytes:,.0f} B vs stored "
        f"{st.values_bytes + st.index_bytes:,} B"
    )
    ld, ls = m["latency_dense"], m["latency_sparse"]
    print(
        f"   latency dense/sparse b1 {ld[1]:.3f}/{ls[1]:.3f} ms, b32 {ld[32]:.3f}/{ls[32]:.3f} ms;"
        f" {st.densify_ops} DENSIFY ops: the runtime expands the weights at load (no speed-up)"
    )
    lost = s["acc_oneshot"], b["acc"] - s["acc_plain"], b["acc"] - s["acc_distilled"]
    recovered = (s["acc_distilled"] - s["acc_plain"]) / lost[1] if lost[1] > 0 else float("nan")
    gain = 100 * (s["acc_distilled"] - s["acc_plain"])
    print(
        f"-- structured {args.ratio:.0%} (one-shot {lost[0]:.4f}), {args.structured_epochs} "
        f"epochs at lr {args.structured_lr:g}"
    )
    verdict = (
        f"recovered {recovered:.0%} of the loss (target >= 50 %: {_ok(recovered >= 0.5 - 1e-9)})"
        if lost[1] > 0
        else "labels alone lost nothing: nothing to recover"
    )
    print(
        f"   labels only {s['acc_plain']:.4f} ({0.0 - 100 * lost[1]:+.2f} pt)  distilled "
        f"{s['acc_distilled']:.4f} ({0.0 - 100 * lost[2]:+.2f} pt; {gain:+.2f} pt vs labels only)  "
        f"{verdict}"
    )
    drop = 100 * (b["acc"] - s["acc_int8"])
    plain_drop = 100 * (b["acc"] - s["acc_plain_int8"])
    print(
        f"   int8 .tflite: {s['raw_ratio']:.2f}x smaller raw (target >= 20x: "
        f"{_ok(s['raw_ratio'] >= 20)}), accuracy vs baseline (target within 1 pt): labels only "
        f"{s['acc_plain_int8']:.4f} ({0.0 - plain_drop:+.2f} pt: {_ok(plain_drop <= 1)}), "
        f"distilled {s['acc_int8']:.4f} ({0.0 - drop:+.2f} pt: {_ok(drop <= 1)})"
    )
    sp = s["speedup"]
    print(
        f"   latency b1 {s['latency'][1]:.3f} ms ({sp[1]:.2f}x faster), b32 "
        f"{s['latency'][32]:.3f} ms ({sp[32]:.2f}x faster) (target > 1x: "
        f"{_ok(sp[1] > 1 and sp[32] > 1)})"
    )
    kq = s["keras_int8"]
    print(
        f"   Keras-native int8 .keras: {kq.raw_bytes:,} B vs float {kq.float_raw_bytes:,} B "
        f"({kq.size_ratio:.2f}x), accuracy {kq.accuracy:.4f} vs {kq.float_accuracy:.4f}, "
        f"layers {', '.join(kq.quantized_layers)}"
    )
    return {
        "recovered": recovered,
        "gain_pt": gain,
        "lost_pt": 100 * lost[1],
        "sweep": report_sweep(b, s["sweep"]),
    }


def report_sweep(b: dict, rows: list[tuple]) -> list[tuple]:
    """Prints the sweep rows; returns (ratio, epochs, transfer, alpha, T, hidden, lost, aug
    gain, distilled gain, share recovered, share recovered by the augmentation alone) per row."""
    sweep = []
    for row in rows:
        ratio, epochs, transfer, alpha, temperature, hidden, one_shot, plain, aug, distilled = row
        lost_pt, gain_pt = 100 * (b["acc"] - plain), 100 * (distilled - plain)
        aug_pt = 100 * (aug - plain)
        share = gain_pt / lost_pt if lost_pt > 0 else float("nan")
        aug_share = aug_pt / lost_pt if lost_pt > 0 else float("nan")
        sweep.append((ratio, epochs, transfer, alpha, temperature, hidden, lost_pt, aug_pt,
                      gain_pt, share, aug_share))  # fmt: skip
        print(
            f"   sweep: structured {ratio:.0%}, {epochs} epochs (one-shot {one_shot:.4f}), "
            f"transfer {transfer}: labels {0.0 - lost_pt:+.2f} pt, labels on the transfer set "
            f"{100 * (aug - b['acc']):+.2f} pt, distilled (alpha {alpha:g}, T {temperature:g}, "
            f"hidden {hidden:g}) "
            f"{100 * (distilled - b['acc']):+.2f} pt: "
            + (
                f"recovered {share:.0%} (augmentation alone {aug_share:.0%}; target >= 50 %: "
                f"{_ok(share >= 0.5 - 1e-9)})"
                if lost_pt > 0
                else "labels alone lost nothing"
            )
        )
    return sweep


def minilm(args, out) -> None:
    """MiniLM (all-MiniLM-L6-v2, the task of `bench_lora_minilm.py`) float vs Keras-native int8:
    `.keras` size, validation accuracy, Keras latency at batch 1 and 32."""
    import importlib.util
    from pathlib import Path

    import keras_hub

    spec = importlib.util.spec_from_file_location(
        "bench_lora_minilm", Path(__file__).with_name("bench_lora_minilm.py")
    )
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    directory = lm.model_dir()
    ((x_train, y_train), (x_val, y_val)), _ = lm.tokenized_task(args.minilm_train, 200, 0, 16)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone.from_preset(str(directory))
    model = keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(5e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=16, epochs=args.minilm_epochs, verbose=0)
    kq = quantize_keras_artifact(model, out / "minilm_int8.keras", "int8", check_x=x_val,
                                 check_y=y_val)  # fmt: skip
    int8 = quantize_keras(model, "int8")  # in memory: Keras may not read the file back

    def latency(m):
        return {
            b: measure_latency_ms(
                m.predict_on_batch, {k: np.resize(v, (b, v.shape[1])) for k, v in x_val.items()},
                args.runs,
            )
            for b in (1, 32)
        }  # fmt: skip

    lf, lq = latency(model), latency(int8)
    print(
        f"\n== MiniLM (all-MiniLM-L6-v2), {args.minilm_train} sentences x {args.minilm_epochs} "
        f"epochs, 200 val; Keras-native int8 ({len(kq.quantized_layers)} layers quantized)"
    )
    print(
        f"   float .keras {kq.float_raw_bytes:,} B, accuracy {kq.float_accuracy:.4f}, latency "
        f"b1 {lf[1]:.2f} ms b32 {lf[32]:.2f} ms"
    )
    print(
        f"   int8  .keras {kq.raw_bytes:,} B ({kq.size_ratio:.2f}x smaller), accuracy "
        f"{kq.accuracy:.4f} ({100 * kq.accuracy_delta:+.2f} pt), latency b1 {lq[1]:.2f} ms "
        f"({lf[1] / lq[1]:.2f}x) b32 {lq[32]:.2f} ms ({lf[32] / lq[32]:.2f}x); max |diff| "
        f"{kq.max_abs_diff:.3g}"
    )
    if not kq.reloadable:
        print(f"   note: {kq.note}")


def _pairs(first, second):
    """argparse type: 'a:b,c:d' -> [(first(a), second(b)), (first(c), second(d))]."""

    def parse(text: str) -> list[tuple]:
        pairs = []
        for item in filter(None, text.split(",")):
            a, sep, b = item.partition(":")
            if not sep:
                raise argparse.ArgumentTypeError(f"expected A:B pairs. Received: {item!r}")
            pairs.append((first(a), second(b)))
        return pairs

    return parse


def _distill_settings(text: str) -> list[tuple[float, float, float]]:
    """argparse type: 'a:t,a:t:h' -> [(a, t, 0.0), (a, t, h)] (alpha, temperature, hidden)."""
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise argparse.ArgumentTypeError(f"expected ALPHA:T[:HIDDEN]. Received: {item!r}")
        try:
            values = [float(v) for v in parts]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a number in {item!r}") from e
        out.append((values[0], values[1], values[2] if len(values) == 3 else 0.0))
    return out


def _transfers(text: str) -> list[TransferConfig | None]:
    """argparse type: 'none;shift=1;noise=0.1,mixup=0.4' -> [None, TransferConfig(...), ...]."""
    out: list[TransferConfig | None] = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        if item == "none":
            out.append(None)
            continue
        kwargs = {}
        for kv in item.split(","):
            key, sep, value = kv.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"expected KEY=VALUE. Received: {kv!r}")
            kwargs[key.strip()] = int(value) if key.strip() == "shift" else float(value)
        try:
            out.append(TransferConfig.from_dict(kwargs))
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs and runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=20, help="baseline epochs")
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.8, help="magnitude target")
    parser.add_argument("--ratio", type=float, default=0.7, help="structured channel ratio")
    parser.add_argument(
        "--structured-epochs", type=int, default=20, help="structured fine-tune epochs"
    )
    parser.add_argument("--structured-lr", type=float, default=1e-3)
    parser.add_argument(
        "--sweep",
        type=_pairs(float, int),
        default=[(0.7, 2), (0.8, 2), (0.9, 3)],
        help="RATIO:EPOCHS,... settings where labels alone lose accuracy, for the distillation "
        "sweep ('' to skip)",
    )
    parser.add_argument(
        "--sweep-distill",
        type=_distill_settings,
        default=[(0.5, 1.0, 0.0), (0.5, 4.0, 0.0)],
        help="ALPHA:T[:HIDDEN],... distillation settings of the sweep (HIDDEN: weight of the "
        "hidden-state term, keras_lean.distill_features; default 0)",
    )
    parser.add_argument(
        "--sweep-transfer",
        type=_transfers,
        default=[None],
        help="transfer sets of the sweep, ';'-separated, each 'none' or KEY=VALUE,... of "
        "keras_lean.distill_transfer.TransferConfig (e.g. 'none;shift=1;noise=0.1;mixup=0.4'); "
        "each also trains labels alone on the same perturbed batches",
    )
    parser.add_argument(
        "--distill-only", action="store_true", help="only the baseline and the distillation sweep"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation weight")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=50, help="timed calls per latency")
    parser.add_argument(
        "--minilm", action="store_true", help="only the MiniLM float vs Keras int8 row"
    )
    parser.add_argument("--minilm-train", type=int, default=256, help="MiniLM training sentences")
    parser.add_argument("--minilm-epochs", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.finetune_epochs, args.runs = args.seeds[:1], 8, 4, 20
        args.structured_epochs, args.sweep, args.sweep_distill = 4, [(0.8, 2)], [(0.5, 1.0, 0.0)]
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.minilm:
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            minilm(args, Path(tmp))
        return
    d = load_data("digits")
    if args.distill_only:
        print(f"digits: {len(d.x_train)} train / {len(d.x_val)} val samples; baseline "
              f"{args.epochs} epochs; seeds {args.seeds}; distillation sweep only")  # fmt: skip
        distill_only(args, d)
        return
    print(
        f"digits: {len(d.x_train)} train / {len(d.x_val)} val samples; baseline {args.epochs} "
        f"epochs, fine-tune {args.finetune_epochs} epochs; seeds {args.seeds}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from pathlib import Path

        for seed in args.seeds:
            b, m, s = run_seed(seed, args, d, Path(tmp))
            rows.append(report(seed, b, m, s, args))
    print(
        f"\ndistillation (alpha {args.alpha}, T {args.temperature}) per seed, paired with labels "
        "alone: "
        + "; ".join(
            f"seed {seed}: labels alone {0.0 - r['lost_pt']:+.2f} pt vs baseline, distilled "
            f"{r['gain_pt']:+.2f} pt vs labels alone"
            for seed, r in zip(args.seeds, rows, strict=True)
        )
    )
    if len(rows) > 1:
        gains = [r["gain_pt"] for r in rows]
        print(f"median distillation gain {statistics.median(gains):+.2f} pt")
    summarize_sweep([r["sweep"] for r in rows], args.seeds)


def _shares(values) -> str:
    return ", ".join("n/a" if v != v else f"{v:.0%}" for v in values)


def summarize_sweep(per_seed: list[list[tuple]], seeds: list[int]) -> None:
    """One line per sweep setting: per-seed losses, gains and shares recovered."""
    for i, (ratio, epochs, transfer, alpha, temperature, hidden, *_) in enumerate(
        per_seed[0] if per_seed else []
    ):
        rows = [sweep[i] for sweep in per_seed]
        print(
            f"sweep {ratio:.0%} / {epochs} epochs / transfer {transfer} / alpha {alpha:g} T "
            f"{temperature:g} hidden {hidden:g}: labels "
            + ", ".join(f"{0.0 - r[6]:+.2f}" for r in rows)
            + " pt; labels on the transfer set vs labels "
            + ", ".join(f"{r[7]:+.2f}" for r in rows)
            + " pt; distilled vs labels "
            + ", ".join(f"{r[8]:+.2f}" for r in rows)
            + " pt; share recovered "
            + _shares(r[9] for r in rows)
            + " (augmentation alone "
            + _shares(r[10] for r in rows)
            + f") (seeds {seeds})"
        )


def distill_only(args, d) -> None:
    """`--distill-only`: per seed, the baseline and the distillation sweep, nothing else."""
    per_seed = []
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        base = _compile(build_model("cnn", d.x_train.shape[1:], d.num_classes), 1e-3)
        base.fit(d.x_train, d.y_train, batch_size=32, epochs=args.epochs, verbose=0)
        b = {"acc": _accuracy(base, d.x_val, d.y_val)}
        print(f"\n== seed {seed}: baseline accuracy {b['acc']:.4f}")
        per_seed.append(report_sweep(b, distill_sweep(base, d, seed, args)))
    summarize_sweep(per_seed, args.seeds)


if __name__ == "__main__":
    main()
