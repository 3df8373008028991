"""Low rank: SVD factorization to shrink what is deployed, LoRA to make fine-tuning cheap.

- `factorize(model, rank=None, energy=0.9, filters=None) -> (model, FactorizationReport)` replaces
  Dense kernels by their truncated SVD (`LowRankDense`).
- `apply_lora(model, rank, alpha=None, targets=None, keep_trainable=None) -> model` freezes the base
  and enables Keras' own LoRA adapters; `merge_lora(model) -> model` folds them back;
  `lora_summary(model) -> dict` counts parameters.

Both transforms return new models and leave the caller's untouched.
"""

from __future__ import annotations

from keras_lean.lowrank.lora import (
    apply_lora,
    default_lora_targets,
    lora_layers,
    lora_summary,
    merge_lora,
    supports_lora,
)
from keras_lean.lowrank.svd import (
    FactorizationReport,
    LayerFactorization,
    LowRankDense,
    factorize,
)

__all__ = [
    "FactorizationReport",
    "LayerFactorization",
    "LowRankDense",
    "apply_lora",
    "default_lora_targets",
    "factorize",
    "lora_layers",
    "lora_summary",
    "merge_lora",
    "supports_lora",
]
