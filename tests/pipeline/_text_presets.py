"""A tiny BERT preset folder (tokenizer + backbone, built from configs, no download) for the
text-pipeline tests."""

from __future__ import annotations


def save_tiny_bert_preset(folder, vocabulary):
    """Writes a BERT preset to `folder`: a `BertTextClassifierPreprocessor` over `vocabulary`
    (sequence length 8) and a one-layer `BertBackbone` (2 heads, hidden 16, feed-forward 32).
    Returns `folder`."""
    import keras_hub

    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    preprocessor.save_to_preset(folder)
    keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    ).save_to_preset(folder)
    return folder
