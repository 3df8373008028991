"""Artifacts get the permissions the user's umask gives, not mkstemp's private 0600.

Tests of keras_lean/_files.py and of every writer that goes through a temporary name: the run
folder's atomic writes (keras_lean/pipeline/rundir.py), the energy records, and the exports.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_lean._files import default_mode, temp_dir_beside, temp_file_beside, umask
from keras_lean.pipeline.rundir import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    save_model_atomic,
)

MASKS = {"022": (0o022, 0o644, 0o755), "027": (0o027, 0o640, 0o750), "002": (0o002, 0o664, 0o775)}


@pytest.fixture(params=list(MASKS), ids=[f"umask{m}" for m in MASKS])
def masked(request):
    """Runs the test under a given umask; yields (file mode, folder mode) it should give."""
    mask, file_mode, dir_mode = MASKS[request.param]
    old = os.umask(mask)
    try:
        yield file_mode, dir_mode
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tiny_model() -> keras.Model:
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2)(inputs))


def test_umask_is_read_without_changing_it(masked):
    before = os.umask(0o077)
    os.umask(before)
    assert umask() == before
    assert os.umask(before) == before  # still what it was
    file_mode, dir_mode = masked
    assert (default_mode(), default_mode(directory=True)) == (file_mode, dir_mode)


def test_temporary_names_get_the_umask_mode(tmp_path, masked):
    file_mode, dir_mode = masked
    tmp = temp_file_beside(tmp_path / "a.json")
    assert tmp.parent == tmp_path and tmp.name.startswith(".a.json.")
    assert _mode(tmp) == file_mode
    folder = temp_dir_beside(tmp_path / "export")
    assert _mode(folder) == dir_mode


@pytest.mark.parametrize(
    "write",
    [
        lambda p: atomic_write_bytes(p, b"\x00\x01"),
        lambda p: atomic_write_text(p, "text"),
        lambda p: atomic_write_json(p, {"a": 1}),
    ],
    ids=["bytes", "text", "json"],
)
def test_atomic_writes_get_the_umask_mode(tmp_path, masked, write):
    file_mode, dir_mode = masked
    path = write(tmp_path / "sub" / "out.json")
    assert _mode(path) == file_mode
    assert _mode(path.parent) == dir_mode  # the folder created on the way
    write(path)  # replacing an existing file gives the same mode
    assert _mode(path) == file_mode
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary left


def test_save_model_atomic_gets_the_umask_mode(tmp_path, masked):
    file_mode, _ = masked
    path = save_model_atomic(_tiny_model(), tmp_path / "m.keras")
    assert _mode(path) == file_mode
    assert keras.saving.load_model(path).output_shape == (None, 2)


def test_atomic_directory_gets_the_umask_mode(tmp_path, masked):
    file_mode, dir_mode = masked
    for _ in range(2):  # a new folder, then one that replaces it
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "file.txt").write_text("x")
        assert _mode(tmp_path / "export") == dir_mode
        assert _mode(tmp_path / "export" / "file.txt") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_energy_records_get_the_umask_mode(tmp_path, masked):
    from keras_lean.energy.records import atomic_write_text as energy_write

    file_mode, _ = masked
    assert _mode(energy_write(tmp_path / "energy.json", "{}")) == file_mode


def test_exports_get_the_umask_mode(tmp_path, masked):
    from keras_lean.export import convert_to_tflite
    from keras_lean.export.saved_model import export_saved_model

    file_mode, dir_mode = masked
    model = _tiny_model()
    tflite = convert_to_tflite(model, tmp_path / "m.tflite")
    assert _mode(Path(tflite)) == file_mode
    folder = Path(export_saved_model(model, tmp_path / "saved_model"))
    assert _mode(folder) == dir_mode
    for path in folder.rglob("*"):
        assert _mode(path) == (dir_mode if path.is_dir() else file_mode), path
    assert np.isfinite(np.asarray(model(np.zeros((1, 4), "float32")))).all()
