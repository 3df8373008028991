"""Records: dict / JSON round trip, CodeCarbon CSV columns, atomic writes."""

from __future__ import annotations

import csv
import json

import pytest

from keras_lean.energy.records import (
    CODECARBON_COLUMNS,
    CSV_COLUMNS,
    DeviceEnergy,
    EnergyRecord,
    RecordLog,
    atomic_write_text,
    host_info,
    read_records,
    records_to_csv,
    records_to_json,
    write_csv,
    write_json,
)


def make_record(**overrides) -> EnergyRecord:
    devices = (
        DeviceEnergy("gpu:0", "measured:nvml-counter", "device", 700.0, None, {"name": "X"}),
        DeviceEnergy(
            "cpu",
            "estimated:cpu-tdp",
            "process",
            100.0,
            None,
            {"formula": "f", "tdp_w": 20.0},
            ("note",),
        ),
    )
    fields = dict(
        name="finetune",
        parent="pipeline",
        start_time="2026-01-01T00:00:00.000+00:00",
        end_time="2026-01-01T00:00:10.000+00:00",
        duration_s=10.0,
        cpu_time_s=8.0,
        energy_j=1200.0,
        energy_kwh=1200.0 / 3.6e6,
        cpu_energy_j=150.0,
        gpu_energy_j=1050.0,
        ram_energy_j=0.0,
        devices=devices,
        method="measured:nvml-counter+estimated:cpu-tdp",
        carbon_intensity_g_per_kwh=475.0,
        carbon_source="world average",
        pue=1.5,
        emissions_kg=1200.0 / 3.6e6 * 475.0 / 1000,
        flops=2.5e12,
        it_energy_j=800.0,
        skipped=("cpu absent:rapl: none",),
        run_id="r1",
        project_name="p",
    )
    fields.update(overrides)
    return EnergyRecord(**fields)


def test_dict_round_trip_keeps_everything():
    record = make_record()
    d = record.to_dict()
    json.dumps(d)  # JSON-able
    assert EnergyRecord.from_dict(d) == record
    assert d["devices"][1]["notes"] == ["note"]


def test_from_dict_rejects_unknown_keys_and_versions():
    d = make_record().to_dict()
    with pytest.raises(ValueError, match="Unknown key 'energy_wh' for EnergyRecord"):
        EnergyRecord.from_dict({**d, "energy_wh": 1})
    with pytest.raises(ValueError, match="Unknown key 'watts' for DeviceEnergy"):
        DeviceEnergy.from_dict({**d["devices"][0], "watts": 3})
    with pytest.raises(ValueError, match="EnergyRecord version must be 1. Received: version=9"):
        EnergyRecord.from_dict({**d, "version": 9})


def test_json_file_round_trip(tmp_path):
    records = [make_record(), make_record(name="b", parent=None, flops=None)]
    path = write_json(records, tmp_path / "energy.json", run={"run_id": "r1"})
    assert read_records(path) == records
    assert read_records(tmp_path) == records  # the folder works too
    assert json.loads(path.read_text())["run"] == {"run_id": "r1"}


def test_read_records_rejects_other_files(tmp_path):
    (tmp_path / "a.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="is not an energy.json"):
        read_records(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"version": 2, "records": []}')
    with pytest.raises(ValueError, match="energy.json version must be 1"):
        read_records(tmp_path / "b.json")


def test_csv_uses_codecarbon_names_and_units(tmp_path):
    record = make_record()
    write_csv([record], tmp_path / "e.csv")
    with open(tmp_path / "e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = tuple(rows[0])
    assert header == CSV_COLUMNS and header[: len(CODECARBON_COLUMNS)] == CODECARBON_COLUMNS
    for name in (
        "duration",
        "emissions",
        "cpu_energy",
        "gpu_energy",
        "ram_energy",
        "energy_consumed",
        "emissions_rate",
        "cpu_power",
        "country_iso_code",
        "pue",
    ):
        assert name in header
    row = rows[0]
    assert float(row["duration"]) == 10.0
    assert float(row["energy_consumed"]) == pytest.approx(1200.0 / 3.6e6)  # kWh
    assert float(row["gpu_energy"]) == pytest.approx(1050.0 / 3.6e6)
    assert float(row["cpu_power"]) == pytest.approx(15.0)  # W, after PUE
    assert float(row["emissions_rate"]) == pytest.approx(record.emissions_kg / 10.0)
    assert row["gpu_model"] == "X" and row["gpu_count"] == "1"
    assert row["tracking_mode"] == "machine"  # something was measured
    assert row["cpu_method"] == "estimated:cpu-tdp" and row["flops"] == "2500000000000.0"


def test_csv_tracking_mode_process_when_only_estimated():
    record = make_record(devices=(DeviceEnergy("cpu", "estimated:cpu-tdp", "process", 1.0),))
    text = records_to_csv([record])
    row = next(csv.DictReader(text.splitlines()))
    assert row["tracking_mode"] == "process" and row["gpu_count"] == "0"


def test_atomic_write_replaces_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "three")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_record_log_matches_the_plain_writers():
    records = [make_record(), make_record(name="b", flops=None)]
    log = RecordLog(host=host_info())
    assert json.loads(log.json_text({"a": 1})) == json.loads(records_to_json([], {"a": 1}))
    for r in records:
        log.append(r)
    assert log.json_text({"a": 1}) == records_to_json(records, {"a": 1})
    assert log.csv_text() == records_to_csv(records, log.host)
    assert json.loads(log.json_text())["records"] == [r.to_dict() for r in records]
