"""Text in the pipeline (keras_lean/pipeline/text.py): text files, a preset's tokenizer and
backbone as a classifier, the baseline step on text, causal-LM perplexity."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from keras_lean.pipeline.data import DataError
from keras_lean.pipeline.text import (
    build_text_classifier,
    causal_lm_perplexity,
    read_texts,
    tokenize,
)

keras_hub = pytest.importorskip("keras_hub")

from tests.pipeline._text_presets import save_tiny_bert_preset  # noqa: E402

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"good great fine bad awful poor movie plot".split(),
]
GOOD, BAD = "good great fine".split(), "bad awful poor".split()


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny BERT preset folder (backbone + tokenizer), built here, no download."""
    return save_tiny_bert_preset(tmp_path_factory.mktemp("preset"), VOCAB)


def _rows(n=80, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(GOOD if label else BAD, 2)) + ["movie"]
        rows.append({"text": " ".join(rng.permutation(words)), "label": label})
    return rows


@pytest.fixture
def text_csv(tmp_path):
    path = tmp_path / "texts.csv"
    lines = ["text,label"] + [f"{r['text']},{'pos' if r['label'] else 'neg'}" for r in _rows()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_csv_and_jsonl(tmp_path, text_csv):
    texts, labels = read_texts(text_csv)
    assert len(texts) == 80 and set(labels) == {"pos", "neg"}
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": r["text"]}) for r in _rows(4)) + "\n")
    texts, labels = read_texts(jsonl)
    assert len(texts) == 4 and labels is None


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("words,label\na,1\n", ".csv", r"needs a `text` column"),
        ("text,label\n ,1\n", ".csv", r"row 1 has an empty or non-string text"),
        ('{"text": "a"}\n{oops\n', ".jsonl", r"line 2 is not JSON"),
        ("text,label\na,\n", ".csv", r"row 1 has no label"),
    ],
    ids=["no-text-column", "empty-text", "bad-json", "no-label"],
)
def test_bad_text_files(tmp_path, content, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_texts(path)


def test_classifier_from_preset_saves_and_reloads(preset, tmp_path):
    ids = tokenize(preset, ["good movie", "awful plot poor"], 8)
    assert ids.shape == (2, 8) and ids[0, 0] == VOCAB.index("[CLS]") and ids[0, -1] == 0
    model = build_text_classifier(preset, 2, 8)
    logits = model(ids.astype("float32"))
    assert logits.shape == (2, 2)
    model.save(tmp_path / "m.keras")
    from keras_lean.pipeline.models import load_model

    again = load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again(ids.astype("float32")), logits, atol=1e-6)


def test_baseline_and_oneshot_on_text(preset, text_csv, tmp_path):
    from keras_lean.pipeline import configure, finetune, train_baseline
    from keras_lean.pipeline.rundir import RunDir

    run = RunDir(tmp_path / "run")
    b = train_baseline(
        run, data=text_csv, model_path=preset, sequence_length=8, epochs=8, batch_size=8, verbose=0
    )
    manifest = run.read_manifest()
    assert manifest["text"]["classes"] == ["neg", "pos"]
    assert manifest["text"]["sequence_length"] == 8
    assert manifest["input_shape"] == [8] and manifest["num_classes"] == 2
    assert b.entry["accuracy"] > 0.9  # the words decide the label (chance: 0.5)
    configure(run, methods=["oneshot"], epochs=1, jit_compile="off", force=True)
    ft = finetune(run, verbose=0)
    layers = ft.entry["details"]["methods"]["oneshot"]["oneshot"]["layers"]
    assert any(row["name"].startswith("transformer_layer_0/") for row in layers)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_path": None}, r"Text data .* needs --model PRESET_DIR"),
        ({"sequence_length": 1}, r"sequence_length must be >= 2"),
    ],
    ids=["no-preset", "short"],
)
def test_baseline_text_errors(preset, text_csv, tmp_path, kwargs, match):
    from keras_lean.pipeline import train_baseline

    args = {"data": text_csv, "model_path": preset, "sequence_length": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_baseline(tmp_path / "run", epochs=1, verbose=0, **args)


def test_text_without_labels_on_an_encoder_preset_is_refused(preset, tmp_path):
    """`text` alone is a causal-LM corpus (tests/pipeline/test_text_causal_lm.py); a BERT
    encoder cannot be trained as one."""
    from keras_lean.pipeline import train_baseline

    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": r["text"]}) for r in _rows(6)) + "\n")
    with pytest.raises(ValueError, match=r"BertBackbone is not a backbone keras-hub trains as a"):
        train_baseline(tmp_path / "run", data=path, model_path=preset, epochs=1, verbose=0)


def test_prepare_text_data_refuses_a_corpus_without_labels(preset, tmp_path):
    from keras_lean.pipeline.text import prepare_text_data

    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": r["text"]}) for r in _rows(6)) + "\n")
    with pytest.raises(DataError, match=r"no `label`: a causal-LM corpus"):
        prepare_text_data(path, preset, tmp_path / "o.npz")


def test_causal_lm_perplexity_matches_hand_computation():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]], dtype="float32"))
    model = keras.Sequential([keras.Input((2, 3)), keras.layers.Identity()])
    targets = np.array([[0, 1]])
    expected = math.exp(-(math.log(0.5) + math.log(0.8)) / 2)
    assert causal_lm_perplexity(model, logits, targets) == pytest.approx(expected, rel=1e-5)
    masked = causal_lm_perplexity(model, logits, targets, mask=np.array([[True, False]]))
    assert masked == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "movement"], ids=["magnitude", "movement"])
def test_pruning_a_text_classifier_reaches_the_encoder_kernels(preset, method):
    """The recipe's `magnitude` / `movement` (include `*`) prune the TransformerEncoder's
    attention projections and feed-forward kernels, not only the Dense layers around it."""
    from keras_lean.pipeline.methods.base import Data, FinetunePlan
    from keras_lean.pipeline.recipe import Recipe
    from keras_lean.sparsity import PruneLowMagnitude

    model = build_text_classifier(preset, 2, 8)
    ids = np.random.default_rng(0).integers(1, len(VOCAB), (16, 8)).astype("float32")
    labels = (ids[:, 0] % 2).astype("int32")
    data = Data(ids, labels, ids, labels, num_classes=2)
    plan = FinetunePlan(epochs=1, steps_per_epoch=4, batch_size=4)
    recipe = Recipe.from_dict({"version": 1, "methods": [method], method: {"target_sparsity": 0.5}})
    (pruning,) = recipe.ordered_methods()
    wrapped = pruning.prepare(model, data, plan)
    blocks = [
        w
        for w in wrapped._flatten_layers()
        if isinstance(w, PruneLowMagnitude)
        and isinstance(w.layer, keras_hub.layers.TransformerEncoder)
    ]
    assert len(blocks) == 1 and len(blocks[0].mask_variables) == 6
    for _ in range(plan.total_steps):  # the train steps' mask updates, eagerly (no fit trace)
        wrapped(ids[:4], training=True)
    pruning.finalize(wrapped)
    final = pruning.report()["final"]
    assert final["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert final["layers"]["transformer_layer_0"] == pytest.approx(0.5, abs=0.02)
