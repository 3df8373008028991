"""Registry of recipe methods: name -> "module:Class", imported on first use."""

from __future__ import annotations

import importlib

METHODS = {
    "magnitude": "keras_lean.pipeline.methods.magnitude:MagnitudeMethod",
    "movement": "keras_lean.pipeline.methods.magnitude:MovementMethod",
    "structured": "keras_lean.pipeline.methods.structured:StructuredMethod",
    "lowrank": "keras_lean.pipeline.methods.lowrank:LowRankMethod",
    "lora": "keras_lean.pipeline.methods.lora:LoraMethod",
    "lottery": "keras_lean.pipeline.methods.lottery:LotteryMethod",
}


def get_method_class(name: str):
    """Returns the `Method` subclass registered under `name`.

    Raises:
        ValueError: if `name` is not a known method.
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}. Allowed: {', '.join(sorted(METHODS))}.")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
