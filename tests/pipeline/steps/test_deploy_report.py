"""`keras-lean report`'s deploy lines, and the `--keras-quantization` override."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from keras_lean import _cli_options as opts
from keras_lean.pipeline import Recipe
from keras_lean.pipeline.overrides import RecipeOverrides
from keras_lean.pipeline.steps.deploy import report_lines


def _details(sparse: bool) -> dict:
    exp = {
        "quantization": "int8",
        "latency_batch_size": 32,
        "tflite_raw_bytes": 20_000,
        "tflite_gzip_bytes": 10_000,
        "tflite_accuracy": 0.97,
        "keras_accuracy": 0.975,
        "max_abs_diff": 0.02,
        "tflite_latency_ms": 0.1,
        "keras_latency_ms": 2.0,
        "sparse_tflite": sparse,
        "equivalence": [{"candidate": "tflite:int8", "passed": True}],
    }
    if sparse:
        exp.update(
            dense_tflite_raw_bytes=80_000,
            dense_tflite_gzip_bytes=30_000,
            dense_tflite_latency_ms=0.1,
            sparse_vs_dense_max_abs_diff=0.0,
            sparse_latency_note="storage only: the runtime expands ... (DENSIFY ops)",
        )
    return {
        "export": exp,
        "baseline_export": {"keras_accuracy": 0.98},
        "float_baseline_tflite": {"raw_bytes": 600_000, "gzip_bytes": 500_000, "latency_ms": 0.5},
        "keras_quantization": {
            "mode": "int8",
            "raw_bytes": 50_000,
            "float_raw_bytes": 100_000,
            "accuracy": 0.97,
            "float_accuracy": 0.975,
            "note": None,
        },
        "equivalence_passed": True,
    }


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_report_lines_give_sizes_ratios_accuracy_and_latency(sparse):
    text = "\n".join(report_lines(_details(sparse)))
    assert "20,000 B raw, 10,000 B gzip; 30.00x smaller raw, 50.00x gzip" in text
    assert "TFLite int8 0.9700 (-1.00 pt), Keras 0.9750, baseline 0.9800" in text
    assert "TFLite 0.100 ms vs the float baseline's 0.500 ms (5.00x faster)" in text
    assert "Keras int8 .keras: 50,000 B raw vs float 100,000 B (2.00x smaller)" in text
    assert ("no speed from sparse storage here: storage only" in text) is sparse
    assert ("dense-format twin: 80,000 B raw" in text) is sparse


def test_report_lines_name_a_failed_check_and_skip_missing_exports():
    d = _details(False)
    d["equivalence_passed"] = False
    d["export"]["equivalence"] = [{"candidate": "tflite:int8", "passed": False}]
    assert report_lines(d)[-1] == "  equivalence FAILED: tflite:int8"
    assert report_lines({}) == []
    del d["float_baseline_tflite"]  # compare_baseline off: ratios are unknown, not invented
    assert "-x" not in "\n".join(report_lines(d)) and "smaller raw" in report_lines(d)[2]


def test_keras_quantization_override_sets_the_export_field():
    rec = RecipeOverrides(keras_quantization="int4", quantization="int8").apply(Recipe())
    assert (rec.export.keras_quantization, rec.export.quantization) == ("int4", "int8")
    assert rec.export.formats == Recipe().export.formats
    with pytest.raises(ValueError, match=r"export\.keras_quantization: must be one of none"):
        RecipeOverrides(keras_quantization="int2").apply(Recipe())


def test_keras_quantization_cli_option_reaches_the_overrides():
    @click.command()
    @opts.recipe_options
    def cmd(overrides, recipe):
        return overrides

    r = CliRunner().invoke(cmd, ["--keras-quantization", "gptq"], standalone_mode=False)
    assert r.exit_code == 0, r.output
    assert r.return_value.keras_quantization == "gptq"
    bad = CliRunner().invoke(cmd, ["--keras-quantization", "int2"])
    assert bad.exit_code == 2 and "'int2' is not one of" in bad.output


def test_the_deploy_recipe_example_parses():
    from pathlib import Path

    from keras_lean.pipeline import load_recipe

    path = Path(__file__).parents[3] / "docs" / "recipes" / "deploy_structured70_int8.yaml"
    rec = load_recipe(path)
    opts = rec.method_options["structured"]
    assert rec.methods == ("structured",) and (opts.ratio, opts.mode) == (0.7, "oneshot")
    assert rec.export.quantization == "int8" and rec.max_accuracy_drop == 0.01
