"""`keras-lean run --distribution data-parallel` over several processes: one report, every
process's energy listed and summed, the same model as one process with the same global batch.

The two-process run is slow (three JAX processes start); the cheap tests exercise the pieces it
is made of (summing, the float64-over-float32 wire, the batch split, the report lines).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lean.pipeline import distribution as dist
from keras_lean.pipeline.steps.stage import StageEntry


def _entry(stage="finetune", energy_j=10.0, duration_s=2.0, method="measured (rapl)"):
    return StageEntry(
        stage=stage,
        started_at=None,
        duration_s=duration_s,
        energy_j=energy_j,
        energy_kwh=energy_j / 3.6e6,
        energy_method=method,
        emissions_kg=energy_j * 1e-7,
        accuracy=0.5,
        details={"methods": {"magnitude": {}}},
    ).to_dict()


def test_merged_entry_sums_energy_and_lists_each_process():
    mine, theirs = _entry(energy_j=10.0, duration_s=2.0), _entry(energy_j=14.0, duration_s=3.0)
    gathered = [dist.stage_figures(mine), dist.stage_figures(theirs)]
    merged = dist.merge_process_entries(mine, gathered)
    assert merged["energy_j"] == pytest.approx(24.0)
    assert merged["energy_kwh"] == pytest.approx(24.0 / 3.6e6)
    assert merged["emissions_kg"] == pytest.approx(24.0e-7)
    assert merged["duration_s"] == 3.0  # side by side: the slowest process, not the sum
    assert merged["energy_method"] == "measured (rapl) (sum of 2 processes)"
    assert [p["energy_j"] for p in merged["details"]["processes"]] == [10.0, 14.0]
    assert [p["process"] for p in merged["details"]["processes"]] == [0, 1]
    assert merged["details"]["methods"] == {"magnitude": {}} and merged["accuracy"] == 0.5
    assert mine["energy_j"] == 10.0 and "processes" not in mine["details"]  # input kept
    StageEntry.from_dict(merged)  # still a valid report entry


def test_merged_entry_says_when_some_processes_only_estimated():
    measured, estimated = _entry(), _entry(method="estimated:cpu-tdp")
    gathered = [dist.stage_figures(measured), dist.stage_figures(estimated)]
    merged = dist.merge_process_entries(measured, gathered)
    assert merged["energy_method"].endswith("(sum of 2 processes; 1 of 2 measured)")
    assert [p["measured"] for p in merged["details"]["processes"]] == [1.0, 0.0]


def test_one_process_leaves_entries_and_folders_alone(tmp_path):
    entry = _entry()
    assert dist.combine_stage_entry(entry) is entry
    assert dist.gather_over_processes({"b": 2.5, "a": 1.0}) == [{"a": 1.0, "b": 2.5}]
    calls = []
    assert dist.run_on_every_process(lambda out, **kw: calls.append((out, kw)) or 7, tmp_path, k=1)
    assert calls == [(tmp_path, {"k": 1})]


def test_float64_values_survive_the_float32_wire():
    values = np.array([1234.56789012345, 3.2e-9, 0.0, 7.0e5 + 1e-6])
    back = dist.from_float32_pairs(dist.to_float32_pairs(values))
    assert dist.to_float32_pairs(values).dtype == np.float32
    np.testing.assert_allclose(back, values, rtol=1e-12, atol=0)
    assert not np.allclose(values.astype(np.float32), values, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("size", "count"), [(16, 2), (15, 2), (12, 3)], ids=["even", "odd", "3"])
def test_local_batches_rebuild_the_global_batch(size, count):
    indices = np.arange(100, 100 + size)
    parts = [dist.local_batch(indices, i, count) for i in range(count)]
    assert len({len(p) for p in parts}) == 1  # every process feeds as many rows
    kept = size - size % count  # an uneven last batch loses its trailing rows
    np.testing.assert_array_equal(np.concatenate(parts), indices[:kept])
    np.testing.assert_array_equal(dist.local_batch(indices), indices)  # one process: all


def test_a_batch_smaller_than_the_process_count_is_refused():
    with pytest.raises(dist.DistributionError, match="batch size of at least 4"):
        dist.local_batch(np.arange(3), 0, 4)


def test_report_lines_list_each_process():
    entries = [StageEntry.from_dict(_entry())]
    assert dist.process_energy_lines(entries) == []
    gathered = [dist.stage_figures(_entry(energy_j=1.0)), dist.stage_figures(_entry(energy_j=2.5))]
    entries = [StageEntry.from_dict(dist.merge_process_entries(_entry(), gathered))]
    lines = dist.process_energy_lines(entries)
    assert lines[1].startswith("energy by process") and lines[2] == "  finetune: 0: 1.0, 1: 2.5"


# ----------------------------------------------------------------- the real two-process run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_inputs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((96, 8, 8, 1), dtype="float32")
    y = rng.integers(0, 3, 96).astype("int32")
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x[:64], y_train=y[:64], x_val=x[64:], y_val=y[64:])
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.save(tmp_path / "model.keras")
    return data, tmp_path / "model.keras"


def _run(tmp_path, name, out, *extra):
    """Starts `keras-lean run` on the tiny inputs under JAX, with its own temporary folder."""
    scratch = tmp_path / f"tmp-{name}"
    scratch.mkdir()
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.update(TMPDIR=str(scratch), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-c", "from keras_lean.cli import cli; cli()", "run"]
    cmd += ["--out", str(tmp_path / out), "--data", str(tmp_path / "data.npz")]
    cmd += ["--model", str(tmp_path / "model.keras"), "--epochs", "1", "--batch-size", "16"]
    cmd += ["--jit-compile", "on", "--max-accuracy-drop", "1", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, scratch


def _finish(proc) -> str:
    try:
        log, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    text = log.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def _weights_and_masks(path):
    from keras_lean.sparsity import get_masks

    model = keras.models.load_model(path)
    return model.get_weights(), get_masks(model)


@pytest.mark.slow
def test_two_process_pipeline_writes_one_report_that_sums_their_energy(tmp_path):
    _tiny_inputs(tmp_path)
    flags = ["--distribution", "data-parallel", "--coordinator", f"127.0.0.1:{_free_port()}"]
    flags += ["--num-processes", "2", "--process-id"]
    procs = {
        "single": _run(tmp_path, "single", "single"),
        # The same command line on both processes (as on two machines): one run folder.
        "p0": _run(tmp_path, "p0", "multi", *flags, "0"),
        "p1": _run(tmp_path, "p1", "multi", *flags, "1"),
    }
    logs = {name: _finish(proc) for name, (proc, _) in procs.items()}
    assert "energy by process" in logs["p0"] and "total:" in logs["p0"]
    assert "process 1: done; process 0 wrote" in logs["p1"] and "total:" not in logs["p1"]
    # Process 1 worked in a scratch folder of its own, removed at the end.
    assert not any(procs["p1"][1].iterdir())

    report = json.loads((tmp_path / "multi" / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["baseline", "configure", "finetune", "validate", "deploy"]
    for name, s in stages.items():
        per = s["details"]["processes"]
        assert [p["process"] for p in per] == [0, 1], name
        assert all(p["energy_j"] > 0 for p in per), name
        assert s["energy_j"] == pytest.approx(sum(p["energy_j"] for p in per), rel=1e-9), name
        assert s["duration_s"] == pytest.approx(max(p["duration_s"] for p in per)), name
        assert "(sum of 2 processes" in s["energy_method"], name
    single = json.loads((tmp_path / "single" / "report.json").read_text())
    assert all("processes" not in s["details"] for s in single["stages"])

    # Two processes with 8 rows each per step train like one process with batches of 16.
    runs = ("multi", "single")
    (w2, m2), (w1, m1) = (_weights_and_masks(tmp_path / r / "finetuned.keras") for r in runs)
    assert m1 and sorted(m1) == sorted(m2)
    for key in m1:
        np.testing.assert_array_equal(np.asarray(m2[key]), np.asarray(m1[key]), err_msg=key)
    for a, b in zip(w2, w1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_several_processes_take_xla_without_measuring(monkeypatch):
    from types import SimpleNamespace

    from keras_lean.pipeline.steps import jit

    ctx = SimpleNamespace(recipe=SimpleNamespace(finetune=SimpleNamespace(jit_compile="auto")))
    monkeypatch.setattr(dist, "process_count", lambda: 2)
    decision, probe = jit.jit_choice(ctx, model=None)  # nothing measured: no model needed
    assert decision.jit_compile is True and probe is None
    assert decision.reason == jit.MULTI_PROCESS_JIT
    ctx.recipe.finetune.jit_compile = "off"  # an explicit recipe choice still wins
    assert jit.jit_choice(ctx, model=None)[0].jit_compile is False


def test_one_process_feeds_its_arrays_unchanged():
    x, y = np.zeros((10, 2)), np.arange(10)
    assert dist.local_arrays(x, y, 4) == (x, y, 4)


def test_the_global_batch_must_split_evenly():
    dist.check_global_batch(6, 3)
    dist.check_global_batch(7)  # one process: any batch size
    with pytest.raises(dist.DistributionError, match="batch size 7 must be a multiple of the 2"):
        dist.check_global_batch(7, 2)


def test_replicated_predictions_patch_only_several_processes_and_restore(monkeypatch):
    original = keras.Model.predict
    with dist.replicated_predictions():
        assert keras.Model.predict is original  # one process: nothing changes
    monkeypatch.setattr(dist, "process_count", lambda: 2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x = np.ones((4, 3), "float32")
    with dist.replicated_predictions():
        assert keras.Model.predict is not original
        out = model.predict(x, verbose=0)
        assert keras.distribution.distribution() is None
    assert keras.Model.predict is original
    np.testing.assert_allclose(out, keras.ops.convert_to_numpy(model(x)), rtol=1e-6)
