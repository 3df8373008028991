"""scripts/bench_step_floor.py: one tiny configuration end to end (a few seconds)."""

from __future__ import annotations

import json

from tests._scripts import load_script


def test_floor_rows_compare_each_pruned_copy_with_the_dense_baseline(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--base-epochs", "1", "--epochs", "1", "--batch-sizes", "512", "--ratios", "0.5"]
    rows = load_script("bench_step_floor").main(argv + ["--json", str(out)])
    assert json.loads(out.read_text()) == rows
    dense, pruned = rows
    assert (dense["ratio"], pruned["ratio"]) == (0.0, 0.5)
    assert dense["cpu_vs_dense"] == 1.0 and dense["flops_vs_dense"] == 1.0
    # Half the channels of each coupled conv/dense group: about a quarter of the FLOPs.
    assert pruned["params"] < dense["params"] / 2
    assert 0.2 < pruned["flops_vs_dense"] < 0.35
    assert pruned["cpu_vs_dense"] == pruned["cpu_s"] / dense["cpu_s"] > 0
    assert all(r["batch_size"] == 512 and r["steps_per_execution"] == 1 for r in rows)
