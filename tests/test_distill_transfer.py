"""The transfer set (keras_lean.distill_transfer): what the perturbed batches hold."""

from __future__ import annotations

import numpy as np
import pytest

from keras_lean.distill_transfer import TransferConfig, TransferData, perturb

_IMAGES = TransferConfig(shift=1, noise=0.05, mixup=0.4)


def test_transfer_data_perturbs_each_step_and_keeps_the_labels(digits):
    x_train, y_train, _, _ = digits
    x, y = x_train[:96], y_train[:96]
    data = TransferData(x, y, config=_IMAGES, batch_size=32, epochs=2, seed=3)
    assert len(data) == 6 and data.steps_per_epoch == 3
    for i in range(len(data)):
        (xa, ya), (xc, yc) = data[i], data._clean_batch(i)
        assert xa.shape == xc.shape == (32, 8, 8, 1) and xa.dtype == xc.dtype
        np.testing.assert_array_equal(ya, yc)  # labels: the clean batch's, same shape
        assert not np.allclose(xa, xc)
    # A pure function of the index (Keras may prefetch or read a batch twice) ...
    np.testing.assert_array_equal(data[4][0], data[4][0])
    # ... and a new perturbation at every step of the same clean batch.
    same = TransferData([(x[:32], y[:32])] * 3, config=_IMAGES, seed=3)
    assert not np.allclose(same[0][0], same[1][0]) and not np.allclose(same[1][0], same[2][0])
    # A resumed fit (first_step k) perturbs batch 0 as the uninterrupted one did batch k.
    resumed = TransferData([(x[:32], y[:32])] * 3, config=_IMAGES, seed=3, first_step=2)
    np.testing.assert_array_equal(resumed[0][0], same[2][0])
    later = TransferData(x, y, config=_IMAGES, batch_size=32, epochs=1, seed=3, first_step=3)
    for a, b in zip(later[1], data[4], strict=True):  # epoch 1's order and perturbations
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x_train[:96], digits[0][:96])  # the caller's arrays untouched


def test_perturbations_do_what_they_say():
    rng = np.random.default_rng(0)
    x = np.zeros((64, 8, 8, 1), "float32")
    x[:, 4, 4, 0] = 1.0
    shifted = perturb(x, TransferConfig(shift=2), rng)
    rows, cols = np.divmod(np.argmax(shifted[..., 0].reshape(64, -1), axis=1), 8)
    assert np.all(shifted.reshape(64, -1).sum(1) == 1.0)  # one pixel, moved, not blurred
    assert set(rows) == set(range(2, 7)) and set(cols) == set(range(2, 7))
    noisy = perturb(x, TransferConfig(noise=0.1), rng)
    assert 0.08 < float(np.std(noisy - x)) < 0.12
    mixed = perturb(np.eye(64, dtype="float32"), TransferConfig(mixup=1.0), rng)
    assert np.all(np.diag(mixed) >= 0.5 - 1e-6)  # each sample keeps the larger share
    tokens = {
        "token_ids": np.tile(np.array([[101, 7, 8, 9, 10, 102, 0, 0]], "int32"), (500, 1)),
        "padding_mask": np.tile(np.array([[1, 1, 1, 1, 1, 1, 0, 0]], bool), (500, 1)),
    }
    cfg = TransferConfig(token_mask=0.3, mask_token_id=103, keep_token_ids=(101, 102))
    masked = perturb(tokens, cfg, rng)
    ids = masked["token_ids"]
    assert (
        ids.dtype == tokens["token_ids"].dtype and masked["padding_mask"] is tokens["padding_mask"]
    )
    np.testing.assert_array_equal(ids[:, [0, 5, 6, 7]], tokens["token_ids"][:, [0, 5, 6, 7]])
    hit = ids[:, 1:5] == 103
    assert 0.25 < hit.mean() < 0.35
    np.testing.assert_array_equal(ids[:, 1:5][~hit], tokens["token_ids"][:, 1:5][~hit])


@pytest.mark.parametrize(
    "x, config, match",
    [
        (np.zeros((4, 64), "float32"), TransferConfig(shift=1), r"transfer\.shift needs image"),
        ({"token_ids": np.zeros((4, 8), "int32")}, TransferConfig(noise=0.1), "array inputs"),
        (np.zeros((4, 8), "int32"), TransferConfig(noise=0.1), "need float inputs"),
        (
            np.zeros((4, 8), "float32"),
            TransferConfig(token_mask=0.1, mask_token_id=0),
            "needs integer token ids",
        ),
    ],
    ids=["shift-flat", "noise-dict", "noise-int", "mask-float"],
)
def test_perturbations_refuse_inputs_they_do_not_fit(x, config, match):
    with pytest.raises(ValueError, match=match):
        perturb(x, config, np.random.default_rng(0))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"shift": -1}, ValueError, "shift must be >= 0"),
        ({"shift": 1.5}, TypeError, "shift must be an int"),
        ({"noise": -0.1}, ValueError, "noise must be >= 0"),
        ({"mixup": "a"}, TypeError, "mixup must be a number"),
        ({"token_mask": 1.0, "mask_token_id": 0}, ValueError, r"token_mask must be in \[0, 1\)"),
        ({"token_mask": 0.2}, ValueError, "token_mask > 0 needs mask_token_id"),
        ({"keep_token_ids": ["cls"]}, TypeError, "keep_token_ids must be an int"),
    ],
    ids=["shift", "shift-type", "noise", "mixup-type", "mask-rate", "mask-id", "keep-ids"],
)
def test_transfer_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        TransferConfig(**kwargs)
