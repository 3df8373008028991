"""keras-hub TransformerEncoder: feed-forward neurons (and heads, see test_hub_heads.py) pruned,
hidden width kept."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.flops import count_flops
from keras_lean.structured import (
    build_graph,
    prune_structured,
    prune_structured_gradually,
    structure_report,
)

keras_hub = pytest.importorskip("keras_hub")

HIDDEN, HEADS, FF, LAYERS = 16, 2, 32, 2


def _backbone(seed=0):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=LAYERS,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=FF,
        max_sequence_length=16,
    )


def _flat_bert():
    """A tiny BERT with a classification head, built flat (the backbone's layers at top level)."""
    backbone = _backbone()
    x = keras.layers.Dropout(0.1)(backbone.output["pooled_output"])
    return keras.Model(backbone.inputs, keras.layers.Dense(3, name="logits")(x))


def _inputs(batch=4, seq=8):
    rng = np.random.default_rng(0)
    return {
        "token_ids": rng.integers(1, 64, (batch, seq)).astype("int32"),
        "segment_ids": np.zeros((batch, seq), "int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def _encoders(model):
    return [la for la in model.layers if isinstance(la, keras_hub.layers.TransformerEncoder)]


def test_graph_finds_feed_forward_and_head_groups_per_encoder_and_says_what_is_kept():
    graph = build_graph(_flat_bert(), exclude=("logits",))
    prunable = [g for g in graph.groups if g.is_prunable]
    assert sorted(g.producers for g in prunable) == [
        ("transformer_layer_0:heads",),
        ("transformer_layer_0:intermediate",),
        ("transformer_layer_1:heads",),
        ("transformer_layer_1:intermediate",),
    ]
    assert [g.size for g in prunable if g.kind == "channels"] == [FF, FF]
    assert [g.size for g in prunable if g.kind == "heads"] == [HEADS, HEADS]
    skipped = {s.name: s.reason for s in graph.skipped}
    assert "hidden width kept" in skipped["transformer_layer_0"]
    assert "heads and feed-forward neurons are pruned" in skipped["transformer_layer_0"]


def test_ratio_zero_is_the_same_model():
    model = _flat_bert()
    same = prune_structured(model, 0.0, exclude=("logits",))
    np.testing.assert_allclose(same(_inputs()), model(_inputs()), rtol=1e-5, atol=1e-5)


def test_prune_removes_the_weakest_neurons_and_keeps_the_rest_exact(tmp_path):
    model = _flat_bert()
    enc = model.get_layer("transformer_layer_0")
    # Make neurons 0..7 of the first encoder the weakest: tiny in- and out-weights.
    weights = {w.path.split("/", 1)[1]: w for w in enc.weights}
    k_in = weights["feedforward_intermediate_dense/kernel"]
    k_out = weights["feedforward_output_dense/kernel"]
    k_in.assign(k_in.numpy() * np.r_[np.full(8, 1e-3), np.ones(FF - 8)].astype("float32"))
    k_out.assign(k_out.numpy() * np.r_[np.full(8, 1e-3), np.ones(FF - 8)][:, None].astype("f4"))
    expected_in = k_in.numpy()[:, 8:]

    small = prune_structured(model, 0.25, "l1", exclude=("logits",))
    assert [e.intermediate_dim for e in _encoders(small)] == [FF - 8, FF - 8]
    assert [e.num_heads for e in _encoders(small)] == [HEADS, HEADS]
    new = {w.path.split("/", 1)[1]: w for w in small.get_layer("transformer_layer_0").weights}
    np.testing.assert_array_equal(new["feedforward_intermediate_dense/kernel"], expected_in)
    # Removing near-dead neurons barely changes the output (gelu(~0) ~ 0).
    diff = np.abs(np.asarray(small(_inputs())) - np.asarray(model(_inputs()))).max()
    assert diff < 1e-2

    report = structure_report(model, small, exclude=("logits",))
    rows = {r.name: r for r in report.layers}
    assert (rows["transformer_layer_0"].width_before, rows["transformer_layer_0"].width_after) == (
        FF,
        FF - 8,
    )
    assert report.flops_after < report.flops_before and report.params_after < report.params_before
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(_inputs()), small(_inputs()), rtol=1e-5, atol=1e-5)
    small.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = small.fit(_inputs(), np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_flops_count_the_encoder_and_follow_the_feed_forward_width():
    model = _flat_bert()
    rows = count_flops(model).by_name()
    per_token = rows["transformer_layer_0"].flops
    # attention: q/k/v/o projections + 2 matmuls (1 token); ff: 2 Dense; 2 LayerNorms; 2 adds.
    d, f = HIDDEN, FF
    expected = 4 * d * (2 * d + 1) + 4 * d + f * (2 * d + 1) + d * (2 * f + 1) + 14 * d + 2 * d
    assert per_token == expected and not rows["transformer_layer_0"].note.startswith("FLOPs not")
    small = prune_structured(model, 0.5, exclude=("logits",))
    assert count_flops(small).by_name()["transformer_layer_0"].flops < per_token


def test_gradual_masks_enter_the_encoders(recwarn):
    """Gradual masks now reach the heads and feed-forward neurons (test_hub_gradual.py has the
    details); the masked blocks keep their full width until `shrink`."""
    from keras_lean.sparsity.schedules import ConstantSparsity
    from keras_lean.structured.hub_layers import MaskedTransformerEncoder

    masked = prune_structured_gradually(
        _flat_bert(), ConstantSparsity(0.5, 0, frequency=1), exclude=("logits",)
    )
    encoders = _encoders(masked)
    assert all(isinstance(e, MaskedTransformerEncoder) for e in encoders) and len(encoders) == 2
    assert [e.intermediate_dim for e in encoders] == [FF, FF]
    assert [(e.head_mask is not None, e.inner_mask is not None) for e in encoders] == [
        (True, True)
    ] * 2
    assert not [w for w in recwarn if "removes nothing" in str(w.message)]


def test_a_keras_hub_task_is_pruned_through_its_backbone_then_lora_merges():
    from keras_lean.lowrank import apply_lora, merge_lora

    task = keras_hub.models.BertTextClassifier(_backbone(), num_classes=3, preprocessor=None)
    same = prune_structured(task, 0.0, exclude=("logits",))
    np.testing.assert_allclose(same(_inputs()), task(_inputs()), rtol=1e-5, atol=1e-5)
    small = prune_structured(task, 0.5, exclude=("logits",))  # the backbone is inlined
    assert [e.intermediate_dim for e in _encoders(small)] == [FF // 2, FF // 2]
    assert [e.intermediate_dim for e in _encoders(task.backbone)] == [FF, FF]  # caller's intact
    report = structure_report(task, small, exclude=("logits",))
    assert {r.name: r.width_after for r in report.layers}["transformer_layer_1"] == FF // 2
    adapted = apply_lora(small, rank=2, keep_trainable="logits")
    # Fresh adapters have B = 0 (they add nothing): give them values, so the merge has work to do.
    factors_b = [v for v in adapted.weights if v.path.rsplit("/", 1)[-1].startswith("lora_")]
    factors_b = [v for v in factors_b if v.path.endswith("_b")]
    assert factors_b
    rng = np.random.default_rng(1)
    for v in factors_b:  # large: with one head left per block the logits move less per unit
        v.assign(rng.normal(0.0, 6.0, tuple(v.shape)).astype("float32"))
    x = _inputs()
    # the adapters move the outputs far more than the merge tolerance below
    assert np.abs(np.asarray(adapted(x)) - np.asarray(small(x))).max() > 1e-3
    merged = merge_lora(adapted)
    assert not any("lora_" in v.path for v in merged.weights)
    np.testing.assert_allclose(merged(x), adapted(x), rtol=1e-4, atol=2e-5)


def test_taylor_importance_takes_named_inputs():
    x, y = _inputs(batch=8), np.arange(8) % 3
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    small = prune_structured(
        _flat_bert(), 0.5, "taylor", data=(x, y), loss=loss, batch_size=4, exclude=("logits",)
    )
    assert [e.intermediate_dim for e in _encoders(small)] == [FF // 2, FF // 2]
