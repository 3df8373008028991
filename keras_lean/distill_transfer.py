"""The distillation's transfer set: training inputs perturbed afresh at every step.

Hinton et al. (2015) distil on a transfer set, data where the teacher's outputs are soft; a teacher
near-certain on its own training split (the usual baseline) passes little beyond the labels
there. `TransferConfig` says how the inputs are perturbed (image shifts, Gaussian noise, mixup
within the batch; token masking for text); `TransferData` is the `keras.utils.PyDataset` that feeds
`fit` the perturbed batches, so a `keras.distillation.Distiller` runs the teacher on exactly the
batch the student sees, in the same train step. `keras_lean.distill` uses it for
`DistillConfig(transfer=...)` and records what it measured.

The perturbation runs in NumPy as each batch is fed: backend-neutral (the same batches under
TensorFlow and JAX), and a pure function of `(seed, step)`, so a resumed fit perturbs as the
uninterrupted one and two arms given the same seed see identical batches.

Example:
    >>> from keras_lean.distill_transfer import TransferConfig, TransferData
    >>> data = TransferData(x_train, y_train, config=TransferConfig(mixup=0.4), batch_size=32,
    ...                     epochs=3, seed=0)
    >>> model.fit(data, epochs=3, steps_per_epoch=data.steps_per_epoch, shuffle=False)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np


def _number(name: str, value: Any, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {what}. Received: {name}={value!r}")


def checked_dict(cls: type, data: Any, where: str) -> dict:
    """`data` checked to be a mapping whose keys are all fields of `cls` (a typo is an error)."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a dict. Received: {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"unknown {where} key {unknown[0]!r}. Allowed: {', '.join(sorted(fields))}."
        )
    return dict(data)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """The transfer set: perturbed copies of the training inputs, drawn anew at every step.

    The student learns the teacher's outputs on exactly the perturbed batch (the teacher runs on
    it in the same train step), where a teacher that is near-certain on its clean training split
    is soft: this is Hinton et al.'s (2015) transfer set, built from the training data the way
    TinyBERT / Minitron distil on augmented or other data. The labels of each sample are kept
    (a mixed-up sample keeps the label of its larger share). All off by default.

    Attributes:
        shift: image inputs `(batch, height, width, channels)`: each sample is translated by
            integer offsets drawn in `[-shift, shift]` along height and width, zero-filled
            (int >= 0; 0: off).
        noise: standard deviation of Gaussian noise added to float inputs, in the inputs' own
            units (>= 0; 0: off).
        mixup: float inputs: each sample is mixed with another sample of its batch,
            `lam * x + (1 - lam) * x_other` with `lam = max(u, 1 - u)`, `u ~ Beta(mixup, mixup)`
            (> 0; 0: off). `lam >= 0.5`, so the sample's own label stays right.
        token_mask: token inputs (an integer array, or a dict with a `token_ids` entry): the
            share of real tokens (where `padding_mask` is true, when given) replaced by
            `mask_token_id`, in [0, 1) (0: off).
        mask_token_id: the id that replaces a masked token: the tokenizer's mask id (BERT's
            `[MASK]`), else its pad id. Required when `token_mask > 0`.
        keep_token_ids: token ids never masked (e.g. `[CLS]`, `[SEP]`).
    """

    shift: int = 0
    noise: float = 0.0
    mixup: float = 0.0
    token_mask: float = 0.0
    mask_token_id: int | None = None
    keep_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _number("shift", self.shift, integer=True)
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0. Received: shift={self.shift}")
        for name in ("noise", "mixup", "token_mask"):
            _number(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0. Received: {name}={getattr(self, name)}")
        if self.token_mask >= 1:
            raise ValueError(
                f"token_mask must be in [0, 1). Received: token_mask={self.token_mask}"
            )
        if self.mask_token_id is not None:
            _number("mask_token_id", self.mask_token_id, integer=True)
        if self.token_mask > 0 and self.mask_token_id is None:
            raise ValueError(
                "token_mask > 0 needs mask_token_id (the tokenizer's mask or pad id). "
                f"Received: token_mask={self.token_mask}, mask_token_id=None"
            )
        keep = tuple(self.keep_token_ids)
        for i in keep:
            _number("keep_token_ids", i, integer=True)
        object.__setattr__(self, "keep_token_ids", keep)

    @property
    def enabled(self) -> bool:
        """Whether any perturbation is on."""
        return bool(self.shift or self.noise or self.mixup or self.token_mask)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "keep_token_ids": list(self.keep_token_ids)}

    @classmethod
    def from_dict(cls, data: dict) -> TransferConfig:
        """The inverse of `to_dict`; an unknown key is an error naming it."""
        return cls(**checked_dict(cls, data, "transfer"))


#: Mixed into the transfer set's seeds, so its draws differ from the data order's stream.
_TRANSFER_STREAM = 0x7A5F


def _perturb_images(x: np.ndarray, config: TransferConfig, rng: np.random.Generator):
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            "transfer.shift / noise / mixup need float inputs; use transfer.token_mask for "
            f"token ids. Received: inputs of dtype {x.dtype}"
        )
    n = len(x)
    if config.mixup:
        u = rng.beta(config.mixup, config.mixup, size=n)
        lam = np.maximum(u, 1 - u).astype(x.dtype).reshape((n,) + (1,) * (x.ndim - 1))
        x = lam * x + (1 - lam) * x[rng.permutation(n)]
    if config.shift:
        if x.ndim != 4:
            raise ValueError(
                "transfer.shift needs image inputs (batch, height, width, channels). "
                f"Received: inputs of shape {x.shape}; set transfer.shift: 0"
            )
        s, (h, w) = config.shift, x.shape[1:3]
        padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
        rows = rng.integers(0, 2 * s + 1, size=n)[:, None] + np.arange(h)
        cols = rng.integers(0, 2 * s + 1, size=n)[:, None] + np.arange(w)
        x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if config.noise:
        x = x + rng.normal(0.0, config.noise, size=x.shape).astype(x.dtype)
    return x


def _mask_tokens(x: Any, config: TransferConfig, rng: np.random.Generator):
    tokens = x["token_ids"] if isinstance(x, dict) else x
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"transfer.token_mask needs integer token ids. Received: dtype {tokens.dtype}"
        )
    real = np.ones(tokens.shape, bool)
    if isinstance(x, dict) and "padding_mask" in x:
        real = np.asarray(x["padding_mask"]).astype(bool)
    if config.keep_token_ids:
        real &= ~np.isin(tokens, config.keep_token_ids)
    hit = real & (rng.random(tokens.shape) < config.token_mask)
    masked = np.where(hit, np.asarray(config.mask_token_id, tokens.dtype), tokens)
    return {**x, "token_ids": masked} if isinstance(x, dict) else masked


def perturb(x: Any, config: TransferConfig, rng: np.random.Generator) -> Any:
    """One batch of the transfer set: `x` perturbed as `config` says (a new array or dict).

    Image perturbations (mixup, then shift, then noise) apply to an array of float inputs;
    `token_mask` to token ids (an integer array, or the `token_ids` of a dict of arrays; the
    dict's other entries are kept as they are). The caller's arrays are not modified.

    Raises:
        ValueError: a perturbation that does not fit the inputs (naming the field).
    """
    if not isinstance(config, TransferConfig):
        raise TypeError(f"config must be a TransferConfig. Received: {type(config).__name__}")
    images = config.shift or config.noise or config.mixup
    if images:
        if isinstance(x, dict):
            raise ValueError(
                "transfer.shift / noise / mixup need array inputs; for dict (token) inputs use "
                f"transfer.token_mask. Received: a dict with keys {sorted(x)}"
            )
        x = _perturb_images(np.asarray(x), config, rng)
    if config.token_mask:
        x = _mask_tokens(x, config, rng)
    return x


class TransferData(keras.utils.PyDataset):
    """Batches of a transfer set, for `fit`: every batch's inputs perturbed afresh.

    What batch `i` holds is a pure function of `(seed, first_step + i)` (and of the source),
    whatever Keras prefetches, so a resumed fit perturbs as the uninterrupted one did. The
    perturbation runs in NumPy as the batch is fed (backend-neutral: the same batches under
    TensorFlow and JAX); a `Distiller` fitting on it runs the teacher on the perturbed batch
    in the same train step.

    Args:
        x: training inputs (an array or a dict of arrays), shuffled per epoch from
            `(seed, epoch)`; or a dataset of `(x, y)` batches (a `keras.utils.PyDataset` or any
            sequence with `len` and indexing), perturbed in its own order (`y` must be None).
        y: integer labels, kept as they are (arrays input only).
        config: the `TransferConfig`.
        batch_size: batch size for arrays input (>= 1).
        epochs: epochs this dataset spans for arrays input (`fit` gets
            `steps_per_epoch=data.steps_per_epoch`, `shuffle=False`).
        seed: the seed of the order and of the perturbations.
        first_step: the global index of batch 0 (a resumed fit: the steps already run; with
            arrays, its epochs count from `first_step // steps_per_epoch`).

    Raises:
        TypeError: `config` is not a `TransferConfig`.
        ValueError: a bad batch size or epoch count, or `y` with a dataset `x`.
    """

    def __init__(self, x, y=None, *, config, batch_size=32, epochs=1, seed=0, first_step=0):
        super().__init__(workers=1, use_multiprocessing=False)
        if not isinstance(config, TransferConfig):
            raise TypeError(f"config must be a TransferConfig. Received: {type(config).__name__}")
        self.config, self.seed, self.first_step = config, int(seed), int(first_step)
        self._source = None
        if y is None:
            if isinstance(x, (np.ndarray, dict)):
                raise ValueError("TransferData needs labels y with array inputs. Received: None")
            self._source = x
            self.steps_per_epoch = int(getattr(x, "steps_per_epoch", len(x)))
            return
        if isinstance(x, keras.utils.PyDataset):
            raise ValueError("TransferData takes y only with array inputs; a dataset has its own.")
        for name, v in (("batch_size", batch_size), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1. Received: {name}={v!r}")
        self.x, self.y, self.batch_size, self.epochs = x, np.asarray(y), batch_size, epochs
        self.steps_per_epoch = int(np.ceil(len(self.y) / batch_size))
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        if self._source is not None:
            return len(self._source)
        return self.epochs * self.steps_per_epoch

    def _clean_batch(self, index: int):
        if self._source is not None:
            return self._source[index]
        epoch, b = divmod(self.first_step + index, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.y)))
        idx = self._order[1][b * self.batch_size : (b + 1) * self.batch_size]
        x = (
            {k: np.asarray(v)[idx] for k, v in self.x.items()}
            if isinstance(self.x, dict)
            else (np.asarray(self.x)[idx])
        )
        return x, self.y[idx]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range [0, {len(self)})")
        x, y, *rest = self._clean_batch(index)
        rng = np.random.default_rng([self.seed, self.first_step + index, _TRANSFER_STREAM])
        return (perturb(x, self.config, rng), y, *rest)
