from __future__ import annotations

import json

import pytest

from keras_lean.pipeline import build_model
from keras_lean.pipeline.rundir import (
    MissingStepError,
    RunDir,
    atomic_directory,
    atomic_write_json,
    save_model_atomic,
)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_atomic_json_and_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert _leftovers(tmp_path) == []


def test_failed_model_save_keeps_the_old_file(tmp_path, monkeypatch):
    m = build_model("mlp", (4,), 3)
    path = save_model_atomic(m, tmp_path / "baseline.keras")
    before = path.read_bytes()

    def broken_save(self, filepath, *a, **k):
        with open(filepath, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(type(m), "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model_atomic(m, path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match=r"must end in '\.keras'"):
        save_model_atomic(m, tmp_path / "model.h5")


def test_atomic_directory_replaces_or_keeps(tmp_path):
    target = tmp_path / "export"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert _leftovers(tmp_path) == []


def test_require_names_the_step_to_run(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(MissingStepError, match=r"run `keras-lean baseline --out .*` first"):
        run.require(run.baseline, for_step="finetune")
    with pytest.raises(MissingStepError, match=r"keras-lean configure"):
        run.require(run.recipe, for_step="finetune")
    with pytest.raises(MissingStepError, match=r"keras-lean finetune"):
        run.require(run.finetuned, for_step="deploy")


def test_record_stage_replaces_and_orders(tmp_path):
    run = RunDir(tmp_path)
    run.record_stage({"stage": "finetune", "n": 1})
    run.record_stage({"stage": "baseline", "n": 1})
    run.record_stage({"stage": "finetune", "n": 2})
    assert [(s["stage"], s["n"]) for s in run.read_report()] == [("baseline", 1), ("finetune", 2)]
    run.report_file.write_text("[]")
    with pytest.raises(ValueError, match="is not a keras_lean report"):
        run.read_report()
    run.report_file.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        run.read_report()


def _entry(stage, **kw):
    base = {
        "stage": stage,
        "started_at": "2026-01-01T00:00:00",
        "duration_s": 1.5,
        "energy_j": 2.0,
        "energy_kwh": 2.0 / 3.6e6,
        "energy_method": "estimated (cpu tdp)",
        "emissions_kg": 1e-7,
    }
    return {**base, **kw}


def test_read_entries_gives_typed_entries_in_order(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_entries() == []
    run.record_stage(_entry("finetune", accuracy=0.9, details={"epochs_run": 2}))
    run.record_stage(_entry("baseline", params=10, nonzero_params=7))
    entries = run.read_entries()
    assert [e.stage for e in entries] == ["baseline", "finetune"]
    assert entries[0].params == 10 and entries[0].nonzero_params == 7
    assert entries[0].accuracy is None and entries[0].details == {}
    assert entries[1].accuracy == 0.9 and entries[1].details == {"epochs_run": 2}
    run.record_stage({"stage": "validate", "duration_s": 1.0})
    with pytest.raises(ValueError, match=r"'validate' lacks started_at, energy_j"):
        run.read_entries()


def test_method_state_dir_is_inside_the_run(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.method_state_dir == tmp_path / "r" / "methods"
