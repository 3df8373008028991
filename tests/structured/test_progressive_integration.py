"""prune_structured_progressively with the rest of the toolkit: resume, LoRA, keras-hub blocks,
importance "auto", a distribution strategy, and the FLOPs estimate behind the shrink decision."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from keras_lean.flops import count_flops
from keras_lean.sparsity import PolynomialDecay
from keras_lean.structured import build_graph
from keras_lean.structured.progressive import prune_structured_progressively
from keras_lean.structured.progressive_plan import estimated_flops
from keras_lean.structured.surgery import rebuild

L = keras.layers
N, BS = 32, 8  # 4 steps per epoch


def _mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10,))
    x = L.Dense(12, activation="relu", name="d1")(inputs)
    x = L.Dropout(0.1)(x)
    x = L.Dense(8, activation="tanh", name="d2")(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


def _data(n=N, shape=(10,)):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, 3, n).astype("int32")


def _run(model, x, y, epochs=3, **kw):
    kw.setdefault("schedule", PolynomialDecay(0.25, 0.5, begin_step=2, end_step=6, frequency=4))
    kw.setdefault("optimizer", keras.optimizers.Adam(1e-2))
    kw.setdefault("loss", "sparse_categorical_crossentropy")
    return prune_structured_progressively(
        model, 0.5, x, y, epochs=epochs, batch_size=BS, shrink_when="always", **kw
    )


def test_resumed_run_ends_like_the_uninterrupted_one(tmp_path):
    """Shrinks at steps 2 (epoch 1) and 6 (epoch 2); checkpoint after epoch 1, resume."""
    x, y = _data()
    saved = {}

    def checkpoint(epoch, model, state):
        if epoch == 1:
            model.save(tmp_path / "ckpt.keras")
            (tmp_path / "ckpt.json").write_text(json.dumps(state))
            saved["units"] = model.get_layer("d1").units

    model = _mlp()
    full, report = _run(model, x, y, epoch_end=checkpoint)
    assert len(report.shrinks) == 2 and saved["units"] < 12  # the checkpoint is shrunk
    loaded = keras.models.load_model(tmp_path / "ckpt.keras", compile=True)
    state = json.loads((tmp_path / "ckpt.json").read_text())
    resumed, again = _run(loaded, x, y, resume=state, original=model)
    assert loaded.get_layer("d1").units == saved["units"]  # the checkpoint model is not changed
    for a, b in zip(full.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert int(resumed.optimizer.iterations.numpy()) == 12
    assert [s.step for s in again.shrinks] == [s.step for s in report.shrinks] == [2, 6]
    assert [e.epoch for e in again.epochs] == [1, 2, 3]
    assert again.structure.params_before == report.structure.params_before


class _Stop(Exception):
    pass


def test_step_end_stops_the_run_after_a_step_and_leaves_no_window_open():
    """`step_end` raising (the pipeline's Ctrl-C) mid epoch 2: the epoch-1 checkpoint came
    first, no later step ran, and the tracker's windows are closed (a new one nests in the
    caller's window again)."""
    from keras_lean.energy import EnergyTracker

    x, y = _data()
    calls = []

    def step_end(steps_done):
        calls.append(("step", steps_done))
        if steps_done == 6:
            raise _Stop

    def epoch_end(epoch, model, state):
        calls.append(("epoch_end", epoch))

    tracker = EnergyTracker()
    with tracker.window("caller"):
        with pytest.raises(_Stop):
            _run(_mlp(), x, y, tracker=tracker, step_end=step_end, epoch_end=epoch_end)
        with tracker.window("after") as after:
            pass
    assert calls == [("step", 1), ("step", 2), ("step", 3), ("epoch_end", 1), ("step", 4),
                     ("step", 5), ("step", 6)]  # fmt: skip
    assert after.parent == "caller"
    names = [r.name for r in tracker.records]
    assert "progressive/segment_1/epoch_2" in names  # the part that ran was measured


@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": 0}, "resume must be the `state`"),
        ({"samples": 99}, "Resume with the same data, epochs and batch_size"),
    ],
    ids=["version", "other-data"],
)
def test_bad_resume_state(change, match):
    x, y = _data()
    state = {"version": 1, "epoch": 1, "total_steps": 12, "samples": N, "batch_size": BS}
    with pytest.raises(ValueError, match=match):
        _run(_mlp(), x, y, resume={**state, **change})


def test_resume_needs_the_compiled_checkpoint_model():
    x, y = _data()
    state = {"version": 1, "epoch": 1, "total_steps": 12, "samples": N, "batch_size": BS}
    with pytest.raises(ValueError, match="resume needs the model saved by `epoch_end`"):
        _run(_mlp(), x, y, resume=state)


def test_lora_adapters_are_sliced_with_their_layers():
    x, y = _data()
    model = _mlp()
    for name in ("d1", "d2"):
        model.get_layer(name).enable_lora(2)
    small, report = _run(model, x, y, epochs=2)
    d1, d2 = small.get_layer("d1"), small.get_layer("d2")
    assert d1.units == 6 and d2.units == 4 and d1.lora_rank == d2.lora_rank == 2
    assert tuple(d1.lora_kernel_a.shape) == (10, 2) and tuple(d1.lora_kernel_b.shape) == (2, 6)
    assert tuple(d2.lora_kernel_a.shape) == (6, 2) and tuple(d2.lora_kernel_b.shape) == (2, 4)
    trainable = {v.path for v in small.trainable_weights}
    assert "d1/kernel" not in trainable and "d1/lora_kernel_a" in trainable  # still adapted
    assert len(report.shrinks) == 2


def test_mirrored_strategy_one_device():
    import tensorflow as tf

    x, y = _data()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        small, report = _run(_mlp(), x, y, epochs=2)
    assert small.get_layer("d1").units == 6 and len(report.shrinks) == 2
    assert int(small.optimizer.iterations.numpy()) == 8


def _encoder_model():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    x = keras_hub.layers.TransformerEncoder(intermediate_dim=16, num_heads=2, name="enc")(inputs)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, L.Dense(3, name="out")(x))


@pytest.mark.parametrize("kind", ["heads", "channels"], ids=["heads", "feed-forward"])
def test_estimated_flops_of_an_encoder_block_match_the_rebuilt_model(kind):
    model = _encoder_model()
    graph = build_graph(model, ("out",))
    group = next(g for g in graph.groups if g.is_prunable and g.kind == kind)
    pruned = frozenset(int(graph.roots[u]) for u in group.units[: group.size // 2])
    estimate = estimated_flops(graph, count_flops(model).rows, pruned)
    actual = count_flops(rebuild(model, graph, pruned)).total
    assert estimate == pytest.approx(actual, rel=1e-9) and actual < count_flops(model).total


def test_encoder_feed_forward_and_heads_with_importance_auto():
    x, y = _data(N, (4, 8))
    small, report = _run(_encoder_model(), x, y, epochs=2, importance="auto", exclude="out")
    enc = small.get_layer("enc")
    assert enc.intermediate_dim == 8 and enc.num_heads == 1
    assert report.segments[-1].flops < report.segments[0].flops
