"""Pipeline fixtures: a tiny .npz data set and a trained tiny run folder, shared and copied."""

from __future__ import annotations

import shutil

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory, digits):
    """400 training and 200 validation digits in an .npz (x_train, y_train, x_val, y_val)."""
    x_train, y_train, x_val, y_val = digits
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(
        path, x_train=x_train[:400], y_train=y_train[:400], x_val=x_val[:200], y_val=y_val[:200]
    )
    return path


@pytest.fixture(scope="session")
def _trained_run(tmp_path_factory, tiny_npz):
    from keras_lean.pipeline import train_baseline

    folder = tmp_path_factory.mktemp("runs") / "trained"
    train_baseline(folder, data=tiny_npz, arch="cnn", epochs=3, verbose=0)
    return folder


@pytest.fixture
def trained_run(_trained_run, tmp_path):
    """A fresh copy of a run folder holding a trained baseline (3 epochs, tiny data)."""
    dest = tmp_path / "run"
    shutil.copytree(_trained_run, dest)
    return dest
