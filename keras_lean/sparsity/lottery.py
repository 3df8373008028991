"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019; 2020).

Round 0 trains the dense network (recording the weights at `rewind_step`). Each later round
prunes `rate` of the weights that are still alive, by magnitude of the trained weights,
rewinds the survivors (and every other weight) to their values at `rewind_step` (0: the
original initialization), and retrains for the same budget with a fresh optimizer. After
`rounds` rounds the sparsity is `1 - (1 - rate) ** rounds`.

Pruning is layer-wise by default (each pruned tensor loses `rate` of its survivors, as in the
original paper's conv nets); `scope="global"` ranks all surviving weights together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_lean.sparsity.api import get_masks, prune_low_magnitude, pruning_wrappers, set_masks

__all__ = ["LotteryResult", "LotteryRound", "find_lottery_ticket", "prune_remaining"]

SCOPES = ("layerwise", "global")


@dataclasses.dataclass(frozen=True)
class LotteryRound:
    """One round of `find_lottery_ticket`.

    Attributes:
        index: 0 is the dense round; round r has sparsity `1 - (1 - rate) ** r`.
        sparsity: zero fraction over the pruned weights during this round's training.
        val_accuracy: validation accuracy after training (None if no "accuracy" metric).
        val_loss: validation loss after training.
        epochs: epochs trained in this round.
        duration_s: wall time of this round's training and evaluation.
    """

    index: int
    sparsity: float
    val_accuracy: float | None
    val_loss: float
    epochs: int
    duration_s: float


@dataclasses.dataclass(frozen=True)
class LotteryResult:
    """What `find_lottery_ticket` found.

    Attributes:
        rounds: one `LotteryRound` per round, dense round first.
        model: the final sparse model (PruneLowMagnitude wrappers with fixed masks), trained
            from the rewound weights; `strip_pruning` it for deployment.
        masks: the final masks, as `get_masks` returns them.
        rewind_step: the step whose weights the survivors were rewound to.
        scope: "layerwise" or "global".
    """

    rounds: tuple[LotteryRound, ...]
    model: Any
    masks: dict
    rewind_step: int
    scope: str

    @property
    def final_sparsity(self) -> float:
        return self.rounds[-1].sparsity

    @property
    def dense_accuracy(self) -> float | None:
        return self.rounds[0].val_accuracy

    def to_dict(self) -> dict:
        return {
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "rewind_step": self.rewind_step,
            "scope": self.scope,
            "final_sparsity": self.final_sparsity,
        }


def prune_remaining(
    masks: dict[str, np.ndarray], weights: dict[str, np.ndarray], rate: float, scope: str
) -> dict[str, np.ndarray]:
    """Removes `rate` of the surviving weights (smallest |w| first).

    Args:
        masks: current 0/1 masks by key.
        weights: trained weights by the same keys.
        rate: fraction of the survivors to remove, in (0, 1).
        scope: "layerwise" (per tensor) or "global" (all tensors ranked together).

    Returns:
        The new masks (same keys and shapes).
    """
    new = {}
    if scope == "global":
        alive = np.concatenate([np.abs(weights[k])[masks[k] > 0].ravel() for k in masks])
        keep = int(round(alive.size * (1.0 - rate)))
        order = np.sort(alive)[::-1]
        threshold = order[keep - 1] if keep > 0 else np.inf
        budget = keep
        for k in masks:
            score = np.where(masks[k] > 0, np.abs(weights[k]), -1.0).ravel()
            chosen = score >= threshold
            # ties at the threshold: keep exactly `keep` weights overall
            if chosen.sum() > budget:
                idx = np.argsort(-score, kind="stable")[:budget]
                chosen = np.zeros_like(chosen)
                chosen[idx] = True
            budget -= int(chosen.sum())
            new[k] = chosen.reshape(masks[k].shape).astype(masks[k].dtype)
        return new
    for k in masks:
        score = np.where(masks[k] > 0, np.abs(weights[k]), -1.0).ravel()
        alive = int((masks[k] > 0).sum())
        keep = max(int(round(alive * (1.0 - rate))), 1)
        idx = np.argsort(-score, kind="stable")[:keep]
        flat = np.zeros(score.size, dtype=masks[k].dtype)
        flat[idx] = 1
        new[k] = flat.reshape(masks[k].shape)
    return new


def _pruned_values(model) -> dict[str, np.ndarray]:
    out = {}
    for wrapper in pruning_wrappers(model):
        for w in wrapper.pruned_weights:
            out[f"{wrapper.layer.name}/{w.name}"] = np.asarray(w.variable.numpy())
    return out


def _sparsity(masks: dict[str, np.ndarray]) -> float:
    total = sum(m.size for m in masks.values())
    return 1.0 - sum(float(m.sum()) for m in masks.values()) / total if total else 0.0


def _make_optimizer(optimizer, template_model):
    if optimizer is None:
        if getattr(template_model, "optimizer", None) is None:
            raise ValueError(
                "optimizer is required when the model is not compiled. Received: optimizer=None"
            )
        optimizer = template_model.optimizer
    if callable(optimizer) and not isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer()
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    return keras.optimizers.get(optimizer)


def find_lottery_ticket(
    model,
    data,
    rounds: int,
    rate: float,
    rewind_step: int = 0,
    epochs_per_round: int = 5,
    batch_size: int = 32,
    optimizer=None,
    loss=None,
    metrics=("accuracy",),
    compile_kwargs: dict | None = None,
    callbacks_factory: Callable[[int], list] | None = None,
    round_context: Callable[[int, dict], Any] | None = None,
    scope: str = "layerwise",
    filters=None,
    verbose: int = 0,
) -> LotteryResult:
    """Finds a sparse subnetwork that trains as well as the dense one.

    Args:
        model: a built Keras 3 Sequential/functional model (not modified).
        data: `(x_train, y_train, x_val, y_val)`.
        rounds: pruning rounds (>= 1); final sparsity is `1 - (1 - rate) ** rounds`.
        rate: fraction of the remaining weights pruned per round, in (0, 1).
        rewind_step: optimizer step whose weights survivors are rewound to (0: initialization);
            must be within round 0's training (`epochs_per_round * steps_per_epoch`).
        epochs_per_round: training epochs per round.
        batch_size: training batch size.
        optimizer: an optimizer factory (`lambda: keras.optimizers.Adam(1e-3)`), an instance
            (re-created from its config each round) or a name; default: the model's own.
        loss: the loss; default: the model's compiled loss.
        metrics: compile metrics; "accuracy" gives `val_accuracy` in each round.
        compile_kwargs: further `compile` arguments (e.g. `jit_compile`).
        callbacks_factory: `callbacks_factory(round_index) -> list` of extra fit callbacks.
        round_context: `round_context(round_index, info) -> context manager` wrapped around each
            round's training and evaluation (e.g. an energy window); `info` has "sparsity" and
            "model" (the pruned model about to train, weights already rewound).
        scope: "layerwise" or "global" pruning.
        filters: which layers to prune (as in `prune_low_magnitude`).
        verbose: fit/evaluate verbosity.

    Returns:
        A `LotteryResult`.

    Raises:
        ValueError: rounds <= 0, rate outside (0, 1), rewind_step < 0 or beyond round 0's
            training, unknown scope, or bad data.

    Example:

    >>> result = find_lottery_ticket(model, (x, y, xv, yv), rounds=2, rate=0.55,
    ...                              rewind_step=0, optimizer=lambda: keras.optimizers.Adam())
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds <= 0:
        raise ValueError(f"rounds must be a positive integer. Received: rounds={rounds!r}")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1). Received: rate={rate!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of 'layerwise', 'global'. Received: scope={scope!r}")
    if (
        isinstance(epochs_per_round, bool)
        or not isinstance(epochs_per_round, int)
        or (epochs_per_round <= 0)
    ):
        raise ValueError(
            "epochs_per_round must be a positive integer. "
            f"Received: epochs_per_round={epochs_per_round!r}"
        )
    if not isinstance(data, tuple | list) or len(data) != 4:
        raise ValueError(
            "data must be a tuple (x_train, y_train, x_val, y_val). "
            f"Received: {type(data).__name__}"
        )
    x_train, y_train, x_val, y_val = data
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = steps_per_epoch * epochs_per_round
    if (
        isinstance(rewind_step, bool)
        or not isinstance(rewind_step, int)
        or not (0 <= rewind_step <= total)
    ):
        raise ValueError(
            f"rewind_step must be in [0, {total}] (round 0 trains {epochs_per_round} epochs x "
            f"{steps_per_epoch} steps). Received: rewind_step={rewind_step!r}"
        )
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError("loss is required when the model is not compiled. Received: loss=None")
    compile_kwargs = dict(compile_kwargs or {})

    net = prune_low_magnitude(model, pruning_schedule=None, update_masks=False, filters=filters)
    masks = get_masks(net)
    rewind_state: list[np.ndarray] | None = net.get_weights() if rewind_step == 0 else None

    class _Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            nonlocal rewind_state
            if rewind_state is None and int(self.model.optimizer.iterations.numpy()) == rewind_step:
                rewind_state = self.model.get_weights()

    history: list[LotteryRound] = []
    for index in range(rounds + 1):
        if index > 0:
            masks = prune_remaining(masks, _pruned_values(net), rate, scope)
            net.set_weights(rewind_state)
            set_masks(net, masks, apply=True)
        sparsity = _sparsity(masks)
        net.compile(
            optimizer=_make_optimizer(optimizer, model),
            loss=loss,
            metrics=list(metrics),
            **compile_kwargs,
        )
        callbacks = list(callbacks_factory(index)) if callbacks_factory else []
        if index == 0 and rewind_state is None:
            callbacks.append(_Snapshot())
        ctx = round_context(index, {"sparsity": sparsity, "model": net}) if round_context else None
        start = time.perf_counter()
        with ctx if ctx is not None else contextlib.nullcontext():
            net.fit(
                x_train,
                y_train,
                batch_size=batch_size,
                epochs=epochs_per_round,
                callbacks=callbacks,
                verbose=verbose,
            )
            scores = net.evaluate(
                x_val, y_val, batch_size=batch_size, verbose=verbose, return_dict=True
            )
        history.append(
            LotteryRound(
                index=index,
                sparsity=sparsity,
                val_accuracy=None if "accuracy" not in scores else float(scores["accuracy"]),
                val_loss=float(scores["loss"]),
                epochs=epochs_per_round,
                duration_s=time.perf_counter() - start,
            )
        )
    return LotteryResult(tuple(history), net, masks, rewind_step, scope)
