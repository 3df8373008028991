"""Tiny keras-hub task models built from configs (no download), for the hub-block tests.

Each call seeds Keras first (`keras.utils.set_random_seed(0)`), so two calls with the same sizes
give the same weights.
"""

from __future__ import annotations

import keras


def bert_classifier(*, vocab, heads, hidden, ff, max_len, layers=2, num_classes=3, **backbone):
    """A `BertTextClassifier` (no preprocessor) on a `BertBackbone` of the given sizes;
    `backbone`: further `BertBackbone` arguments (e.g. `dropout=0.0`)."""
    import keras_hub

    keras.utils.set_random_seed(0)
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=ff,
        max_sequence_length=max_len,
        **backbone,
    )
    return keras_hub.models.BertTextClassifier(bert, num_classes=num_classes, preprocessor=None)


def gpt2_causal_lm(*, vocab, heads, hidden, ff, max_len, layers=2, **backbone):
    """A `GPT2CausalLM` (no preprocessor) on a `GPT2Backbone` of the given sizes."""
    import keras_hub

    keras.utils.set_random_seed(0)
    gpt2 = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=ff,
        max_sequence_length=max_len,
        **backbone,
    )
    return keras_hub.models.GPT2CausalLM(backbone=gpt2, preprocessor=None)
