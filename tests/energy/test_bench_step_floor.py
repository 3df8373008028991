"""scripts/bench_step_floor.py: one tiny configuration end to end (a few seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_step_floor.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_step_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_rows_compare_each_pruned_copy_with_the_dense_baseline(tmp_path):
    out = tmp_path / "rows.json"
    argv = ["--base-epochs", "1", "--epochs", "1", "--batch-sizes", "512", "--ratios", "0.5"]
    rows = _load_script().main(argv + ["--json", str(out)])
    assert json.loads(out.read_text()) == rows
    dense, pruned = rows
    assert (dense["ratio"], pruned["ratio"]) == (0.0, 0.5)
    assert dense["cpu_vs_dense"] == 1.0 and dense["flops_vs_dense"] == 1.0
    # Half the channels of each coupled conv/dense group: about a quarter of the FLOPs.
    assert pruned["params"] < dense["params"] / 2
    assert 0.2 < pruned["flops_vs_dense"] < 0.35
    assert pruned["cpu_vs_dense"] == pruned["cpu_s"] / dense["cpu_s"] > 0
    assert all(r["batch_size"] == 512 and r["steps_per_execution"] == 1 for r in rows)
