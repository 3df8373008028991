"""trace_weight_slices / carry_optimizer_state: slots sliced like the weights, iterations kept."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.structured import build_graph, select_units, unit_scores
from keras_lean.structured.optimizer_state import (
    WeightIndexMap,
    carry_optimizer_state,
    trace_weight_slices,
)
from keras_lean.structured.surgery import rebuild

from ._structured_models import (
    concat,
    dense_mlp,
    make_input,
    randomize_norms,
    residual,
    sequential_cnn,
)

L = keras.layers


def _trained(builder, kind, optimizer, steps=3):
    keras.utils.set_random_seed(0)
    model = randomize_norms(builder())
    model.compile(optimizer=optimizer, loss="mse")
    x = make_input(kind, n=8 * steps)
    y = np.random.default_rng(1).normal(size=(len(x), 3)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model


def _half(model):
    graph = build_graph(model)
    pruned = select_units(graph, unit_scores(graph, "l1"), 0.5)
    assert pruned, "the case must remove something"
    return graph, pruned


def _slots(optimizer, suffix):
    return {v.name[: -len(suffix) - 1]: v for v in optimizer.variables if v.name.endswith(suffix)}


def _expected_slots(model, graph, pruned, slots):
    """The old slots, sliced by surgery itself (np.compress on a copy holding the slots)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for v in copy.trainable_variables:
        v.assign(slots[v.path.replace("/", "_")].numpy())
    return {v.path: v.numpy() for v in rebuild(copy, graph, pruned).trainable_variables}


CASES = {
    "dense_mlp": (dense_mlp, "vec10"),
    "sequential_cnn": (sequential_cnn, "img8x1"),
    "residual_add": (residual(L.Add), "img8x3"),
    "concat": (concat, "img6x2"),
}
OPTIMIZERS = {
    "adam": (lambda: keras.optimizers.Adam(1e-2), ("momentum", "velocity")),
    "sgd_momentum": (lambda: keras.optimizers.SGD(1e-2, momentum=0.9), ("momentum",)),
    "adamw_ema": (lambda: keras.optimizers.AdamW(1e-2, use_ema=True), ("momentum", "average")),
}


@pytest.mark.parametrize("opt_id", list(OPTIMIZERS), ids=list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_slots_equal_the_old_ones_on_surviving_rows(case, opt_id):
    builder, kind = CASES[case]
    make_opt, slot_names = OPTIMIZERS[opt_id]
    model = _trained(builder, kind, make_opt())
    before = [w.copy() for w in model.get_weights()]
    graph, pruned = _half(model)
    small, maps = trace_weight_slices(model, lambda m: rebuild(m, graph, pruned))
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the model is left as it was
    reference = rebuild(model, graph, pruned)
    for a, b in zip(reference.get_weights(), small.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # true weights, not the index tags
    new = carry_optimizer_state(model.optimizer, model, small, maps)
    assert new is not model.optimizer and type(new) is type(model.optimizer)
    assert int(new.iterations.numpy()) == int(model.optimizer.iterations.numpy()) == 3
    assert float(new.learning_rate.numpy()) == pytest.approx(1e-2)
    for name in slot_names:
        old_slots, new_slots = _slots(model.optimizer, name), _slots(new, name)
        assert len(new_slots) == len(small.trainable_variables)
        expected = _expected_slots(model, graph, pruned, old_slots)
        for var in small.trainable_variables:
            got = new_slots[var.path.replace("/", "_")].numpy()
            want = expected[var.path]
            np.testing.assert_array_equal(got, want, err_msg=f"{name} of {var.path}")
            assert np.any(got != 0), f"{name} of {var.path} should carry state"


def test_carried_optimizer_trains_the_small_model():
    model = _trained(dense_mlp, "vec10", keras.optimizers.Adam(1e-2))
    graph, pruned = _half(model)
    small, maps = trace_weight_slices(model, lambda m: rebuild(m, graph, pruned))
    small.compile(carry_optimizer_state(model.optimizer, model, small, maps), loss="mse")
    x = make_input("vec10", n=16)
    small.fit(x, np.zeros((16, 3), "float32"), batch_size=8, verbose=0)
    assert int(small.optimizer.iterations.numpy()) == 5  # 3 before the shrink + 2


def test_unbuilt_optimizer_gives_a_fresh_copy():
    model = dense_mlp()
    graph, pruned = _half(model)
    small, maps = trace_weight_slices(model, lambda m: rebuild(m, graph, pruned))
    opt = keras.optimizers.Adam(5e-3)
    new = carry_optimizer_state(opt, model, small, maps)
    assert not new.built and new is not opt
    assert float(new.learning_rate.numpy()) == pytest.approx(5e-3)


def test_float16_weights_are_traced_digit_by_digit():
    """2**11 integers are exact in float16: a 40 x 70 kernel needs two passes."""

    def build(dtype):
        inputs = keras.Input((40,))
        x = L.Dense(70, name="wide", dtype=dtype)(inputs)
        return keras.Model(inputs, L.Dense(3, name="out", dtype=dtype)(x))

    keras.utils.set_random_seed(0)
    reference = build("float32")
    _, pruned = _half(reference)
    maps = {}
    for dtype in ("float32", "float16"):
        model = build(dtype)
        model.set_weights(reference.get_weights())
        graph = build_graph(model)  # same layers, same unit ids as the reference's graph
        calls = []

        def transform(m, graph=graph, pruned=pruned, calls=calls):
            calls.append(1)
            return rebuild(m, graph, pruned)

        small, maps[dtype] = trace_weight_slices(model, transform)
        assert len(calls) == (2 if dtype == "float16" else 1)
        np.testing.assert_array_equal(
            small.get_weights()[0], rebuild(model, graph, pruned).get_weights()[0]
        )
    for a, b in zip(maps["float32"], maps["float16"], strict=True):
        assert a.source == b.source
        np.testing.assert_array_equal(a.indices, b.indices)


def test_a_transform_that_computes_weights_is_refused():
    model = dense_mlp()
    before = [w.copy() for w in model.get_weights()]

    def doubled(m):
        copy = keras.models.clone_model(m)
        copy.set_weights([w * 2.0 + 0.5 for w in m.get_weights()])
        return copy

    with pytest.raises(ValueError, match="is not a selection of one weight"):
        trace_weight_slices(model, doubled)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # restored on error too


def test_fresh_layers_are_refused():
    model = dense_mlp()

    def fresh(m):
        keras.utils.set_random_seed(3)
        return dense_mlp()  # new random weights, nothing taken from m

    with pytest.raises(ValueError, match="is not a selection of one weight"):
        trace_weight_slices(model, fresh)


def test_maps_must_cover_every_weight():
    model = _trained(dense_mlp, "vec10", keras.optimizers.Adam())
    graph, pruned = _half(model)
    small, maps = trace_weight_slices(model, lambda m: rebuild(m, graph, pruned))
    with pytest.raises(ValueError, match="one entry per trainable variable"):
        carry_optimizer_state(model.optimizer, model, small, maps[:-1])
    twice = (maps[0],) * len(maps)
    with pytest.raises(ValueError, match="must come one each from the old model"):
        carry_optimizer_state(model.optimizer, model, small, twice)


def test_optimizer_built_on_other_variables_is_refused():
    model = _trained(dense_mlp, "vec10", keras.optimizers.Adam())
    other = _trained(sequential_cnn, "img8x1", keras.optimizers.Adam())
    graph, pruned = _half(model)
    small, maps = trace_weight_slices(model, lambda m: rebuild(m, graph, pruned))
    with pytest.raises(ValueError, match="was not built on old_model's trainable variables"):
        carry_optimizer_state(other.optimizer, model, small, maps)


def test_index_map_gather():
    m = WeightIndexMap(0, np.array([3, 0, 2]))
    np.testing.assert_array_equal(m.gather(np.arange(4) * 10, (3,)), [30, 0, 20])
