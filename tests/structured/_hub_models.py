"""Tiny keras-hub task models built from configs (no download), for the hub-block tests.

Each call seeds Keras first (`keras.utils.set_random_seed(0)`), so two calls with the same sizes
give the same weights.
"""

from __future__ import annotations

import keras


def _backbone(name, *, vocab, heads, hidden, ff, max_len, layers, **backbone):
    """keras-hub's backbone class `name` at the given sizes, after seeding Keras."""
    import keras_hub

    keras.utils.set_random_seed(0)
    return getattr(keras_hub.models, name)(
        vocabulary_size=vocab,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=ff,
        max_sequence_length=max_len,
        **backbone,
    )


def bert_classifier(*, num_classes=3, layers=2, **sizes):
    """A `BertTextClassifier` (no preprocessor) on a `BertBackbone` of the given sizes (`vocab`,
    `heads`, `hidden`, `ff`, `max_len`, `layers`); further `BertBackbone` arguments pass
    through (e.g. `dropout=0.0`)."""
    import keras_hub

    bert = _backbone("BertBackbone", layers=layers, **sizes)
    return keras_hub.models.BertTextClassifier(bert, num_classes=num_classes, preprocessor=None)


def gpt2_backbone(*, layers=2, **sizes):
    """A `GPT2Backbone` of the given sizes (as `bert_classifier`)."""
    return _backbone("GPT2Backbone", layers=layers, **sizes)


def gpt2_causal_lm(*, layers=2, **sizes):
    """A `GPT2CausalLM` (no preprocessor) on `gpt2_backbone(**sizes)`."""
    import keras_hub

    return keras_hub.models.GPT2CausalLM(
        backbone=gpt2_backbone(layers=layers, **sizes), preprocessor=None
    )
