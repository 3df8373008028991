"""Recipe `method: structured, structured.mode: gradual` on a text classifier: the masks reach
the keras-hub TransformerEncoder's heads and feed-forward neurons, and `finalize` removes them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.pipeline.text import build_text_classifier

keras_hub = pytest.importorskip("keras_hub")

from keras_lean.structured.hub_layers import (  # noqa: E402
    MaskedTransformerEncoder,
    PrunedTransformerEncoder,
)
from tests.pipeline._text_presets import save_tiny_bert_preset  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"good bad movie plot".split()]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny BERT preset folder (backbone + tokenizer), built here, no download."""
    return save_tiny_bert_preset(tmp_path_factory.mktemp("preset"), VOCAB)


def test_gradual_structured_masks_then_shrinks_the_encoder_blocks(preset):
    from keras_lean.pipeline.methods.base import Data, FinetunePlan
    from keras_lean.pipeline.recipe import Recipe

    model = build_text_classifier(preset, 2, 8)
    ids = np.random.default_rng(0).integers(1, len(VOCAB), (16, 8)).astype("float32")
    labels = (ids[:, 0] % 2).astype("int32")
    data = Data(ids, labels, ids, labels, num_classes=2)
    plan = FinetunePlan(epochs=1, steps_per_epoch=4, batch_size=4)
    recipe = Recipe.from_dict(
        {"version": 1, "methods": ["structured"], "structured": {"mode": "gradual", "ratio": 0.5}}
    )
    (pruning,) = recipe.ordered_methods()
    masked = pruning.prepare(model, data, plan)
    (block,) = [la for la in masked._flatten_layers() if isinstance(la, MaskedTransformerEncoder)]
    for _ in range(plan.total_steps):  # the train steps' mask updates, eagerly (no fit trace)
        masked(ids[:4], training=True)
    masks = block.unit_masks()
    assert (int(masks["heads"].sum()), int(masks["inner"].sum())) == (1, 16)
    small = pruning.finalize(masked)
    (encoder,) = [la for la in small._flatten_layers() if isinstance(la, PrunedTransformerEncoder)]
    assert (encoder.num_heads, encoder.head_dim, encoder.intermediate_dim) == (1, 8, 16)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(small(ids)),
        keras.ops.convert_to_numpy(masked(ids)),
        atol=1e-5,
    )
    rows = {r["name"]: r for r in pruning.report()["structure"]["layers"]}
    row = rows["transformer_layer_0"]  # the report sees the block narrow (its feed-forward)
    assert (row["width_before"], row["width_after"]) == (32, 16)
    assert row["params_after"] < row["params_before"]
