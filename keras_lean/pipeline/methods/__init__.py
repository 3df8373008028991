"""Recipe methods: one module per technique, each registering its `Method` class.

Importing this package registers the built-in methods (every module in this folder); see
`registry` for adding your own and `base.Method` for the contract.
"""

from __future__ import annotations

from keras_lean.pipeline.methods.base import Data, FinetunePlan, Method
from keras_lean.pipeline.methods.registry import (
    METHODS,
    get_method_class,
    method_classes,
    method_names,
    register_method,
    registered_class,
)
from keras_lean.pipeline.methods.registry import discover as _discover

_discover()

__all__ = [
    "METHODS",
    "Data",
    "FinetunePlan",
    "Method",
    "get_method_class",
    "method_classes",
    "method_names",
    "register_method",
    "registered_class",
]
