"""Every transform on every way of building a model (PEFT's TEST_CASES habit).

Shapes (tests/_model_shapes.py): Sequential built with Input, Sequential built by build(),
functional, nested (a model used as a layer), subclassed. Transforms: prune_low_magnitude (+
strip_pruning), prune_structured, factorize, apply_lora, merge_lora, find_lottery_ticket.
Invariants: the output shape is kept, identity-like settings (masks all ones, ratio 0, a rank that
reproduces the kernel exactly, LoRA with B = 0) give the same outputs, the transform acted on every
layer it should (nested ones included), and the caller's model is untouched. A subclassed model,
which none of them can rebuild, gets a ValueError saying what to do instead.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from keras_lean._keras_internals import flatten_layers
from keras_lean.lowrank import LowRankDense, apply_lora, factorize, lora_layers, merge_lora
from keras_lean.sparsity import (
    ConstantSparsity,
    find_lottery_ticket,
    prune_low_magnitude,
    pruning_wrappers,
    strip_pruning,
)
from keras_lean.structured import prune_structured
from tests._model_shapes import (
    DENSE_NAMES,
    GRAPH_SHAPES,
    HIDDEN,
    OUT_DIM,
    SHAPES,
    assert_untouched,
    dense_layers,
    inputs,
    labels,
    set_low_rank_kernels,
    snapshot,
)

RANK = 2  # every kernel is made exactly rank 2, so factorize(rank=2) is lossless


def _out(model, x):
    return keras.ops.convert_to_numpy(model(x))


def _zero_share(layer) -> float:
    return float(np.mean(keras.ops.convert_to_numpy(layer.kernel) == 0))


def case_prune_low_magnitude(model, x):
    pruned = prune_low_magnitude(model, ConstantSparsity(0.5, begin_step=0, frequency=1))
    wrapped = sorted(w.layer.name for w in pruning_wrappers(pruned))
    assert wrapped == sorted(DENSE_NAMES), "every Dense, nested ones too, is wrapped"
    np.testing.assert_allclose(_out(pruned, x), _out(model, x), atol=1e-6)  # masks start at ones
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, labels(len(x)), batch_size=len(x), epochs=1, verbose=0)
    stripped = strip_pruning(pruned)
    assert not pruning_wrappers(stripped)
    np.testing.assert_allclose(_out(stripped, x), _out(pruned, x), atol=1e-5)
    for layer in dense_layers(stripped):
        assert _zero_share(layer) == pytest.approx(0.5, abs=0.05), layer.name
    return stripped


def case_prune_structured(model, x):
    same = prune_structured(model, 0.0)
    np.testing.assert_allclose(_out(same, x), _out(model, x), atol=1e-6)
    small = prune_structured(model, 0.5)
    widths = {lyr.name: lyr.units for lyr in dense_layers(small)}
    assert widths == {"fc1": HIDDEN // 2, "fc2": HIDDEN // 2, "head": OUT_DIM}
    assert small.count_params() < model.count_params()
    return small


def case_factorize(model, x):
    new, report = factorize(model, rank=RANK)
    assert sorted(e.path.split("/")[-1] for e in report.factorized) == sorted(DENSE_NAMES)
    nested = flatten_layers(new)
    assert sorted(lyr.name for lyr in nested if isinstance(lyr, LowRankDense)) == sorted(
        DENSE_NAMES
    )
    np.testing.assert_allclose(_out(new, x), _out(model, x), rtol=1e-4, atol=1e-4)
    assert new.count_params() < model.count_params()
    return new


def case_apply_lora(model, x):
    lora = apply_lora(model, rank=RANK, targets="fc")
    assert sorted(lyr.name for lyr in lora_layers(lora)) == ["fc1", "fc2"]
    assert {v.name for v in lora.trainable_weights} == {"lora_kernel_a", "lora_kernel_b"}
    np.testing.assert_allclose(_out(lora, x), _out(model, x), atol=1e-6)  # B starts at zero
    return lora


def case_merge_lora(model, x):
    lora = apply_lora(model, rank=RANK, targets="fc")
    rng = np.random.default_rng(1)
    for variable in lora.trainable_weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    assert np.abs(_out(lora, x) - _out(model, x)).max() > 1e-3  # the adapters do something
    merged = merge_lora(lora)
    assert not lora_layers(merged)
    assert not [v for v in merged.weights if "lora" in v.name]
    assert merged.count_params() == model.count_params()
    np.testing.assert_allclose(_out(merged, x), _out(lora, x), rtol=1e-5, atol=1e-5)
    return merged


def case_find_lottery_ticket(model, x):
    result = find_lottery_ticket(
        model,
        (x, labels(len(x)), x, labels(len(x))),
        rounds=1,
        rate=0.5,
        epochs_per_round=1,
        batch_size=len(x),
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert sorted(result.masks) == sorted(f"{name}/kernel" for name in DENSE_NAMES)
    assert result.final_sparsity == pytest.approx(0.5, abs=0.05)
    stripped = strip_pruning(result.model)
    for layer in dense_layers(stripped):
        assert _zero_share(layer) == pytest.approx(0.5, abs=0.05), layer.name
    return stripped


CASES = {
    "prune_low_magnitude": case_prune_low_magnitude,
    "prune_structured": case_prune_structured,
    "factorize": case_factorize,
    "apply_lora": case_apply_lora,
    "merge_lora": case_merge_lora,
    "find_lottery_ticket": case_find_lottery_ticket,
}


@pytest.mark.parametrize("transform", list(CASES))
@pytest.mark.parametrize("shape", GRAPH_SHAPES)
def test_transform_on_model_shape(shape, transform):
    model = SHAPES[shape]()
    set_low_rank_kernels(model, RANK)
    x = inputs()
    before = snapshot(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' and TFMOT's deprecation chatter
        new = CASES[transform](model, x)
    assert new is not model
    assert tuple(new(x).shape) == (len(x), OUT_DIM)
    assert_untouched(model, before, x)


def _lora_by_hand(model):
    """A subclassed model whose user enabled LoRA on a layer themselves (merge_lora's input)."""
    model.fc1.enable_lora(RANK)
    return model


# What each transform must tell the owner of a subclassed model to do.
SUBCLASSED_ERRORS = {
    "prune_low_magnitude": (
        lambda m: prune_low_magnitude(m),
        r"supports Sequential and functional models.*'subclassed'.*wrap its layers yourself",
    ),
    "prune_structured": (
        lambda m: prune_structured(m, 0.5),
        r"Sequential or functional model.*Subclassed; rebuild it with the functional API",
    ),
    "factorize": (
        lambda m: factorize(m, rank=RANK),
        r"rebuild this one with the functional API.*Received: a Subclassed model",
    ),
    "apply_lora": (
        lambda m: apply_lora(m, rank=RANK),
        r"Cannot copy model 'subclassed' \(Subclassed\).*register_keras_serializable"
        r".*functional API",
    ),
    "merge_lora": (
        lambda m: merge_lora(_lora_by_hand(m)),
        r"Cannot copy model 'subclassed' \(Subclassed\).*register_keras_serializable",
    ),
    "find_lottery_ticket": (
        lambda m: find_lottery_ticket(
            m, (inputs(), labels(), inputs(), labels()), rounds=1, rate=0.5, loss="mse"
        ),
        r"supports Sequential and functional models.*'subclassed'",
    ),
}


def test_every_transform_has_a_subclassed_case():
    assert set(SUBCLASSED_ERRORS) == set(CASES)


@pytest.mark.parametrize("transform", list(SUBCLASSED_ERRORS))
def test_subclassed_model_gets_a_clear_error(transform):
    model = SHAPES["subclassed"]()
    run, match = SUBCLASSED_ERRORS[transform]
    with pytest.raises(ValueError, match=match):
        run(model)
