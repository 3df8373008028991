"""Knowledge distillation: fine-tune a pruned / factorized / LoRA student on a teacher's outputs.

Built on Keras' own `keras.distillation` API: `distill_fit` wraps the student and the teacher in a
`keras.distillation.Distiller` and fits it, so the teacher's forward pass runs inside the same
`fit` (an energy window around the fit counts it) and every keras_lean wrapper (pruning masks,
LoRA, low-rank layers) trains as in a plain `fit`.

The loss, with `alpha` and `temperature` (Hinton et al., 2015):

    loss = (1 - alpha) * CE(y, student) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

where `t`, `s` are the teacher's and the student's logits. For models whose outputs are softmax
probabilities (keras_lean's built-in classifiers), `log(p)` stands in for the logits: it differs
from them by one constant per sample, which the softmax ignores, so the loss is the same.

Why the default temperature is 1: a teacher trained to ~100 % on its training split (the digits
CNN) puts its wrong classes 17 to 33 nats below the right one, and those tail log-probabilities
are fit noise, not "dark knowledge". At T >= 2 the soft targets are dominated by them (the KL
term approaches logit matching), and a narrow student spends its capacity copying them: measured
on the digits CNN at structured 70 %, 10 fine-tune epochs, paired with labels alone (same seed,
same start): alpha 0.5 / T 4 lost 1.7 pt, alpha 0.9 / T 4 2.8 pt, alpha 0.5 / T 2 0.3 to 1.4 pt;
at T 1 distillation is within one validation sample of labels alone (scripts/bench_deploy.py).
Raise the temperature for a teacher whose outputs are soft on the training data (label
smoothing, augmentation, a teacher trained on other data).

Where distillation cannot help: the digits baseline's outputs on its own training split put a mean
1e-3 to 1e-2 of probability on the wrong classes, so at T 1 the KL term equals the labels'
cross-entropy to that precision and the student follows the labels-only trajectory; at T 4 the
soft targets carry 18 to 24 % of wrong-class mass, the tail ranking above. Measured at settings
where labels alone lose accuracy (structured 70 % / 2 epochs, 80 % / 2, 90 % / 3, Adam 5e-4,
seeds 0 1 2, paired): T 1 recovered 0 % (within one validation sample of labels alone
everywhere), T 4 lost a further 4 to 29 points. The field's gains from distillation (Minitron)
come with teachers whose outputs are soft where the student trains: large transfer sets, data
beyond the labelled split.

The transfer set (`DistillConfig(transfer=TransferConfig(...))`, recipe `distill.transfer`;
`keras_lean.distill_transfer`): the fit is fed `TransferData`, batches of the training inputs
perturbed afresh at every step (image shifts, Gaussian noise, mixup within the batch; token
masking for text), so the `Distiller` runs the teacher on the very batch the student sees, in the
same train step (its forward energy stays in the fit). The perturbation runs in NumPy as each
batch is fed (a `keras.utils.PyDataset`: backend-neutral, and a pure function of `(seed, step)`,
so a resumed fit perturbs as the uninterrupted one). The labels are kept. On the digits baseline
(seed 0), the teacher's wrong-class mass on its training split is 1.1 % clean, 3.0 % under noise
0.1 (accuracy 98.1 %), 7.9 % under mixup 0.4 (94.2 %) and 48.8 % under 1-pixel shifts (53.0 %:
an 8x8 digit does not survive a shift), so the transfer set does make its outputs soft.

It does not make distillation recover what labels alone lose, measured paired (same start,
epochs, Adam 1e-3, batch 32, perturbed batches identical between the two augmented arms) with
`scripts/bench_deploy.py --distill-only --seeds 0 1 2`, three arms: labels alone, labels alone on
the same transfer set, distilled on it (alpha 0.5). Share of the labels-alone loss recovered by
distillation, seeds 0 / 1 / 2 (the augmentation alone in brackets; 1 validation sample = 0.28 pt):

    structured 70 % / 2 epochs (labels alone -1.67 / -3.62 / -1.39 pt):
      mixup 0.4, T 1:  17 / 31 / 40 %   (aug alone 50 / 23 / -60 %)
      noise 0.1, T 1:  17 /  8 /  0 %   (67 / 23 / -20 %)
      shift 1,   T 1: -67 /  8 / -60 %  (-83 / -31 / -60 %)
    structured 80 % / 2 epochs (-6.13 / -5.85 / -2.23 pt):
      mixup T 1: -23 / -5 / -37 %; noise T 1: 23 / 5 / -25 %; shift T 1: -109 / -5 / -112 %
    structured 90 % / 3 epochs (-11.42 / -12.81 / -12.26 pt):
      mixup T 1: -29 / -2 / -25 %; noise T 1: -5 / -2 / -14 %; shift T 1: -168 / -235 / -68 %
    at T 4 every transfer set lost a further 0.8 to 57 pt against labels alone
    structured 70 % / 20 epochs (labels alone +0.84 / -0.84 / +0.00 pt: only seed 1 lost, 3
      samples): mixup T 1 recovered 67 % of seed 1's loss (+0.56 pt), T 2 33 %; noise T 2 33 %,
      T 1 -100 %; clean inputs T 1 -67 %, T 2 0 %

So the best setting (mixup 0.4, T 1) recovers 17 to 40 % at 70 % / 2 epochs, at most 23 % (noise)
at 80 % and nothing at 90 %: under the 1/2 target everywhere but one 3-sample loss. At these
settings labels alone lose because 2 or 3 epochs do not re-train a network one-shot pruning left
at 9 to 61 % accuracy: an optimisation deficit, which soft targets (a weaker gradient than one-hot
labels) do not shorten; at 20 epochs labels alone lose at most 3 validation samples, below what a
paired comparison on 359 samples resolves. The transfer set stays off by default.

Intermediate layers (`DistillConfig(hidden=..., hidden_layers=...)`, recipe `distill.hidden`;
`keras_lean.distill_features`): the distillation share becomes `T^2 * KL + hidden * mean NMSE`,
the normalised MSE between the student's and the teacher's outputs of the layers the two share
by name (every keras-hub transformer block, else every weighted layer but the output one); a
structurally pruned layer is compared with the teacher's channels it kept
(`keras_lean.structured.kept_output_channels`).

Example:
    >>> from keras_lean.distill import DistillConfig, TransferConfig, distill_fit
    >>> result = distill_fit(pruned, baseline, x_train, y_train,
    ...                      config=DistillConfig(alpha=0.5, temperature=1.0), epochs=3)
    >>> result.history.history["distillation_loss"][-1]
    >>> on_mixup = DistillConfig(transfer=TransferConfig(mixup=0.4))  # a transfer set
    >>> with_blocks = DistillConfig(hidden=1.0)  # logits + every transformer block's output
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_lean.distill_features import distilled_layers, feature_losses
from keras_lean.distill_transfer import (
    TransferConfig,
    TransferData,
    checked_dict,
)

# Floor of the probabilities before the log: small, so that the ranking of the wrong classes (the
# "dark knowledge", often 1e-9 and below for a confident teacher) survives; float32 holds 1e-30.
_EPS = 1e-30


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the teacher.

    Attributes:
        alpha: weight of the distillation term, in [0, 1]; the labels' cross-entropy gets
            `1 - alpha` (0: no distillation, 1: the teacher's outputs only).
        temperature: softmax temperature (> 0) applied to both models' logits; higher values
            pass more of the teacher's ranking of the wrong classes. The KL term is scaled by
            `temperature ** 2` so its gradients keep their size. Default 1: for an overconfident
            teacher, higher values mostly pass fit noise (see the module docstring).
        transfer: a `TransferConfig` (or its dict): the student and the teacher see perturbed
            training inputs; None (default): the clean training inputs.
        hidden: weight (>= 0) of the intermediate-layer term inside the distillation share:
            the loss becomes `(1 - alpha) * CE + alpha * (T^2 * KL + hidden * mean NMSE)`, the
            mean over the distilled layers of the normalised MSE between the student's layer
            outputs and the teacher's (`keras_lean.distill_features`); 0 (default): logits
            only. Needs `alpha > 0`.
        hidden_layers: names of the layers to distil (the same in both models); None: every
            keras-hub transformer block the two share, else every weighted layer they share but
            the output layer. A structurally pruned layer is compared with the teacher's channels
            it kept.
    """

    alpha: float = 0.5
    temperature: float = 1.0
    transfer: TransferConfig | None = None
    hidden: float = 0.0
    hidden_layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be a number. Received: alpha={self.alpha!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]. Received: alpha={self.alpha}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(
                f"temperature must be a number. Received: temperature={self.temperature!r}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0. Received: temperature={self.temperature}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, (int, float)):
            raise TypeError(f"hidden must be a number. Received: hidden={self.hidden!r}")
        if not self.hidden >= 0:
            raise ValueError(f"hidden must be >= 0. Received: hidden={self.hidden}")
        if self.hidden > 0 and self.alpha == 0:
            raise ValueError(
                f"hidden={self.hidden} needs alpha > 0 (the hidden-state term is part of the "
                "distillation share, which alpha 0 switches off). Received: alpha=0"
            )
        if self.hidden_layers is not None:
            names = (
                (self.hidden_layers,)
                if isinstance(self.hidden_layers, str)
                else tuple(self.hidden_layers)
            )
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    "hidden_layers must be None or a non-empty list of layer names. "
                    f"Received: {self.hidden_layers!r}"
                )
            object.__setattr__(self, "hidden_layers", names)
        if isinstance(self.transfer, dict):
            object.__setattr__(self, "transfer", TransferConfig.from_dict(self.transfer))
        elif self.transfer is not None and not isinstance(self.transfer, TransferConfig):
            raise TypeError(
                "transfer must be a TransferConfig, a dict or None. "
                f"Received: {type(self.transfer).__name__}"
            )

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "transfer": None if self.transfer is None else self.transfer.to_dict(),
            "hidden": self.hidden,
            "hidden_layers": None if self.hidden_layers is None else list(self.hidden_layers),
        }

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        """The inverse of `to_dict`; an unknown key is an error naming it."""
        return cls(**checked_dict(cls, data, "distill"))


@keras.saving.register_keras_serializable(package="keras_lean")
class ProbabilityDistillation(keras.distillation.LogitsDistillation):
    """`LogitsDistillation` for models that output softmax probabilities.

    `log(p)` equals the logits up to a per-sample constant, which the temperature softmax
    cancels, so the KL term is the one `LogitsDistillation` computes on logits.

    Args:
        temperature: the softmax temperature (> 0).
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__(temperature=temperature, loss=keras.losses.KLDivergence())

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        def as_logits(p):
            return keras.ops.log(keras.ops.clip(p, _EPS, 1.0))

        return super().compute_loss(
            keras.tree.map_structure(as_logits, teacher_outputs),
            keras.tree.map_structure(as_logits, student_outputs),
            **kwargs,
        )

    def get_config(self) -> dict:
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config: dict) -> ProbabilityDistillation:
        return cls(**config)


def distillation_loss(config: DistillConfig, *, from_logits: bool):
    """The `keras.distillation` loss for `config`: `LogitsDistillation` on logits, else
    `ProbabilityDistillation`."""
    if from_logits:
        # A KLDivergence *instance*: Keras 3.15 resolves the string "kl_divergence" (the default)
        # to the bare function, which skips the temperature softmax and takes KL of raw logits.
        return keras.distillation.LogitsDistillation(
            temperature=float(config.temperature), loss=keras.losses.KLDivergence()
        )
    return ProbabilityDistillation(temperature=float(config.temperature))


def outputs_are_probabilities(model: keras.Model, x: Any) -> bool:
    """True when `model`'s outputs on a few samples of `x` are rows that sum to one in [0, 1]."""
    out = np.asarray(model.predict(x[:64], verbose=0), dtype="float64")
    return bool(
        np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6) and np.allclose(out.sum(-1), 1, atol=1e-3)
    )


def make_distiller(
    student: keras.Model,
    teacher: keras.Model,
    config: DistillConfig,
    *,
    from_logits: bool,
) -> keras.distillation.Distiller:
    """A `keras.distillation.Distiller` over `student` and `teacher` (not compiled).

    Keras' `Distiller` sets `teacher.trainable = False`; `distill_fit` restores it afterwards.

    Raises:
        TypeError: `config` is not a `DistillConfig`.
        ValueError: the models' inputs or outputs differ in shape or dtype (Keras' check).
    """
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig. Received: {type(config).__name__}")
    losses = [distillation_loss(config, from_logits=from_logits)]
    weights = [1.0]
    if config.hidden > 0:
        teacher, hidden, _ = feature_losses(teacher, student, config.hidden_layers)
        losses += hidden
        weights += [float(config.hidden) / len(hidden)] * len(hidden)
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=losses,
        distillation_loss_weights=weights,
        student_loss_weight=1.0 - float(config.alpha),
        name=f"distill_{student.name}",
    )
    _freeze_teacher(distiller, student)
    return distiller


def _freeze_teacher(distiller: keras.distillation.Distiller, student: keras.Model) -> None:
    """Makes the student's variables the only trainable ones of `distiller`.

    Keras freezes the teacher but not the feature extractor it built over it. With a teacher
    that was frozen before (a second distiller over the same teacher), its flattened copy is
    rebuilt from configs that say `trainable: False`, and in keras-hub blocks the sublayers made
    at build time keep trainable variables that no `trainable` setter reaches: the optimizer
    then trained the teacher's copy towards the student (on MiniLM the student never left chance
    accuracy). So every variable the extractor holds is frozen, and anything else trainable
    that is not the student's is an error.
    """
    from keras_lean._keras_internals import teacher_feature_extractor

    extractor = teacher_feature_extractor(distiller)
    if extractor is not None:
        extractor.trainable = False
        for v in extractor.variables:  # the flags a layer's setter did not reach
            v.trainable = False
    own = {id(v) for v in student.trainable_variables}
    extra = [v.path for v in distiller.trainable_variables if id(v) not in own]
    if extra:
        raise RuntimeError(
            f"The distiller would train {len(extra)} variables that are not the student's "
            f"(e.g. {extra[:3]}); the teacher must stay frozen."
        )


def compile_distiller(
    student: keras.Model,
    teacher: keras.Model,
    config: DistillConfig,
    *,
    from_logits: bool,
    optimizer: Any = "adam",
    loss: Any = None,
    metrics: Sequence[Any] = ("accuracy",),
    jit_compile: Any = "auto",
) -> keras.distillation.Distiller:
    """A compiled `Distiller`, ready for `fit`; the student is compiled with the same optimizer.

    Compiling the student too means that saving it (a checkpoint callback saves the student,
    not the distiller) keeps the optimizer's state, so a resumed fit continues exactly; pass
    that restored `student.optimizer` back as `optimizer` to resume.

    Args:
        student: the model to train.
        teacher: the frozen reference.
        config: alpha and temperature.
        from_logits: the models output logits (True) or probabilities (False).
        optimizer: name or instance, shared by the distiller and the student.
        loss: the labels' loss (default sparse categorical cross-entropy).
        metrics: metrics on the student's outputs.
        jit_compile: passed to the distiller's `compile`.

    Returns:
        The `keras.distillation.Distiller`; Keras has set `teacher.trainable = False`.
    """
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    optimizer = keras.optimizers.get(optimizer)
    distiller = make_distiller(student, teacher, config, from_logits=from_logits)
    distiller.compile(
        optimizer=optimizer, loss=loss, metrics=list(metrics), jit_compile=jit_compile
    )
    student.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
    return distiller


@dataclasses.dataclass
class DistillResult:
    """What `distill_fit` ran.

    Attributes:
        student: the student, trained in place (the same object that was passed).
        history: the `History` of the fit (losses `student_loss`, `distillation_loss`,
            `total_loss`, and the metrics).
        config: the distillation settings.
        from_logits: whether the outputs were treated as logits.
        teacher_forward_flops: the teacher's forward FLOPs per sample (None when the counter
            cannot count it); one teacher forward pass runs per training sample.
        samples_seen: training samples the fit ran (epochs x samples), when known.
        distilled_layers: the layers the hidden-state term compared (`distilled_layers`).
    """

    student: keras.Model
    history: Any
    config: DistillConfig
    from_logits: bool
    teacher_forward_flops: int | None = None
    samples_seen: int | None = None
    distilled_layers: list = dataclasses.field(default_factory=list)

    @property
    def teacher_flops(self) -> float | None:
        """FLOPs the teacher spent in the fit (forward passes only)."""
        if self.teacher_forward_flops is None or self.samples_seen is None:
            return None
        return float(self.teacher_forward_flops) * self.samples_seen

    def to_dict(self) -> dict:
        return {
            **self.config.to_dict(),
            "from_logits": self.from_logits,
            "teacher_forward_flops": self.teacher_forward_flops,
            "samples_seen": self.samples_seen,
            "teacher_flops": self.teacher_flops,
            "distilled_layers": list(self.distilled_layers),
        }


def teacher_forward_flops(teacher: keras.Model) -> int | None:
    """The teacher's forward FLOPs per sample, or None when keras_lean's counter cannot count it."""
    try:
        from keras_lean.flops import count_flops

        return int(count_flops(teacher).total)
    except Exception:  # an exotic layer the counter rejects must not stop the distillation
        return None


def distill_fit(
    student: keras.Model,
    teacher: keras.Model,
    x: Any,
    y: Any = None,
    *,
    config: DistillConfig | None = None,
    from_logits: bool | None = None,
    optimizer: Any = "adam",
    loss: Any = None,
    metrics: Sequence[Any] = ("accuracy",),
    jit_compile: Any = "auto",
    transfer_seed: int | None = None,
    **fit_kwargs: Any,
) -> DistillResult:
    """Fits `student` on the labels and on `teacher`'s outputs, in one Keras `fit`.

    The student is trained in place, as `student.fit` would; the teacher is frozen during the
    fit and its `trainable` flag restored after.

    Args:
        student: the model to train (pruned, factorized, LoRA-wrapped, ...).
        teacher: the trained reference (typically the baseline) with the same inputs and output
            shape.
        x: training inputs (array, dict of arrays or a `tf.data.Dataset` of (x, y)).
        y: integer labels (None when `x` is a dataset).
        config: `DistillConfig` (default alpha 0.5, temperature 1).
        from_logits: the models output logits (True) or softmax probabilities (False); None:
            look at the teacher's outputs on the first samples of `x` (arrays only).
        optimizer: the student's optimizer (name or instance).
        loss: the labels' loss (default sparse categorical cross-entropy, `from_logits`).
        metrics: metrics on the student's outputs.
        jit_compile: passed to `compile`.
        transfer_seed: with `config.transfer`, the seed of the transfer set's order and
            perturbations (None: drawn from NumPy's global generator, which
            `keras.utils.set_random_seed` fixes).
        **fit_kwargs: passed to `fit` (`epochs`, `batch_size`, `callbacks`,
            `validation_data`, ...). With `config.transfer`, the inputs are fed as
            `TransferData` (arrays: shuffled per epoch; `validation_split` is refused).

    Returns:
        A `DistillResult`.

    Raises:
        TypeError: `student` or `teacher` is not a Keras model, or `config` is not a
            `DistillConfig`.
        ValueError: `from_logits=None` with dataset inputs, incompatible models, or a
            transfer set over inputs it cannot perturb.
    """
    for name, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, keras.Model):
            raise TypeError(f"{name} must be a keras.Model. Received: {type(m).__name__}")
    config = DistillConfig() if config is None else config
    if from_logits is None:
        if not isinstance(x, np.ndarray):
            raise ValueError(
                "from_logits=None can only be detected from array inputs; pass from_logits=True "
                "(the models output logits) or False (softmax probabilities)."
            )
        from_logits = not outputs_are_probabilities(teacher, x)
    samples = None
    if isinstance(x, np.ndarray):
        kept = 1.0 - float(fit_kwargs.get("validation_split") or 0.0)
        samples = int(len(x) * kept)
    if config.transfer is not None and config.transfer.enabled:
        x, y, fit_kwargs = _transfer_fit_args(x, y, config.transfer, transfer_seed, fit_kwargs)
    was_trainable = teacher.trainable
    try:
        distiller = compile_distiller(
            student,
            teacher,
            config,
            from_logits=from_logits,
            optimizer=optimizer,
            loss=loss,
            metrics=metrics,
            jit_compile=jit_compile,
        )
        history = distiller.fit(x, y, **fit_kwargs)
    finally:
        teacher.trainable = was_trainable
    epochs = len(history.epoch) if history is not None else 0
    samples = None if samples is None else epochs * samples
    return DistillResult(
        student=student,
        history=history,
        config=config,
        from_logits=bool(from_logits),
        teacher_forward_flops=teacher_forward_flops(teacher),
        samples_seen=samples,
        distilled_layers=distilled_layers(distiller),
    )


def _transfer_fit_args(x, y, transfer: TransferConfig, seed: int | None, fit_kwargs: dict):
    """`fit`'s inputs and arguments with `x` fed as a `TransferData`."""
    fit_kwargs = dict(fit_kwargs)
    if fit_kwargs.pop("validation_split", None):
        raise ValueError(
            "a transfer set cannot take validation_split (its batches are drawn per step); "
            "pass validation_data instead."
        )
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1))
    if isinstance(x, (np.ndarray, dict)):
        epochs = int(fit_kwargs.get("epochs", 1))
        initial = int(fit_kwargs.get("initial_epoch", 0))
        batch_size = int(fit_kwargs.pop("batch_size", None) or 32)
        steps = -(-len(y) // batch_size)
        data = TransferData(
            x, y, config=transfer, batch_size=batch_size, epochs=epochs - initial, seed=seed,
            first_step=initial * steps,
        )  # fmt: skip
        fit_kwargs.update(steps_per_epoch=data.steps_per_epoch, shuffle=False)
        return data, None, fit_kwargs
    if y is not None or not hasattr(x, "__getitem__") or not hasattr(x, "__len__"):
        raise ValueError(
            "a transfer set takes arrays (x, y) or a keras.utils.PyDataset of (x, y) batches. "
            f"Received: x of type {type(x).__name__}"
        )
    return TransferData(x, config=transfer, seed=seed), None, fit_kwargs


@dataclasses.dataclass
class Teacher:
    """A teacher bound to its settings, for a training loop that fits many times (stages,
    segments, resumes): each `compile(student, ...)` gives a fresh compiled `Distiller`.

    Attributes:
        model: the teacher model (frozen while a distiller over it trains).
        config: alpha and temperature.
        from_logits: the models output logits (True) or softmax probabilities (False).
        source: where the teacher came from (e.g. `"baseline"`), for reports.
    """

    model: keras.Model
    config: DistillConfig
    from_logits: bool
    source: str = "teacher"
    _flops: list = dataclasses.field(default_factory=list, init=False, repr=False)
    _layers: list = dataclasses.field(default_factory=list, init=False, repr=False)

    def compile(self, student: keras.Model, **kwargs: Any) -> keras.distillation.Distiller:
        """`compile_distiller(student, self.model, self.config, from_logits=..., **kwargs)`;
        the layers its hidden-state term compares are kept for `to_dict` (the last fit's)."""
        distiller = compile_distiller(
            student, self.model, self.config, from_logits=self.from_logits, **kwargs
        )
        self._layers[:] = distilled_layers(distiller)
        return distiller

    def transfer_data(self, data: Any, *, seed: int, first_step: int = 0) -> Any:
        """`data` (a dataset of `(x, y)` batches) as the config's transfer set, or `data`
        itself when the config has none; `first_step`: the global index of its first batch."""
        transfer = self.config.transfer
        if transfer is None or not transfer.enabled:
            return data
        return TransferData(data, config=transfer, seed=seed, first_step=first_step)

    @property
    def forward_flops(self) -> int | None:
        """The teacher's forward FLOPs per sample (counted once), or None."""
        if not self._flops:  # counted on first use: [flops or None]
            self._flops.append(teacher_forward_flops(self.model))
        return self._flops[0]

    def to_dict(self) -> dict:
        return {
            "teacher": self.source,
            **self.config.to_dict(),
            "from_logits": self.from_logits,
            "teacher_forward_flops": self.forward_flops,
            "distilled_layers": list(self._layers),
        }
