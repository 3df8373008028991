"""Causal LMs in the pipeline (keras_lean/pipeline/text.py): a `text`-only file, next-token
windows, a keras-hub decoder (built from a config, or a preset folder), perplexity as the gate.

The corpus is the first lines of the Python standard library's own `textwrap.py` (on every
machine with Python), one line a row.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_lean.flops import count_flops
from keras_lean.pipeline.data import DataError
from keras_lean.pipeline.recipe import Recipe, RecipeError
from keras_lean.pipeline.text import (
    CAUSAL_LM,
    build_causal_lm,
    byte_level_tokenizer,
    causal_lm_perplexity,
    check_decoder_preset,
    is_causal_lm_data,
    lm_perplexity,
    load_causal_lm_data,
    prepare_causal_lm_data,
    save_tiny_decoder_preset,
)

keras_hub = pytest.importorskip("keras_hub")

LENGTH = 16


def _stdlib_lines(n: int) -> list[str]:
    lines = Path(textwrap.__file__).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:n]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in _stdlib_lines(60)) + "\n")
    return path


def test_byte_level_tokenizer_round_trips_any_text():
    tok = byte_level_tokenizer()
    text = "def f(x):\n        return 'héllo'  # ünïcode"
    ids = np.asarray(tok(text))
    assert tok.vocabulary_size() == 259 and ids.max() < 259
    assert tok.detokenize(ids) == text
    four_spaces = tok.token_to_id("ĠĠĠĠ")
    x = int(np.asarray(tok("x"))[0])
    assert np.asarray(tok("        x")).tolist() == [four_spaces, four_spaces, x]  # indentation


def test_prepare_windows_shift_by_one(corpus, tmp_path):
    assert is_causal_lm_data(corpus)
    out = tmp_path / "lm.npz"
    text = prepare_causal_lm_data(corpus, None, out, sequence_length=LENGTH, val_split=0.25)
    assert text["task"] == CAUSAL_LM and text["vocabulary_size"] == 259
    data = load_causal_lm_data(out)
    assert data.x_train.shape[1:] == (LENGTH,) and data.y_val.shape[1:] == (LENGTH,)
    windows = text["windows"]
    assert (windows["train"], windows["val"]) == (len(data.x_train), len(data.x_val))
    assert windows["val"] == round(0.25 * (windows["train"] + windows["val"]))
    assert (text["tokens"] - 1) // LENGTH == windows["train"] + windows["val"]
    # y is x shifted by one token: the windows overlap by one, so every next-token pair is kept
    np.testing.assert_array_equal(data.x_train[:, 1:], data.y_train[:, :-1])
    # the stream decodes back to the corpus, lines joined by the end token
    tok = byte_level_tokenizer()
    first = tok.detokenize(np.concatenate([data.x_train, data.x_val]).astype("int32").ravel())
    assert "textwrap" in first or "wrap" in first


@pytest.mark.parametrize(
    ("rows", "length", "match"),
    [(["x"], 16, r"too few for two windows"), ([""], 4, r"empty or non-string text")],
    ids=["too-short", "empty-row"],
)
def test_prepare_errors(tmp_path, rows, length, match):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n")
    with pytest.raises(DataError, match=match):
        prepare_causal_lm_data(path, None, tmp_path / "o.npz", sequence_length=length)


def _tiny_lm():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=259,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=LENGTH,
    )
    return backbone


def test_causal_lm_is_tied_saves_reloads_and_counts(tmp_path, monkeypatch):
    from keras_lean.pipeline import text as text_module

    monkeypatch.setattr(text_module, "tiny_decoder", lambda vocab, length: _tiny_lm())
    model = build_causal_lm(None, LENGTH, 259)
    ids = np.random.default_rng(0).integers(0, 259, (3, LENGTH)).astype("float32")
    logits = np.asarray(model(ids))
    assert logits.shape == (3, LENGTH, 259)
    # causal: the logits at position t do not depend on tokens after t
    later = ids.copy()
    later[:, 8:] = (later[:, 8:] + 1) % 259
    np.testing.assert_allclose(np.asarray(model(later))[:, :8], logits[:, :8], atol=1e-5)
    path = tmp_path / "lm.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(again(ids)), logits, atol=1e-5)
    assert again.count_params() == model.count_params()  # still one tied embedding table
    report = count_flops(again)
    assert report.by_name()["gpt2_backbone_lm/token_embedding"].flops == 2 * LENGTH * 8 * 259
    assert not [r.name for r in report.rows if "not counted" in r.note and r.params]


def test_lm_perplexity_of_logits_and_probabilities_agree():
    from keras_lean.pipeline.methods.base import Data

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7)).astype("float32")
    y = rng.integers(0, 7, (4, 5))
    data = Data(logits, y, logits, y, num_classes=7)
    identity = keras.Sequential([keras.Input((5, 7)), keras.layers.Identity()])
    softmax = keras.Sequential([keras.Input((5, 7)), keras.layers.Softmax()])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = math.exp(-np.take_along_axis(log_p, y[..., None], -1).mean())
    assert lm_perplexity(identity, data) == pytest.approx(expected, rel=1e-5)
    assert lm_perplexity(softmax, data, from_logits=False) == pytest.approx(expected, rel=1e-4)
    assert causal_lm_perplexity(identity, logits, y) == pytest.approx(expected, rel=1e-5)


def test_decoder_preset_is_checked(tmp_path):
    folder = save_tiny_decoder_preset(tmp_path / "gpt", LENGTH, num_layers=1, hidden_dim=8)
    assert check_decoder_preset(folder) == "GPT2Backbone"
    bert = tmp_path / "bert"
    keras_hub.models.BertBackbone(
        vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4
    ).save_to_preset(bert)
    with pytest.raises(ValueError, match=r"BertBackbone is not a backbone keras-hub trains as"):
        check_decoder_preset(bert)


@pytest.mark.parametrize(
    ("doc", "attr", "value"),
    [
        ({"max_metric_drop": {"perplexity": 0.25}}, "max_perplexity_rise", 0.25),
        ({"max_metric_drop": {"accuracy": 0.05}}, "max_accuracy_drop", 0.05),
        ({"max_accuracy_drop": 0.03}, "max_accuracy_drop", 0.03),
        (
            {"max_accuracy_drop": 0.03, "max_metric_drop": {"accuracy": 0.03}},
            "max_accuracy_drop",
            0.03,
        ),
        ({}, "max_perplexity_rise", 0.1),
    ],
    ids=["perplexity", "accuracy", "alias", "alias-agrees", "default"],
)
def test_recipe_metric_budgets(doc, attr, value):
    recipe = Recipe.from_dict({"version": 1, **doc})
    assert getattr(recipe, attr) == value
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    metric = "perplexity" if attr == "max_perplexity_rise" else "accuracy"
    assert recipe.metric_budget(metric) == value


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"max_metric_drop": {"loss": 0.1}}, r"max_metric_drop\.loss: unknown key"),
        ({"max_metric_drop": {"perplexity": -0.1}}, r"max_metric_drop\.perplexity: must be >= 0"),
        ({"max_metric_drop": [0.1]}, r"max_metric_drop: must be a mapping"),
        (
            {"max_metric_drop": {"accuracy": 0.1}, "max_accuracy_drop": 0.2},
            r"max_metric_drop\.accuracy: is 0\.1 but its alias max_accuracy_drop is 0\.2",
        ),
    ],
    ids=["unknown-metric", "negative", "not-a-mapping", "alias-disagrees"],
)
def test_recipe_metric_budget_errors(doc, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"version": 1, **doc})


def _recipe(tmp_path, body: str) -> Path:
    path = tmp_path / "recipe_in.yaml"
    path.write_text("version: 1\nfinetune: {epochs: 1, jit_compile: 'off'}\n" + body)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("source", ["config", "preset"], ids=["tiny-decoder", "preset-dir"])
def test_causal_lm_pipeline_heads_ffn_and_oneshot(corpus, tmp_path, source):
    """baseline (1 epoch) -> structured heads + feed-forward -> fine-tune -> validate by
    perplexity; then one-shot Wanda on the same baseline."""
    from keras_lean.pipeline import configure, finetune, train_baseline, validate
    from keras_lean.pipeline.models import load_model
    from keras_lean.pipeline.rundir import RunDir

    preset = None
    if source == "preset":
        preset = save_tiny_decoder_preset(tmp_path / "preset", LENGTH, num_layers=1)
    run = RunDir(tmp_path / "run")
    b = train_baseline(
        run, data=corpus, model_path=preset, sequence_length=LENGTH, epochs=1, verbose=0
    )
    manifest = run.read_manifest()
    assert manifest["text"]["task"] == CAUSAL_LM and manifest["from_logits"] is True
    assert manifest["num_classes"] == 259 and manifest["input_shape"] == [LENGTH]
    assert 1 < b.entry["details"]["perplexity"] < 259  # trained: below a uniform guess
    recipe = _recipe(
        tmp_path,
        "methods: [structured]\nstructured: {mode: oneshot, ratio: 0.5}\n"
        "max_metric_drop: {perplexity: 10.0}\n",
    )
    configure(run, recipe=recipe, force=True)
    finetune(run, verbose=0)
    tuned = load_model(run.finetuned)
    blocks = [x for x in tuned._flatten_layers() if "transformer_layer" in x.name]
    assert blocks and all(x.num_heads < 4 and x.intermediate_dim < 128 for x in blocks)
    v = validate(run)
    result = json.loads(run.validation.read_text())
    assert result["metric"] == "perplexity" and v.passed == result["passed"]
    rise = (result["finetuned_perplexity"] - result["baseline_perplexity"]) / result[
        "baseline_perplexity"
    ]
    assert result["perplexity_rise"] == pytest.approx(rise)
    configure(
        run,
        recipe=_recipe(tmp_path, "methods: [oneshot]\noneshot: {criterion: wanda}\n"),
        force=True,
    )
    ft = finetune(run, verbose=0)
    layers = ft.entry["details"]["methods"]["oneshot"]["oneshot"]["layers"]
    names = {row["name"] for row in layers}
    assert any("self_attention/query" in n for n in names)
    assert any("feedforward_intermediate_dense" in n for n in names)
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.01) for row in layers)


def test_cli_and_console_name_the_perplexity_gate(tmp_path, capsys):
    from types import SimpleNamespace

    from keras_lean.cli import _echo_validation
    from keras_lean.console import _is_causal_lm_run

    gate = {
        "metric": "perplexity",
        "baseline_perplexity": 20.0,
        "finetuned_perplexity": 23.0,
        "perplexity_rise": 0.15,
        "max_perplexity_rise": 0.1,
    }
    _echo_validation(SimpleNamespace(passed=False, entry={"details": gate}))
    assert capsys.readouterr().out.strip() == (
        "validate: FAIL: perplexity baseline 20.000, fine-tuned 23.000, rise +15.00% (max 10.00%)"
    )
    (tmp_path / "manifest.json").write_text(json.dumps({"text": {"task": CAUSAL_LM}}))
    assert _is_causal_lm_run(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"text": {"task": "classifier"}}))
    assert not _is_causal_lm_run(tmp_path)


def test_validate_gates_a_causal_lm_by_relative_perplexity_rise(corpus, tmp_path, monkeypatch):
    """validate on a run made by hand (the baseline step's files, without its training)."""
    from keras_lean.pipeline import text as text_module
    from keras_lean.pipeline import validate
    from keras_lean.pipeline.recipe import recipe_to_yaml
    from keras_lean.pipeline.rundir import RunDir, atomic_write_json

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    text = prepare_causal_lm_data(corpus, None, run.root / "text_data.npz", sequence_length=LENGTH)
    monkeypatch.setattr(text_module, "tiny_decoder", lambda vocab, length: _tiny_lm())
    model = build_causal_lm(None, LENGTH, 259)
    model.save(run.baseline)
    data = load_causal_lm_data(run.root / "text_data.npz")
    base = lm_perplexity(model, data)
    for w in model.weights:  # 30x the tied embedding: over-confident logits, a worse perplexity
        if "token_embedding" in w.path:
            w.assign(np.asarray(w) * 30.0)
    model.save(run.finetuned)
    manifest = {
        "version": 1,
        "data": str(run.root / "text_data.npz"),
        "val_split": 0.2,
        "seed": 0,
        "strategy": "default",
        "input_shape": [LENGTH],
        "num_classes": 259,
        "text": text,
        "from_logits": True,
        "energy": {"carbon_intensity": 400.0, "pue": 1.0, "cpu_tdp_w": None},
    }
    atomic_write_json(run.manifest, manifest)
    run.recipe.write_text(recipe_to_yaml(Recipe(methods=("magnitude",), max_perplexity_rise=0.05)))
    result = validate(run)
    gate = json.loads(run.validation.read_text())
    assert gate["metric"] == "perplexity" and gate["max_perplexity_rise"] == 0.05
    assert gate["baseline_perplexity"] == pytest.approx(base, rel=1e-6)
    assert gate["finetuned_perplexity"] == pytest.approx(lm_perplexity(model, data), rel=1e-5)
    assert gate["perplexity_rise"] == pytest.approx(gate["finetuned_perplexity"] / base - 1)
    assert gate["perplexity_rise"] > 0.05
    assert result.passed is False and gate["passed"] is False
    # the accuracy fields stay (token accuracy), but do not decide
    assert "accuracy_drop" in gate
