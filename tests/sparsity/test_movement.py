from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_lean.sparsity import ConstantSparsity, PolynomialDecay, get_masks, prune_low_magnitude
from keras_lean.sparsity.movement import reset_scores


def _regression(criterion, jit):
    # w0, w1 start large and shrink towards 0.5; w2, w3 start small and grow towards 1.2.
    inputs = keras.Input((4,))
    layer = keras.layers.Dense(
        1,
        use_bias=False,
        name="lin",
        kernel_initializer=keras.initializers.Constant(np.array([[2.0], [2.0], [0.1], [0.1]])),
    )
    model = keras.Model(inputs, layer(inputs))
    # one pruning event at step 6, when |w0| > |w2| still but w0 is shrinking
    pruned = prune_low_magnitude(
        model, ConstantSparsity(0.5, begin_step=6, end_step=6), criterion=criterion
    )
    pruned.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * 6, 4)).astype("float32")
    y = x @ np.array([[0.5], [0.5], [1.2], [1.2]], "float32")
    pruned.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return pruned


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_movement_keeps_growing_weights_over_large_shrinking_ones(jit):
    movement = get_masks(_regression("movement", jit))["lin/kernel"].ravel()
    magnitude = get_masks(_regression("magnitude", jit))["lin/kernel"].ravel()
    np.testing.assert_array_equal(magnitude, [1, 1, 0, 0])
    np.testing.assert_array_equal(movement, [0, 0, 1, 1])


def test_movement_scores_are_sgd_weight_times_minus_gradient():
    model = _regression("movement", False)
    wrapper = model.layers[1]
    scores = wrapper.score_variables[0].numpy().ravel()
    assert scores[0] < 0 and scores[1] < 0  # moving towards zero
    assert scores[2] > 0 and scores[3] > 0  # moving away from zero
    reset_scores(wrapper)
    assert not wrapper.score_variables[0].numpy().any()


@pytest.mark.parametrize("m_by_n", [None, (2, 4)], ids=["unstructured", "2-of-4"])
def test_movement_in_a_cnn_under_xla(m_by_n):
    from keras_lean.sparsity import check_m_by_n

    from ._sparsity_models import compile_model, random_data, small_cnn

    x, y = random_data(64)
    pruned = compile_model(
        prune_low_magnitude(
            small_cnn(),
            PolynomialDecay(0.0, 0.9, 2, 8, frequency=2),
            criterion="movement",
            sparsity_m_by_n=m_by_n,
        ),
        keras.optimizers.Adam(0.01),
        jit_compile=True,
    )
    pruned.fit(x, y, batch_size=16, epochs=2, verbose=0)
    if m_by_n is None:
        for key, mask in get_masks(pruned).items():
            assert int(mask.sum()) == max(round(mask.size * 0.1), 1), key
    else:
        assert all(check_m_by_n(pruned, 4, 2).values())
