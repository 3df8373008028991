"""keras_lean: leaner Keras 3 models, with the energy to prove it.

Importing this package is cheap and changes nothing global: the technique packages
(`keras_lean.sparsity`, `keras_lean.structured`, `keras_lean.lowrank`), `keras_lean.energy` and
`keras_lean.pipeline` are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved lazily so `import keras_lean` stays light.
_EXPORTS = {
    "prune_low_magnitude": "keras_lean.sparsity",
    "strip_pruning": "keras_lean.sparsity",
    "sparsity_report": "keras_lean.sparsity",
    "check_m_by_n": "keras_lean.sparsity",
    "find_lottery_ticket": "keras_lean.sparsity",
    "prune_oneshot": "keras_lean.sparsity",
    "prune_structured": "keras_lean.structured",
    "prune_structured_gradually": "keras_lean.structured",
    "prune_structured_progressively": "keras_lean.structured",
    "shrink": "keras_lean.structured",
    "structure_report": "keras_lean.structured",
    "factorize": "keras_lean.lowrank",
    "apply_lora": "keras_lean.lowrank",
    "merge_lora": "keras_lean.lowrank",
    "lora_summary": "keras_lean.lowrank",
    "count_flops": "keras_lean.flops",
    "EnergyTracker": "keras_lean.energy",
}

_SUBPACKAGES = ("sparsity", "structured", "lowrank", "energy", "pipeline", "export")


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"keras_lean.{name}")
    raise AttributeError(f"module 'keras_lean' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS) + list(_SUBPACKAGES))
