"""Hidden-width pruning (Minitron's width pruning): the residual stream of keras-hub BERT and
GPT-2 models loses the same channels everywhere, as one group.

Pinned to the keras-hub versions pyproject.toml allows (keras-hub>=0.20,<0.33).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.structured import flatten_model, hidden_width_scores, prune_hidden_width

keras_hub = pytest.importorskip("keras_hub")

from keras_lean.structured.hub_layers import (  # noqa: E402
    PrunedTransformerDecoder,
    PrunedTransformerEncoder,
)
from tests.structured._hub_models import bert_classifier, gpt2_causal_lm  # noqa: E402

VOCAB, HIDDEN, HEADS, FF, SEQ = 50, 16, 2, 32, 8
HEAD_DIM = HIDDEN // HEADS
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _bert_classifier(layers=2):
    return bert_classifier(
        vocab=VOCAB, heads=HEADS, hidden=HIDDEN, ff=FF, max_len=SEQ, layers=layers
    )


def _gpt2(layers=2):
    return gpt2_causal_lm(
        vocab=VOCAB, heads=HEADS, hidden=HIDDEN, ff=FF, max_len=SEQ, layers=layers
    )


def _bert_inputs(batch=4, high=VOCAB):
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, high, (batch, SEQ)).astype("int32"),
        "segment_ids": np.zeros((batch, SEQ), "int32"),
        "padding_mask": np.ones((batch, SEQ), "int32"),
    }


def _gpt2_inputs(batch=4, high=VOCAB):
    x = _bert_inputs(batch, high)
    return {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}


@pytest.fixture(scope="module")
def bert():
    return _bert_classifier()


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


def _blocks(model, cls):
    return [la for la in model.layers if isinstance(la, cls)]


def _weight(model, path_end):
    found = [w for w in model.weights if w.path == path_end or w.path.endswith("/" + path_end)]
    if not found:  # a flattened task prefixes clashing names with its backbone's
        found = [w for w in model.weights if w.path.endswith("_" + path_end)]
    assert len(found) == 1, (path_end, [w.path for w in found])
    return keras.ops.convert_to_numpy(found[0])


@pytest.mark.parametrize(
    "make, inputs",
    [("bert", _bert_inputs), ("gpt2", _gpt2_inputs)],
    ids=["bert-classifier", "gpt2-causal-lm"],
)
@pytest.mark.parametrize("importance", ["l2", "activation"], ids=["l2", "activation"])
def test_ratio_zero_gives_identical_outputs(make, inputs, importance, request):
    model = request.getfixturevalue(make)
    x = inputs()
    same = prune_hidden_width(
        model, 0.0, importance, data=x if importance == "activation" else None
    )
    assert same is not model
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(same(x)), keras.ops.convert_to_numpy(model(x))
    )
    assert same.count_params() == model.count_params()


def test_bert_loses_the_same_channels_everywhere_and_keeps_head_width(bert):
    x = _bert_inputs()
    before = [np.array(w) for w in bert.get_weights()]
    small = prune_hidden_width(bert, 0.25, "l2")
    kept = np.argsort(-hidden_width_scores(bert, "l2"), kind="stable")[:12]
    kept = np.sort(kept)
    # the caller's model is untouched
    for a, b in zip(before, bert.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("token_embedding", "position_embedding", "segment_embedding"):
        np.testing.assert_array_equal(
            _weight(small, f"{name}/embeddings"), _weight(bert, f"{name}/embeddings")[:, kept]
        )
    for part in ("gamma", "beta"):
        np.testing.assert_array_equal(
            _weight(small, f"embeddings_layer_norm/{part}"),
            _weight(bert, f"embeddings_layer_norm/{part}")[kept],
        )
    blocks = _blocks(small, PrunedTransformerEncoder)
    assert [b.head_dim for b in blocks] == [HEAD_DIM, HEAD_DIM]
    layer0 = "transformer_layer_0"
    q = _weight(small, f"{layer0}/self_attention_layer/query/kernel")
    assert q.shape == (12, HEADS, HEAD_DIM)  # heads keep their width, the input shrinks
    np.testing.assert_array_equal(
        q, _weight(bert, f"{layer0}/self_attention_layer/query/kernel")[kept]
    )
    out = _weight(small, f"{layer0}/self_attention_layer/attention_output/kernel")
    np.testing.assert_array_equal(
        out, _weight(bert, f"{layer0}/self_attention_layer/attention_output/kernel")[..., kept]
    )
    np.testing.assert_array_equal(
        _weight(small, f"{layer0}/feedforward_intermediate_dense/kernel"),
        _weight(bert, f"{layer0}/feedforward_intermediate_dense/kernel")[kept],
    )
    np.testing.assert_array_equal(
        _weight(small, f"{layer0}/feedforward_output_dense/bias"),
        _weight(bert, f"{layer0}/feedforward_output_dense/bias")[kept],
    )
    np.testing.assert_array_equal(
        _weight(small, f"{layer0}/feedforward_layer_norm/gamma"),
        _weight(bert, f"{layer0}/feedforward_layer_norm/gamma")[kept],
    )
    # the pooler reads the narrower hidden state; its own output (and the logits) keep width
    pooled = _weight(small, "pooled_dense/kernel")
    np.testing.assert_array_equal(pooled, _weight(bert, "pooled_dense/kernel")[kept])
    assert small(x).shape == (4, 3)
    assert small.count_params() < bert.count_params()


def test_pruned_bert_saves_reloads_without_custom_objects_and_trains(bert, tmp_path):
    x = _bert_inputs()
    small = prune_hidden_width(bert, 0.5, data=x)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(small(x)), atol=1e-6
    )
    loaded.compile("adam", LOSS, run_eagerly=True)  # one step: no graph tracing
    w0 = _weight(loaded, "token_embedding/embeddings").copy()
    loss = float(loaded.train_on_batch(x, np.array([0, 1, 2, 0])))
    assert np.isfinite(loss)
    assert not np.array_equal(w0, _weight(loaded, "token_embedding/embeddings"))


def test_gpt2_decoder_and_tied_reverse_embedding_shrink_together(gpt2, tmp_path):
    x = _gpt2_inputs()
    small = prune_hidden_width(gpt2, 0.5, data=x)
    blocks = _blocks(small, PrunedTransformerDecoder)
    assert len(blocks) == 2 and all(b.head_dim == HEAD_DIM for b in blocks)
    emb = [la for la in small.layers if la.name.endswith("token_embedding")]
    assert len(emb) == 1 and emb[0].output_dim == HIDDEN // 2
    assert _weight(small, "layer_norm/gamma").shape == (HIDDEN // 2,)
    logits = keras.ops.convert_to_numpy(small(x))
    assert logits.shape == (4, SEQ, VOCAB)  # the tied reverse embedding still maps to the vocab
    path = tmp_path / "lm.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), logits, atol=1e-5)
    loaded.compile("adam", LOSS, run_eagerly=True)  # one step: no graph tracing
    assert np.isfinite(float(loaded.train_on_batch(x, x["token_ids"])))


def test_activation_importance_ranks_by_what_the_data_uses_and_l2_by_the_tables(gpt2):
    model = flatten_model(gpt2)[0]  # a copy
    table = next(w for w in model.weights if w.path.endswith("token_embedding/embeddings"))
    v = keras.ops.convert_to_numpy(table).copy()
    used, unused = slice(1, 6), slice(6, VOCAB)  # the data below uses tokens 1..5 only
    v[:, :] *= 0.01
    v[used, 0:4] = 5.0  # what the data sees: strong in channels 0..3
    v[unused, 4:8] = 5.0  # 44 rows strong in channels 4..7: the table's norm says these
    table.assign(v)
    x = _gpt2_inputs(high=6)
    activation = hidden_width_scores(model, "activation", data=x)
    l2 = hidden_width_scores(model, "l2")
    assert set(np.argsort(-activation)[:4]) == {0, 1, 2, 3}
    assert set(np.argsort(-l2)[:4]) == {4, 5, 6, 7}
    small = prune_hidden_width(model, 0.75, data=x)  # auto: activation with data
    np.testing.assert_array_equal(_weight(small, "token_embedding/embeddings"), v[:, 0:4])


def test_activation_importance_skips_padding(bert):
    x = _bert_inputs()
    x["padding_mask"][:, 5:] = 0
    other = {k: v.copy() for k, v in x.items()}
    other["token_ids"][:, 5:] = 3  # padded tokens changed: the scores must not move
    a = hidden_width_scores(bert, "activation", data=x)
    b = hidden_width_scores(bert, "activation", data=other)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert not np.allclose(a, hidden_width_scores(bert, "activation", data=_bert_inputs()))


def _encoder_decoder():
    """Embeddings -> encoder -> decoder with cross attention on the encoder -> pooled Dense."""
    keras.utils.set_random_seed(1)
    src = keras.Input((SEQ,), dtype="int32", name="src")
    tgt = keras.Input((SEQ,), dtype="int32", name="tgt")
    shared = keras.layers.Embedding(VOCAB, HIDDEN, name="shared_embedding")
    enc = keras_hub.layers.TransformerEncoder(FF, HEADS, name="enc")(shared(src))
    dec = keras_hub.layers.TransformerDecoder(FF, HEADS, name="dec")(shared(tgt), enc)
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(dec))
    return keras.Model([src, tgt], keras.layers.Dense(2, name="head")(pooled))


def test_cross_attention_reads_the_pruned_encoder_width():
    model = _encoder_decoder()
    rng = np.random.default_rng(0)
    x = [rng.integers(0, VOCAB, (3, SEQ)).astype("int32") for _ in range(2)]
    same = prune_hidden_width(model, 0.0, "l2")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(same(x)), keras.ops.convert_to_numpy(model(x))
    )
    small = prune_hidden_width(model, 0.5, "l2")
    assert _weight(small, "dec/cross_attention/key/kernel").shape == (8, HEADS, HEAD_DIM)
    assert _weight(small, "dec/self_attention/query/kernel").shape == (8, HEADS, HEAD_DIM)
    assert _weight(small, "head/kernel").shape == (8, 2)
    assert small(x).shape == (3, 2)


def test_round_to_and_min_channels(bert):
    small = prune_hidden_width(bert, 0.6, "l2", round_to=4)  # 16 - 9 = 7 -> 8
    assert _weight(small, "token_embedding/embeddings").shape == (VOCAB, 8)
    small = prune_hidden_width(bert, 0.9, "l2", min_channels=6)
    assert _weight(small, "token_embedding/embeddings").shape == (VOCAB, 6)


def test_a_model_without_embeddings_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="found no embedding layer"):
        prune_hidden_width(model, 0.5)


def test_a_layer_that_mixes_channels_is_named():
    inp = keras.Input((SEQ,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, HIDDEN)(inp)
    h = keras_hub.layers.TransformerEncoder(FF, HEADS)(h)
    out = keras.layers.Conv1D(4, 3, name="mixer")(h)
    with pytest.raises(ValueError, match="through layer 'mixer' \\(Conv1D\\)"):
        prune_hidden_width(keras.Model(inp, out), 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio=1.0), "ratio must be a float in \\[0, 1\\)"),
        (dict(ratio=0.5, importance="taylor"), "importance must be one of auto, activation, l2"),
        (dict(ratio=0.5, importance="activation"), "needs calibration data"),
        (dict(ratio=0.5, min_channels=0), "min_channels must be an integer >= 1"),
    ],
    ids=["ratio", "importance", "activation-no-data", "min-channels"],
)
def test_bad_arguments(bert, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prune_hidden_width(bert, **kwargs)


# -- recipe: structured.hidden_width ----------------------------------------------------------


def _pipeline_text_classifier():
    """What the pipeline builds for a labelled text file: token ids -> backbone -> masked mean
    pooling -> softmax (as `pipeline.text.build_text_classifier`, with a config backbone)."""
    from keras_lean.pipeline.text import TokenIds

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=FF,
        max_sequence_length=SEQ,
    )
    ids = keras.Input((SEQ,), name="token_ids")
    packed = TokenIds(0, name="token_inputs")(ids)
    hidden = backbone(packed)["sequence_output"]
    pooled = keras.layers.GlobalAveragePooling1D(name="mean_pool")(
        hidden, mask=packed["padding_mask"]
    )
    probs = keras.layers.Dense(2, activation="softmax", name="classifier")(pooled)
    return keras.Model(ids, probs, name="text_classifier")


def _method(**options):
    from keras_lean.pipeline.methods.structured import StructuredMethod, StructuredOptions

    return StructuredMethod(StructuredOptions.from_dict(options))


def _data(n=32):
    from keras_lean.pipeline.methods.base import Data

    rng = np.random.default_rng(0)
    x = rng.integers(1, VOCAB, (n, SEQ)).astype("float32")
    y = rng.integers(0, 2, n)
    return Data(x, y, x[:8], y[:8], 2)


def test_recipe_hidden_width_prunes_a_text_model_before_heads_and_feed_forward():
    from keras_lean.pipeline.methods.base import FinetunePlan

    model = _pipeline_text_classifier()
    data = _data()
    method = _method(mode="oneshot", ratio=0.5, hidden_width=0.25)
    small = method.prepare(model, data, FinetunePlan(epochs=1, steps_per_epoch=2, batch_size=16))
    assert _weight(small, "token_embedding/embeddings").shape == (VOCAB, 12)
    block = small.get_layer("transformer_layer_0")
    assert isinstance(block, PrunedTransformerEncoder) and block.head_dim == HEAD_DIM
    assert block.intermediate_dim == FF // 2 and block.num_heads == 1
    assert _weight(small, "classifier/kernel").shape == (12, 2)
    assert small(data.x_val).shape == (8, 2)
    final = method.finalize(small)  # deploy: a plain copy, and the structure report
    assert final.count_params() == small.count_params() < model.count_params()
    lines = type(method).report_lines(method.report())
    assert "token_embedding 16->12" in lines[0]


def test_recipe_hidden_width_off_by_default_and_refused_for_a_non_transformer():
    from keras_lean.pipeline.methods.base import FinetunePlan

    assert _method().options.hidden_width == 0.0
    cnn = keras.Sequential([keras.Input((SEQ,)), keras.layers.Dense(4, name="d1")])
    method = _method(mode="oneshot", hidden_width=0.5)
    plan = FinetunePlan(epochs=1, steps_per_epoch=2, batch_size=16)
    with pytest.raises(ValueError, match="structured.hidden_width: 0.5 needs a keras-hub text"):
        method.prepare(cnn, _data(), plan)


@pytest.mark.parametrize("mode", ["gradual", "progressive"], ids=["gradual", "progressive"])
def test_recipe_hidden_width_is_oneshot_only(mode):
    from keras_lean.pipeline.methods.structured import StructuredOptions
    from keras_lean.pipeline.options import RecipeError
    from keras_lean.pipeline.recipe import Recipe

    options = {"structured": StructuredOptions(mode=mode, hidden_width=0.25)}
    with pytest.raises(RecipeError, match=f"oneshot only \\(received mode: {mode}\\)"):
        Recipe(methods=("structured",), method_options=options)
    ok = {"structured": StructuredOptions(mode="oneshot", hidden_width=0.25)}
    Recipe(methods=("structured",), method_options=ok)


def test_a_sequential_transformer_stays_sequential():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((SEQ,), dtype="int32"),
            keras.layers.Embedding(VOCAB, HIDDEN, name="emb"),
            keras_hub.layers.TransformerEncoder(FF, HEADS, name="enc"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3, name="head"),
        ]
    )
    x = np.random.default_rng(0).integers(0, VOCAB, (4, SEQ)).astype("int32")
    small = prune_hidden_width(model, 0.5, data=x)
    assert isinstance(small, keras.Sequential)
    assert small.get_layer("emb").output_dim == 8 and small.get_layer("head").kernel.shape == (8, 3)
    assert small(x).shape == (4, 3)


def test_calibration_data_as_arrays_pairs_or_batches(bert):
    x = _bert_inputs()
    y = np.zeros(4, "int32")
    ref = hidden_width_scores(bert, "activation", data=x)
    np.testing.assert_allclose(hidden_width_scores(bert, data=(x, y)), ref, rtol=1e-6)
    batches = [({k: v[:2] for k, v in x.items()}, y[:2]), ({k: v[2:] for k, v in x.items()}, y[2:])]
    halves = hidden_width_scores(bert, data=iter(batches))
    np.testing.assert_allclose(halves, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="empty calibration data"):
        hidden_width_scores(bert, data=iter([]))
