"""The typed stage records: `StageEntry` round-trips `report.json`; `_stage` fills a recorder."""

from __future__ import annotations

import dataclasses
import json

import pytest

from keras_lean.pipeline.rundir import RunDir
from keras_lean.pipeline.steps.stage import StageEntry, StageRecorder, _stage

FULL = {
    "stage": "deploy",
    "started_at": "2026-12-01T12:00:00",
    "duration_s": 3.25,
    "energy_j": 41.5,
    "energy_kwh": 41.5 / 3.6e6,
    "energy_method": "measured (rapl)",
    "emissions_kg": 5.5e-6,
    "flops": 1.0e9,
    "accuracy": 0.97,
    "params": 1200,
    "nonzero_params": 300,
    "gzip_bytes": 4096,
    "details": {"export": {"quantization": "int8"}},
}


def test_entry_round_trips_the_report_format():
    entry = StageEntry.from_dict(FULL)
    assert entry.to_dict() == FULL
    assert list(entry.to_dict()) == list(FULL)  # report.json keeps its key order
    assert StageEntry.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"from_a_newer_version": 1}, {}),
        ({"details": None}, {"details": {}}),
    ],
    ids=["unknown-key-ignored", "null-details"],
)
def test_entry_from_dict_tolerates(change, expected):
    entry = StageEntry.from_dict({**FULL, **change})
    assert entry.to_dict() == {**FULL, **expected}


@pytest.mark.parametrize(
    "doc, message",
    [
        ([], r"must be an object\. Received: list"),
        ({"stage": "baseline", "duration_s": 1.0}, r"'baseline' lacks started_at, energy_j"),
        ({k: v for k, v in FULL.items() if k != "energy_method"}, r"lacks energy_method"),
    ],
    ids=["not-a-mapping", "missing-several", "missing-one"],
)
def test_entry_from_dict_names_what_is_wrong(doc, message):
    with pytest.raises(ValueError, match=message):
        StageEntry.from_dict(doc)


def test_stage_records_what_the_block_filled(tmp_path):
    run = RunDir(tmp_path)
    with _stage(run, "validate", {}) as rec:
        assert isinstance(rec, StageRecorder) and rec.entry is None
        rec.accuracy = 0.5
        rec.flops = 123.0
        rec.set_sizes(10, 4, 99)
        rec.details = {"passed": True}
    assert isinstance(rec.entry, StageEntry)
    assert (rec.entry.accuracy, rec.entry.flops) == (0.5, 123.0)
    assert (rec.entry.params, rec.entry.nonzero_params, rec.entry.gzip_bytes) == (10, 4, 99)
    assert rec.entry.details == {"passed": True} and rec.entry.duration_s >= 0
    (stored,) = run.read_entries()
    assert stored == rec.entry
    assert (run.energy_dir("validate") / "energy.json").exists()


def test_a_failed_stage_records_nothing(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), _stage(run, "validate", {}) as rec:
        rec.accuracy = 0.5
        raise RuntimeError("boom")
    assert rec.entry is None and run.read_entries() == []
    assert not run.energy_dir("validate").exists()
    assert (run.energy_dir("validate").with_name("validate.failed") / "energy.json").exists()


def test_recorder_fields_match_the_entry_fields():
    # Every figure a step can fill is a field of the entry it becomes.
    filled = {f.name for f in dataclasses.fields(StageRecorder)} - {"tracker", "entry"}
    assert filled <= {f.name for f in dataclasses.fields(StageEntry)}
