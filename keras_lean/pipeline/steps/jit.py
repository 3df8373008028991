"""`jit_compile: auto`: measure a few train steps with and without XLA, keep the faster."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

from keras_lean.pipeline.methods.base import Data
from keras_lean.pipeline.rundir import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from keras_lean.pipeline.steps.finetune import FinetuneContext


@dataclasses.dataclass(frozen=True)
class JitDecision:
    """The measured `jit_compile: auto` choice.

    Attributes:
        jit_compile: the choice.
        step_ms_off: median train-step time without XLA.
        step_ms_on: median train-step time with XLA (None if XLA failed).
        compile_s_off: first-step (trace) time without XLA.
        compile_s_on: first-step (trace + XLA compile) time with XLA.
        reason: why.
    """

    jit_compile: bool
    step_ms_off: float
    step_ms_on: float | None
    compile_s_off: float
    compile_s_on: float | None
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def unmeasured(cls, jit_compile: bool, reason: str) -> JitDecision:
        """A decision taken without timing anything."""
        return cls(jit_compile, 0.0, None, 0.0, None, reason)


def _time_steps(model, x, y, loss, jit: bool, steps: int) -> tuple[float, float]:
    """(first-step seconds, median step milliseconds) of `train_on_batch` with `jit`."""
    import statistics

    import keras

    model.compile(optimizer=keras.optimizers.Adam(), loss=loss, jit_compile=jit)
    t0 = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - t0
    per_step = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        per_step.append(time.perf_counter() - t0)
    return first, statistics.median(per_step) * 1e3


def decide_jit_compile(
    model: keras.Model,
    data: Data,
    *,
    batch_size: int,
    total_steps: int,
    loss: Any,
    steps: int = 8,
) -> JitDecision:
    """Times a few train steps with and without XLA and keeps the faster over the whole run.

    XLA wins only if its per-step saving over `total_steps` outweighs its extra compile time;
    never assumed (on small CPU models XLA is often slower). The model's weights are restored
    afterwards; the caller compiles it again for the real run.

    Args:
        model: the model about to be fine-tuned (built, not necessarily compiled).
        data: training data (one batch is used).
        batch_size: the fine-tune batch size.
        total_steps: fine-tune optimizer steps.
        loss: the loss.
        steps: timed steps per setting (after one warm-up step).

    Returns:
        A `JitDecision`.
    """
    n = min(batch_size, len(data.x_train))
    x, y = data.x_train[:n], data.y_train[:n]
    saved = model.get_weights()
    failure = None
    try:
        first_off, ms_off = _time_steps(model, x, y, loss, False, steps)
        try:
            first_on, ms_on = _time_steps(model, x, y, loss, True, steps)
        except Exception as e:  # XLA may not support an op: then the answer is "off"
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        model.set_weights(saved)
    if failure is not None:
        return JitDecision(False, ms_off, None, first_off, None, f"XLA failed: {failure}")
    saving_s = (ms_off - ms_on) / 1e3 * total_steps
    extra_compile_s = first_on - first_off
    use = ms_on < ms_off and saving_s > extra_compile_s
    reason = (
        f"XLA step {ms_on:.2f} ms vs {ms_off:.2f} ms without; over {total_steps} steps "
        f"{'saves' if saving_s > 0 else 'costs'} {abs(saving_s):.2f} s against "
        f"{extra_compile_s:.2f} s extra compile"
    )
    return JitDecision(use, ms_off, ms_on, first_off, first_on, reason)


#: Why `jit_compile: auto` is XLA on without measuring in a multi-process run.
MULTI_PROCESS_JIT = (
    "several processes (--distribution data-parallel): XLA on, unmeasured (without XLA each op "
    "of the step is a cross-process computation of its own: far slower)"
)


def jit_choice(ctx: FinetuneContext, model: keras.Model) -> tuple[JitDecision, dict | None]:
    """The XLA decision, and the energy record of measuring it (None when nothing was measured).

    The measurement runs in its own `jit_probe` window inside the finetune stage's, so its cost is
    counted in the stage (it was spent) and shown apart (it is paid once per run folder). A
    resumed fine-tune never measures: measuring recompiles the model, which would drop the
    restored optimizer state.
    """
    ft = ctx.recipe.finetune
    if ft.jit_compile in ("on", "off"):
        return JitDecision.unmeasured(
            ft.jit_compile == "on", f"recipe: jit_compile: {ft.jit_compile}"
        ), None
    from keras_lean.pipeline.distribution import process_count

    if process_count() > 1:  # the processes must agree, and measuring takes them all
        return JitDecision.unmeasured(True, MULTI_PROCESS_JIT), None
    key = {
        "batch_size": ft.batch_size,
        "strategy": ctx.strategy_name,
        "methods": list(ctx.recipe.methods),
        "mixed_precision": ft.mixed_precision,
        "input_shape": list(ctx.data.x_train.shape[1:]),
    }
    run = ctx.run
    if run.jit_decision.exists():
        cached = json.loads(run.jit_decision.read_text())
        if cached.get("key") == key:
            d = cached["decision"]
            return JitDecision(**{**d, "reason": f"cached: {d['reason']}"}), None
    if ctx.resume.epoch is not None:
        return JitDecision.unmeasured(False, "resumed without a cached decision"), None
    with ctx.tracker.window("jit_probe") as window, ctx.strategy.scope():
        decision = decide_jit_compile(
            model,
            ctx.data,
            batch_size=ft.batch_size,
            total_steps=ctx.plan.total_steps,
            loss=ctx.loss,
        )
    atomic_write_json(run.jit_decision, {"key": key, "decision": decision.to_dict()})
    rec = window.record
    return decision, {"duration_s": rec.duration_s, "energy_j": rec.energy_j}
