"""Unstructured and semi-structured pruning of Keras 3 models (TFMOT's API, Keras 3 inside).

Importing this package does not import TFMOT (only `schedules.import_tfmot` does, on demand).
"""

from keras_lean.sparsity.api import (
    LayerSparsity,
    SparsityReport,
    check_m_by_n,
    get_masks,
    prune_low_magnitude,
    pruning_wrappers,
    set_masks,
    sparsity_report,
    strip_pruning,
)
from keras_lean.sparsity.callbacks import PruningSummaries, UpdatePruningStep
from keras_lean.sparsity.lottery import LotteryResult, LotteryRound, find_lottery_ticket
from keras_lean.sparsity.oneshot import OneshotLayer, OneshotReport, prune_oneshot
from keras_lean.sparsity.registry import PrunableLayer, PrunableWeight, register_prunable
from keras_lean.sparsity.schedules import (
    ConstantSparsity,
    PolynomialDecay,
    PruningSchedule,
    TfmotScheduleAdapter,
    as_schedule,
)
from keras_lean.sparsity.wrapper import PruneLowMagnitude, is_prunable, prunable_weights

__all__ = [
    "ConstantSparsity",
    "LayerSparsity",
    "LotteryResult",
    "LotteryRound",
    "OneshotLayer",
    "OneshotReport",
    "PolynomialDecay",
    "PrunableLayer",
    "PrunableWeight",
    "PruneLowMagnitude",
    "PruningSchedule",
    "PruningSummaries",
    "SparsityReport",
    "TfmotScheduleAdapter",
    "UpdatePruningStep",
    "as_schedule",
    "check_m_by_n",
    "find_lottery_ticket",
    "get_masks",
    "is_prunable",
    "prunable_weights",
    "prune_oneshot",
    "prune_low_magnitude",
    "pruning_wrappers",
    "register_prunable",
    "set_masks",
    "sparsity_report",
    "strip_pruning",
]
