"""Step 3: apply the recipe's methods while fine-tuning; writes `RUN/finetuned.keras`.

    finetune(run)
      -> FinetuneContext (recipe, data, plan, strategy, resume point, extra callbacks)
      -> _stage("finetune"): load + prepare -> XLA choice -> train (or guard stages) -> record

`FinetuneContext.callbacks` is where a caller adds Keras callbacks to the fine-tune fit (a
progress bar, an interrupt handler) without touching this loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from keras_lean import _backend
from keras_lean.pipeline.data import check_data_against_model
from keras_lean.pipeline.lock import run_lock
from keras_lean.pipeline.methods.base import Data, FinetunePlan
from keras_lean.pipeline.models import load_model
from keras_lean.pipeline.recipe import Recipe, load_recipe
from keras_lean.pipeline.resume import EpochOrderedData
from keras_lean.pipeline.rundir import RunDir, save_model_atomic
from keras_lean.pipeline.steps import checkpoint
from keras_lean.pipeline.steps.common import (
    StageResult,
    as_run,
    classification_loss,
    evaluate,
    fill_sizes,
    finalize_chain,
    forward_flops,
    jsonable,
    load_method_states,
    load_run_data,
    save_method_states,
    stage_result,
)
from keras_lean.pipeline.steps.jit import JitDecision, jit_choice
from keras_lean.pipeline.steps.precision import with_mixed_precision
from keras_lean.pipeline.steps.stage import StageRecorder, _stage
from keras_lean.pipeline.strategy import get_strategy

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from keras_lean.energy import EnergyTracker


class PipelineFit:
    """The `fit` handed to `Method.finetune` (the method contract's `FitFn`).

    Calling it compiles the model with the recipe's optimizer, loss and XLA choice under the
    run's strategy, and trains on the run's data: `fit(model, epochs=None, callbacks=(),
    initial_epoch=0)`. A method that compiles and trains by itself (lottery) reads the same
    settings from its attributes, so its training matches the pipeline's.

    The training data goes in as `EpochOrderedData`: each epoch's sample order and dropout seeds
    are drawn from `(seed, epoch)`, so a run resumed from an epoch's checkpoint repeats exactly
    what the uninterrupted run does (see `keras_lean.pipeline.resume`).

    With a `teacher` (recipe `distill`), each call fits a `keras.distillation.Distiller` over
    the model instead (`keras_lean.distill`): the same data, optimizer and callbacks, the
    teacher's forward pass inside the same fit; checkpoints save the student.

    Attributes:
        loss: the run's loss.
        jit_compile: the run's XLA decision.
        verbose: Keras progress output.
        teacher: the `keras_lean.distill.Teacher`, or None (no distillation).
        epoch_end: for a method that runs its own loop: `epoch_end(epoch, model,
            method_state)` writes the per-epoch checkpoint (None in a guarded run).
        method_state: when resuming, the `method_state` saved with the checkpoint, else None.
        started_from: when resuming, a function loading the baseline the run started from.
        interrupt: for a method that runs its own loop: the Ctrl-C handling the caller asked
            for (`interrupt.StepInterrupt`, when an `interrupt_callback()` is among the
            step's callbacks), else None.
    """

    def __init__(
        self,
        *,
        data,
        learning_rate,
        loss,
        jit_compile,
        batch_size,
        epochs,
        strategy,
        tracker,
        verbose,
        keep_compiled=None,
        seed=0,
        teacher=None,
    ):
        self._data = data
        self._learning_rate = learning_rate
        self._batch_size = batch_size
        self._epochs = epochs
        self._strategy = strategy
        self._tracker = tracker
        self._keep_compiled = keep_compiled
        self.seed = seed  # a method that runs its own loop orders its data by it too
        self.loss = loss
        self.jit_compile = jit_compile
        self.verbose = verbose
        self.teacher = teacher
        # A method that runs its own loop checkpoints and resumes through these (set by
        # `_train`): `epoch_end(epoch, model, method_state)` saves the per-epoch checkpoint,
        # `method_state` is the state saved with the checkpoint being resumed (else None),
        # `started_from()` loads the model the fine-tune started from (the baseline).
        self.epoch_end = None
        self.method_state = None
        self.started_from = None
        self.interrupt = None

    def optimizer(self):
        """A fresh Adam at the recipe's learning rate."""
        import keras

        return keras.optimizers.Adam(self._learning_rate)

    def scope(self):
        """The run's distribution-strategy scope (create variables under it)."""
        return self._strategy.scope()

    def energy_window(self, name: str):
        """Measures a block as an energy window nested in the stage's.

        Returns a context manager yielding the `Window`; its `record` (energy_j, duration_s) is
        set when the block ends.
        """
        return self._tracker.window(name)

    def energy_callback(self):
        """A Keras callback recording each epoch's energy (nested in the open window)."""
        return self._tracker.callback()

    def _distiller(self, m, optimizer):
        import keras

        with self._strategy.scope():
            return self.teacher.compile(
                m,
                optimizer=optimizer,
                loss=self.loss,
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                jit_compile=self.jit_compile,
            )

    def __call__(self, m, epochs=None, callbacks=(), initial_epoch=0):
        import keras

        target = m  # what fits: the model, or a distiller over it
        if self._keep_compiled is not None and m is self._keep_compiled:
            self._keep_compiled = None  # a resumed model keeps its restored optimizer state
            m.jit_compile = self.jit_compile
            if self.teacher is not None:
                target = self._distiller(m, m.optimizer or self.optimizer())
        elif self.teacher is not None:
            target = self._distiller(m, self.optimizer())
        else:
            with self._strategy.scope():
                m.compile(
                    optimizer=self.optimizer(),
                    loss=self.loss,
                    metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                    jit_compile=self.jit_compile,
                )
        ds = self._data
        if target is m:  # one trace of the first step, not two (variables built before it)
            with self._strategy.scope():
                _backend.build_train_state(m, ds.x_train, ds.y_train)
        epochs = epochs if epochs is not None else self._epochs
        if initial_epoch >= epochs:  # resumed after the last epoch: nothing left to train
            return target.fit(
                ds.x_train, ds.y_train, epochs=epochs, initial_epoch=initial_epoch, verbose=0
            )
        data = EpochOrderedData(
            ds.x_train,
            ds.y_train,
            batch_size=self._batch_size,
            seed=self.seed,
            initial_epoch=initial_epoch,
            epochs=epochs,
        )
        callbacks = [data.callback(), *callbacks]
        if target is not m:  # distilled: perturbed batches when the recipe has a transfer set
            data = self.teacher.transfer_data(
                data, seed=self.seed, first_step=initial_epoch * data.steps_per_epoch
            )
        return target.fit(
            data,
            steps_per_epoch=data.steps_per_epoch,
            shuffle=False,
            epochs=epochs,
            validation_data=(ds.x_val, ds.y_val),
            callbacks=callbacks,
            initial_epoch=initial_epoch,
            verbose=self.verbose,
        )


@dataclasses.dataclass
class FinetuneContext:
    """Everything one fine-tune works with, handed from stage to stage of the step.

    Attributes:
        run: the run folder.
        recipe: the parsed `recipe.yaml`.
        data: the run's data.
        plan: epochs, steps per epoch and batch size (what schedules span).
        methods: the recipe's `Method` instances, in ascending order.
        loss: the run's loss (logits or probabilities, as the baseline outputs).
        strategy_name: the `tf.distribute` strategy's name.
        strategy: the strategy itself.
        digest: the recipe's hash (a checkpoint resumes only its own recipe).
        resume: where training starts (`checkpoint.ResumePoint`).
        verbose: Keras progress output.
        callbacks: extra Keras callbacks for the fine-tune fit (progress, interrupt handling).
        tracker: the stage's energy tracker (set when the stage opens).
        fit: the `PipelineFit` (set once the XLA choice is made).
        method_reports: name -> what each method reported (filled as the step goes).
        gate_metric: what the run is judged by (`text.gate_metric`): `accuracy`, or
            `perplexity` for a causal LM (the guard's stages and early stopping follow it).
        stage_gate: a guarded run's `guard.StageGate` (set with the baseline's figures).
    """

    run: RunDir
    recipe: Recipe
    data: Data
    plan: FinetunePlan
    methods: list
    loss: Any
    strategy_name: str
    strategy: Any
    digest: str
    resume: checkpoint.ResumePoint
    verbose: int = 1
    callbacks: Sequence = ()
    tracker: EnergyTracker | None = None
    fit: PipelineFit | None = None
    method_reports: dict = dataclasses.field(default_factory=dict)
    gate_metric: str = "accuracy"
    stage_gate: Any = None


def finetune(
    out: str | os.PathLike | RunDir,
    *,
    resume: bool = False,
    strategy: str | None = None,
    data: str | os.PathLike | None = None,
    val_split: float | None = None,
    verbose: int = 1,
    callbacks: Sequence = (),
) -> StageResult:
    """Step 3: applies the recipe's methods and fine-tunes; writes `RUN/finetuned.keras`.

    The methods' `prepare` runs in ascending order (wrapping, transforming); one `fit` then
    trains (or the method that owns the loop, e.g. lottery, runs it). After every epoch the model
    is checkpointed atomically to `RUN/checkpoint.keras`; `resume=True` continues from it (the
    pruning step, masks and optimizer state included). Each method then saves the state deploy
    needs in `RUN/methods/` (`Method.save_state`).

    With `recipe.guard.stages`, the pruning method runs in stages instead (see
    `keras_lean.pipeline.guard`): each stage is validated against the baseline by the run's gate
    metric (accuracy drop within `max_metric_drop.accuracy`; for a causal LM, perplexity rise
    within `max_metric_drop.perplexity`), the last stage within budget is kept (the baseline if
    none is), and every stage is recorded under `details.guard`. Guarded runs are not
    checkpointed per epoch.

    Args:
        out: the run folder (must hold `baseline.keras` and `recipe.yaml`).
        resume: continue from the last checkpoint if there is one for this recipe.
        strategy: override the run's `tf.distribute` strategy.
        data: override the run's data (must have the same shapes).
        val_split: override the run's validation split.
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).
        callbacks: extra Keras callbacks for the fine-tune fit (not for guard stages or a
            method that runs its own loop; an `interrupt_callback()` among them also stops
            such a loop at Ctrl-C, after a step, as `TrainingInterrupted`).

    Returns:
        A `StageResult` (artifact `finetuned`).

    Raises:
        MissingStepError: no baseline or recipe yet.
        ValueError: invalid recipe, data that does not fit the model, or a checkpoint made with
            a different recipe.
    """
    run = as_run(out)
    # Taken before anything heavy, so a second fine-tune of this folder is refused at once.
    with run_lock(run.root, "finetune") as lock:
        import keras

        ctx = _context(run, resume, strategy, data, val_split, verbose, callbacks)
        keras.utils.set_random_seed(ctx.recipe.finetune.seed)
        with _stage(ctx.run, "finetune", ctx.run.read_manifest()) as stage:
            ctx.tracker = stage.tracker
            model, baseline_accuracy = _load_and_prepare(ctx)
            jit, probe = jit_choice(ctx, model)
            ctx.fit = _pipeline_fit(ctx, jit, model)
            guard_details = None
            if ctx.recipe.guard.enabled:
                model, epochs_run, guard_details = _run_guard(ctx, model, baseline_accuracy)
            else:
                model, epochs_run = _train(ctx, model)
            _record(ctx, stage, model, epochs_run, jit, probe)
            if lock.note:
                stage.details["lock_note"] = lock.note
            if guard_details is not None:
                stage.details["guard"] = jsonable(guard_details)
    return stage_result("finetune", stage, {"finetuned": str(ctx.run.finetuned)})


def _context(run, resume, strategy, data, val_split, verbose, callbacks) -> FinetuneContext:
    """Reads what the step needs before any work: recipe, data, plan, resume point."""
    run.require(run.baseline, for_step="finetune")
    run.require(run.recipe, for_step="finetune")
    rec = load_recipe(run.recipe)
    manifest = run.read_manifest()
    strategy = strategy or manifest.get("strategy", "default")
    ds = load_run_data(manifest, data, val_split)
    ft = rec.finetune
    digest = checkpoint.recipe_digest(rec)
    return FinetuneContext(
        run=run,
        recipe=rec,
        data=ds,
        plan=FinetunePlan(
            epochs=ft.epochs,
            steps_per_epoch=math.ceil(len(ds.x_train) / ft.batch_size),
            batch_size=ft.batch_size,
        ),
        methods=rec.ordered_methods(),
        loss=classification_loss(bool(manifest.get("from_logits", False))),
        strategy_name=strategy,
        strategy=get_strategy(strategy),
        digest=digest,
        resume=checkpoint.resume_point(
            run, resume=resume, digest=digest, guarded=rec.guard.enabled
        ),
        verbose=verbose,
        callbacks=tuple(callbacks),
        gate_metric=_text_gate_metric(manifest),
    )


def _text_gate_metric(manifest: dict) -> str:
    from keras_lean.pipeline.text import gate_metric

    return gate_metric(manifest)


def _stage_gate(ctx: FinetuneContext, baseline: keras.Model, baseline_accuracy: float):
    """The guard's `StageGate`: the run's gate metric, measured on the baseline as `validate`
    measures it, and the recipe's budget for it."""
    from keras_lean.pipeline.guard import StageGate

    budget = ctx.recipe.metric_budget(ctx.gate_metric)
    if ctx.gate_metric == "accuracy":
        return StageGate("accuracy", lambda m: evaluate(m, ctx.data), baseline_accuracy, budget)
    from keras_lean.pipeline.text import lm_perplexity

    logits = bool(getattr(ctx.loss, "from_logits", True))

    def perplexity(m) -> float:
        return lm_perplexity(m, ctx.data, from_logits=logits)

    return StageGate("perplexity", perplexity, perplexity(baseline), budget)


def _load_and_prepare(ctx: FinetuneContext) -> tuple[keras.Model, float | None]:
    """The model to train (checkpoint, or baseline + methods' `prepare`) and, for a guarded
    run, the baseline's accuracy as `validate` measures it."""
    run, baseline_accuracy = ctx.run, None
    with ctx.strategy.scope():
        if ctx.resume.epoch is not None:
            model = load_model(run.checkpoint, compile=True)
            # What the methods learned in `prepare` (schedules, layer choices) was saved then.
            load_method_states(run, ctx.methods)
            ctx.method_reports = dict(ctx.resume.state.get("methods", {}))
            return model, None
        model = load_model(run.baseline)
        check_data_against_model(ctx.data, model, model_name=str(run.baseline))
        if ctx.recipe.guard.enabled:
            baseline_accuracy = evaluate(model, ctx.data)
            ctx.stage_gate = _stage_gate(ctx, model, baseline_accuracy)
        if ctx.recipe.finetune.mixed_precision:
            model = with_mixed_precision(model)
        if not ctx.recipe.guard.enabled:  # the guard prepares each stage itself
            for method in ctx.methods:
                model = method.prepare(model, ctx.data, ctx.plan)
            save_method_states(run, ctx.methods)  # a resumed run starts from this state
        ctx.method_reports = {m.name: m.report() for m in ctx.methods}
    return model, baseline_accuracy


def _pipeline_fit(ctx: FinetuneContext, jit: JitDecision, model: keras.Model) -> PipelineFit:
    ft = ctx.recipe.finetune
    return PipelineFit(
        data=ctx.data,
        learning_rate=ft.learning_rate,
        loss=ctx.loss,
        jit_compile=jit.jit_compile,
        batch_size=ft.batch_size,
        epochs=ft.epochs,
        strategy=ctx.strategy,
        tracker=ctx.tracker,
        verbose=ctx.verbose,
        keep_compiled=model if ctx.resume.epoch is not None else None,
        seed=ft.seed,
        teacher=_teacher(ctx),
    )


def _teacher(ctx: FinetuneContext):
    """The recipe's `distill` teacher (loaded under the run's strategy), or None."""
    opts = ctx.recipe.distill
    if not opts.enabled:
        return None
    from keras_lean.distill import DistillConfig, Teacher, TransferConfig

    path = ctx.run.baseline if opts.teacher == "baseline" else opts.teacher
    with ctx.strategy.scope():
        model = load_model(path)
    return Teacher(
        model=model,
        config=DistillConfig(
            alpha=opts.alpha,
            temperature=opts.temperature,
            transfer=TransferConfig.from_dict(opts.transfer.to_dict())
            if opts.transfer.enabled
            else None,
            hidden=opts.hidden,
            hidden_layers=opts.hidden_layers or None,
        ),
        from_logits=bool(getattr(ctx.loss, "from_logits", False)),
        source=opts.teacher,
    )


def _train(ctx: FinetuneContext, model: keras.Model) -> tuple[keras.Model, int | None]:
    """One fit with checkpoints and early stopping, or the loop of a method that owns it.

    Returns the trained model and the epochs run.
    """
    state = {"recipe": ctx.digest, "methods": jsonable(ctx.method_reports)}
    callbacks = [checkpoint.epoch_checkpoint(ctx.run, state)]
    for method in ctx.methods:
        callbacks.extend(method.callbacks(ctx.plan))
    early = _early_stopping(ctx)
    if early is not None:
        callbacks.append(early)
    _own_loop_checkpoints(ctx, state)
    for method in ctx.methods:
        owned = method.finetune(model, ctx.data, ctx.plan, ctx.fit)
        if owned is not None:
            return owned, method.report().get("epochs_run")
    history = ctx.fit(
        model,
        callbacks=[*callbacks, *ctx.callbacks, ctx.fit.energy_callback()],
        initial_epoch=ctx.resume.epoch or 0,
    )
    return model, len(history.history.get("loss", []))


def _own_loop_checkpoints(ctx: FinetuneContext, state: dict) -> None:
    """Lets a method that runs its own loop checkpoint every epoch and resume from one, and
    stop at Ctrl-C after a step as the pipeline's fit does (when the caller asked for it)."""
    from keras_lean.pipeline.interrupt import own_loop_interrupt

    run, fit = ctx.run, ctx.fit
    fit.interrupt = own_loop_interrupt(ctx.callbacks, ctx.plan.steps_per_epoch)

    def epoch_end(epoch: int, model, method_state: dict) -> None:
        checkpoint.save_checkpoint(
            run, model, {**state, "epoch": int(epoch), "method_state": jsonable(method_state)}
        )

    fit.epoch_end = epoch_end
    if ctx.resume.epoch is not None:
        fit.method_state = ctx.resume.state.get("method_state")

        def started_from():
            with ctx.strategy.scope():
                return load_model(run.baseline)

        fit.started_from = started_from


def _early_stopping(ctx: FinetuneContext):
    """The recipe's `EarlyStopping` callback (None when it is off).

    With `after_pruning`, it starts only in the epoch after the last method's gradual pruning
    reaches its final target, so a model is never judged while its masks still grow. It watches
    the run's gate metric: validation accuracy, or for a causal LM the validation loss (the mean
    next-token cross-entropy over every position, the log of the perplexity `validate` gates on;
    `min_delta` is then in nats, about a relative change of perplexity).
    """
    import keras

    es = ctx.recipe.finetune.early_stopping
    if not es.enabled:
        return None
    start = pruning_end_epoch(ctx.methods, ctx.plan) if es.after_pruning else 0
    causal_lm = ctx.gate_metric == "perplexity"
    return keras.callbacks.EarlyStopping(
        monitor="val_loss" if causal_lm else "val_accuracy",
        mode="min" if causal_lm else "max",
        patience=es.patience,
        min_delta=es.min_delta,
        start_from_epoch=start,
    )


def pruning_end_epoch(methods: Sequence, plan: FinetunePlan) -> int:
    """The epoch count by which every method's gradual pruning has reached its target.

    The maximum over methods of `Method.pruning_end_step(plan)` (the optimizer step where the
    last mask update happens), as whole epochs; 0 when no method prunes during fit.
    """
    end = 0
    for method in methods:
        step = method.pruning_end_step(plan)
        if step is not None:
            end = max(end, math.ceil((int(step) + 1) / plan.steps_per_epoch))
    return end


def _run_guard(ctx: FinetuneContext, model, baseline_accuracy):
    """The guarded run (`recipe.guard.stages`): returns (model, epochs run, guard record)."""
    from keras_lean.pipeline.guard import run_stages

    fit = ctx.fit
    outcome = run_stages(
        model,
        ctx.methods[0],
        ctx.data,
        guard=ctx.recipe.guard,
        steps_per_epoch=ctx.plan.steps_per_epoch,
        batch_size=ctx.plan.batch_size,
        fit=fit,
        evaluate=lambda m: evaluate(m, ctx.data),
        baseline_accuracy=baseline_accuracy,
        max_accuracy_drop=ctx.recipe.max_accuracy_drop,
        energy_window=fit.energy_window,
        callbacks=lambda: [fit.energy_callback()],
        scope=fit.scope,
        gate=ctx.stage_gate,
    )
    ctx.methods = [outcome.method]
    return outcome.model, outcome.epochs_run, outcome.to_dict()


def _record(
    ctx: FinetuneContext,
    stage: StageRecorder,
    model: keras.Model,
    epochs_run: int | None,
    jit: JitDecision,
    probe: dict | None,
) -> None:
    """Saves the fine-tuned model and the methods' state; fills the stage's entry."""
    run, ft = ctx.run, ctx.recipe.finetune
    stage.accuracy = evaluate(model, ctx.data)
    save_model_atomic(model, run.finetuned)
    checkpoint.remove_checkpoint(run)
    deployable = finalize_chain(model, ctx.methods)
    fill_sizes(stage, deployable)
    fwd = forward_flops(deployable)
    samples = len(ctx.data.x_train) * (epochs_run if epochs_run is not None else ft.epochs)
    stage.flops = None if fwd is None else 3 * fwd * samples
    teacher = ctx.fit.teacher if ctx.fit is not None else None
    if teacher is not None and stage.flops is not None:
        # One teacher forward pass per training sample, inside the same fit.
        stage.flops = (
            None
            if teacher.forward_flops is None
            else (stage.flops + teacher.forward_flops * samples)
        )
    if ctx.resume.epoch is None:
        ctx.method_reports = {m.name: m.report() for m in ctx.methods}
    else:
        for m in ctx.methods:
            ctx.method_reports[m.name] = {**ctx.method_reports.get(m.name, {}), **m.report()}
    save_method_states(run, ctx.methods)
    stage.details = jsonable(
        {
            "methods": ctx.method_reports,
            "jit_compile": jit.to_dict(),
            "jit_probe": probe,
            "mixed_precision": ft.mixed_precision,
            "strategy": ctx.strategy_name,
            "replicas": int(ctx.strategy.num_replicas_in_sync),
            "epochs_run": epochs_run,
            "resumed_from_epoch": ctx.resume.epoch,
            "resume_note": ctx.resume.note,
            "plan": dataclasses.asdict(ctx.plan),
        }
    )
    if teacher is not None:
        stage.details["distill"] = jsonable(teacher.to_dict())
