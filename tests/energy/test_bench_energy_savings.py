"""scripts/bench_energy_savings.py: the ratio arithmetic (fast) and a --quick run (about 6 s)."""

from __future__ import annotations

import pytest

from tests._scripts import load_script


def _arm(energy_j, acc, nonzero=100):
    return {
        "energy_j": energy_j,
        "wall_s": energy_j / 10,
        "fit_s": energy_j / 20,
        "fit_energy_j": energy_j / 2,
        "val_accuracy": acc,
        "trainable_params": 7,
        "deployed_params": 100,
        "deployed_nonzero": nonzero,
        "epoch_j": [energy_j / 4, energy_j / 4],
    }


def test_summary_uses_paired_per_seed_ratios():
    script = load_script("bench_energy_savings")
    per_seed = []
    for scale in (1.0, 2.0, 4.0):  # a drifting machine: every arm of a seed costs `scale` x
        seed = {arm: _arm(100.0 * scale, 0.90) for arm in script.ARMS}
        seed["lora"] = _arm(60.0 * scale, 0.891)
        per_seed.append(seed)
    rows = script.summarize(per_seed, script.ARMS)
    assert rows["dense"]["energy_ratio"] == pytest.approx(1.0)
    assert rows["lora"]["energy_ratios"] == pytest.approx([0.6, 0.6, 0.6])
    assert rows["lora"]["energy_ratio"] == pytest.approx(0.6)
    assert rows["lora"]["accuracy_share"] == pytest.approx(0.99)
    assert rows["lora"]["drop_points"] == pytest.approx(0.9)
    assert rows["lora"]["epoch_j"] == pytest.approx([30.0, 30.0])  # median over seeds


def test_quick_run_measures_the_chosen_arms(capsys):
    arms = [
        "magnitude-80%",
        "lora",
        "structured50+lora",
        "structured50",
        "structured50-progressive",
    ]
    result = load_script("bench_energy_savings").main(["--quick", "--arms", *arms])
    out = capsys.readouterr().out
    # A progressive arm brings its same-loop dense reference, dense-loop.
    assert set(result["rows"]) == {"dense", "dense-loop", *arms}
    assert result["rows"]["structured50-progressive"]["reference"] == "dense-loop"
    assert result["rows"]["lora"]["reference"] == "dense"
    for arm, row in result["rows"].items():
        assert row["energy_j"] > 0, arm
        assert 0.0 <= row["val_accuracy"] <= 1.0, arm
    rows = result["rows"]
    assert rows["structured50"]["deployed_params"] < rows["dense"]["deployed_params"]
    assert rows["lora"]["deployed_params"] == rows["dense"]["deployed_params"]  # merged
    assert rows["magnitude-80%"]["deployed_nonzero"] < 0.5 * rows["dense"]["deployed_nonzero"]
    assert rows["lora"]["trainable_params"] < rows["dense"]["trainable_params"]
    assert "| arm |" in out and "not expected to save training energy" in out
    prog = rows["structured50-progressive"]
    assert prog["deployed_params"] < rows["dense"]["deployed_params"]


@pytest.mark.slow
def test_quick_run_measures_every_arm(capsys):
    script = load_script("bench_energy_savings")
    result = script.main(["--quick"])
    assert set(result["rows"]) == set(script.ARMS)
    for arm, row in result["rows"].items():
        assert row["energy_j"] > 0, arm
        assert 0.0 <= row["val_accuracy"] <= 1.0, arm
