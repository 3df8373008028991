"""One-shot pruning of a small GPT-2-style decoder: perplexity dense vs magnitude, Wanda, SparseGPT.

No pre-trained decoder ships offline, so this builds one from a config (keras_hub GPT2Backbone +
GPT2CausalLM, byte-level: token = byte value, vocabulary 256) and trains it briefly on text that is
on every machine: the Python standard library's own source (`.py` files directly under
`os.path.dirname(os.__file__)`, sorted by name; the first files train, the next ones validate).

Then every Dense / EinsumDense projection of the decoder blocks is pruned one-shot
(`keras_lean.sparsity.prune_oneshot`, calibration: training sequences) at 50 % and 2:4, and the
held-out perplexity of each model is printed with the energy per training step of the dense model
and per evaluation step of each model (keras_lean.energy: RAPL where readable, else the CPU-time x
TDP estimate, labelled). The token embedding (tied LM head) and the LayerNorms stay dense, as in
the papers.

Last, recovery: the trained decoder's heads and feed-forward neurons are pruned by 25 %
(`prune_structured`, Taylor importance on calibration sequences, `--structured-ratio`) and LoRA
adapters (`--lora-rank`) are fine-tuned for `--recovery-steps`, against full fine-tuning of the
dense decoder for the same steps: perplexity after recovery and energy per training step of each
(the first steps, which trace the train function, are run before the measured window).

    python scripts/bench_causal_lm.py                       # small: a few minutes on 2 CPU cores
    python scripts/bench_causal_lm.py --steps 2000 --layers 4 --hidden 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np


def _stdlib_bytes(limit: int, skip: int = 0) -> bytes:
    root = Path(os.path.dirname(os.__file__))
    out, skipped = bytearray(), 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        if skipped < skip:
            skipped += len(data)
            continue
        out += data
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def _sequences(raw: bytes, length: int) -> np.ndarray:
    ids = np.frombuffer(raw, dtype=np.uint8).astype("int32")
    n = (len(ids) - 1) // length
    return ids[: n * length + 1], n


def _windows(raw: bytes, length: int):
    ids, n = _sequences(raw, length)
    x = np.stack([ids[i * length : (i + 1) * length] for i in range(n)])
    y = np.stack([ids[i * length + 1 : (i + 1) * length + 1] for i in range(n)])
    return x, y


def _inputs(x):
    return {"token_ids": x, "padding_mask": np.ones_like(x, dtype=bool)}


def _build(args):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=256,
        num_layers=args.layers,
        num_heads=args.heads,
        hidden_dim=args.hidden,
        intermediate_dim=4 * args.hidden,
        max_sequence_length=args.seq_len,
        dropout=0.0,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _fit_steps(model, x, y, steps: int, batch_size: int, tracker, name: str):
    """`steps` training steps of a compiled model in the tracker window `name` (2 warm-up steps
    first, outside it, so tracing is not counted); returns (J per step, seconds per step)."""
    steps_per_epoch = min(steps, max(1, len(x) // batch_size))
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    model.fit(_inputs(x), y, batch_size=batch_size, epochs=1, steps_per_epoch=2, verbose=0)
    t = time.perf_counter()
    with tracker.window(name):
        model.fit(
            _inputs(x),
            y,
            batch_size=batch_size,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            verbose=0,
        )
    done = epochs * steps_per_epoch
    return tracker.records[-1].energy_j / done, (time.perf_counter() - t) / done


def _recovery(args, model, x_train, y_train, tracker, evaluate) -> list[dict]:
    """Structured heads + FFN pruning + LoRA recovery vs dense full fine-tuning."""
    import keras

    from keras_lean.lowrank import apply_lora, merge_lora
    from keras_lean.structured import prune_structured

    backbone = model.backbone
    # The task's graph as a plain functional model (the tied LM head included).
    lm = keras.Model(backbone.input, backbone.token_embedding(backbone.output, reverse=True))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    calib = (_inputs(x_train[: args.calibration]), y_train[: args.calibration])
    t = time.perf_counter()
    pruned = prune_structured(lm, args.structured_ratio, importance="taylor", data=calib, loss=loss)
    prune_s = time.perf_counter() - t
    rows = [evaluate(f"heads+ffn {args.structured_ratio:.0%}", pruned, {"prune_s": prune_s})]
    lora = apply_lora(pruned, rank=args.lora_rank)
    lora.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
    j, s = _fit_steps(lora, x_train, y_train, args.recovery_steps, args.batch_size, tracker, "lora")
    extra = {"prune_s": prune_s, "train_j_per_step": j, "train_s_per_step": s}
    rows.append(evaluate(f"  + LoRA r{args.lora_rank}", merge_lora(lora), extra))
    # Dense full fine-tuning for the same steps (continues training `model`'s weights: last).
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
    j, s = _fit_steps(lm, x_train, y_train, args.recovery_steps, args.batch_size, tracker, "full")
    extra = {"prune_s": 0.0, "train_j_per_step": j, "train_s_per_step": s}
    rows.append(evaluate("dense full FT", lm, extra))
    small, dense = int(pruned.count_params()), int(lm.count_params())
    for r, params in zip(rows, (small, small, dense), strict=True):
        r["params"] = params
    return rows


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-bytes", type=int, default=400_000)
    p.add_argument("--val-bytes", type=int, default=60_000)
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--calibration", type=int, default=64, help="calibration sequences")
    p.add_argument("--structured-ratio", type=float, default=0.25, help="heads + FFN removed")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--recovery-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def main() -> None:
    args = _parse()
    import keras

    from keras_lean.energy import EnergyTracker
    from keras_lean.pipeline.text import causal_lm_perplexity
    from keras_lean.sparsity import prune_oneshot

    keras.utils.set_random_seed(args.seed)
    x_train, y_train = _windows(_stdlib_bytes(args.train_bytes), args.seq_len)
    x_val, y_val = _windows(_stdlib_bytes(args.val_bytes, skip=args.train_bytes), args.seq_len)
    model = _build(args)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    tracker = EnergyTracker(output_dir=None, run_name="bench_causal_lm")
    epochs = max(1, math.ceil(args.steps * args.batch_size / len(x_train)))
    steps_per_epoch = min(args.steps, math.ceil(len(x_train) / args.batch_size))
    t0 = time.perf_counter()
    with tracker.window("train"):
        model.fit(
            _inputs(x_train),
            y_train,
            batch_size=args.batch_size,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            verbose=0,
        )
    train_s = time.perf_counter() - t0
    train = tracker.records[-1]
    steps = epochs * steps_per_epoch
    eval_steps = math.ceil(len(x_val) / args.batch_size)

    def evaluate(name, m, extra):
        t = time.perf_counter()
        with tracker.window(f"eval/{name}"):
            ppl = causal_lm_perplexity(m, _inputs(x_val), y_val, batch_size=args.batch_size)
        rec = tracker.records[-1]
        row = {"model": name, "perplexity": ppl, "eval_s": time.perf_counter() - t}
        row["eval_j_per_step"] = rec.energy_j / eval_steps
        return {**row, **extra}

    rows = [evaluate("dense", model, {"sparsity": 0.0, "prune_s": 0.0})]
    calibration = _inputs(x_train[: args.calibration])
    blocks = ["transformer_layer_*"]
    for pattern, kwargs in (("50%", {"sparsity": 0.5}), ("2:4", {"sparsity_m_by_n": (2, 4)})):
        for method in ("magnitude", "wanda", "sparsegpt"):
            t = time.perf_counter()
            pruned, rep = prune_oneshot(
                model, calibration, method=method, filters=blocks, batch_size=16, **kwargs
            )
            extra = {"sparsity": rep.sparsity, "prune_s": time.perf_counter() - t}
            rows.append(evaluate(f"{method} {pattern}", pruned, extra))
    for r in rows:
        r["params"] = int(model.count_params())
    recovery = _recovery(args, model, x_train, y_train, tracker, evaluate)
    for r in recovery:
        r["sparsity"] = 1.0 - r["params"] / model.count_params()
    rows += recovery
    print(
        f"decoder: GPT2Backbone layers={args.layers} heads={args.heads} hidden={args.hidden} "
        f"seq={args.seq_len}, byte vocabulary; params {model.count_params():,}"
    )
    print(
        f"trained {steps} steps (batch {args.batch_size}) on {len(x_train)} stdlib sequences in "
        f"{train_s:.0f} s: {train.energy_j / steps:.2f} J/step ({train.method}); "
        f"validation: {len(x_val)} held-out sequences"
    )
    print(
        f"{'model':<16}{'sparsity':>9}{'ppl':>9}{'prune s':>9}{'eval J/step':>13}"
        f"{'train J/step':>14}"
    )
    for r in rows:
        train_j = r.get("train_j_per_step")
        print(
            f"{r['model']:<16}{r['sparsity']:>9.3f}{r['perplexity']:>9.3f}{r['prune_s']:>9.1f}"
            f"{r['eval_j_per_step']:>13.2f}" + (f"{train_j:>14.2f}" if train_j else "")
        )
    lora_row, full_row = recovery[1], recovery[2]
    print(
        f"recovery ({args.recovery_steps} steps): heads+ffn {args.structured_ratio:.0%} + LoRA "
        f"energy/step {lora_row['train_j_per_step'] / full_row['train_j_per_step']:.2f}x full "
        f"fine-tuning, perplexity {lora_row['perplexity']:.3f} vs {full_row['perplexity']:.3f}; "
        "sparsity column of these rows: the fraction of parameters removed"
    )
    if args.json:
        doc = {"args": vars(args) | {"json": str(args.json)}, "train_j_per_step": None}
        doc["train_j_per_step"] = train.energy_j / steps
        doc["energy_method"] = train.method
        doc["rows"] = rows
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
