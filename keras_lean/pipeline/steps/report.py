"""`RUN/report.json` read back and rendered: the stage table, the summary, the detail tables.

Method-specific lines (lottery rounds, structured widths, ...) come from each method class's
`report_lines(report)`, so adding a method adds its lines without touching this module. A run
with a dense reference (`run(compare_dense=True)`) ends its table with one line:
`fine-tune energy: X J vs dense Y J (−Z %), accuracy A vs dense B`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

from keras_lean.pipeline.distribution import process_energy_lines
from keras_lean.pipeline.rundir import RunDir
from keras_lean.pipeline.steps.common import as_run
from keras_lean.pipeline.steps.stage import StageEntry


def fmt(value: Any, spec: str) -> str:
    """`spec.format(value)`, or `-` for a missing value (the tables' blank)."""
    return "-" if value is None else spec.format(value)


def tflite_size_phrase(ratio: float | None, quantization: str | None) -> str | None:
    """`TFLite 2.00x smaller (gzip) than the baseline's int8 TFLite`: the deployed `.tflite`
    against the baseline's exported with the same settings (`ratio`: deployed / baseline gzip
    bytes, deploy's `tflite_gzip_ratio`), in the direction of deploy's own lines ("N x smaller");
    None without a ratio."""
    if ratio is None or not ratio > 0:
        return None
    kind = {None: "", "none": "float ", "dynamic": "dynamic-range "}.get(
        quantization, f"{quantization} "
    )
    change = f"{1 / ratio:.2f}x smaller" if ratio <= 1 else f"{ratio:.2f}x larger"
    return f"TFLite {change} (gzip) than the baseline's {kind}TFLite"


def text_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: Sequence[int] = (),
    indent: str = "",
    rule: bool = False,
) -> list[str]:
    """A fixed-width text table as lines: columns padded to their widest cell.

    Args:
        headers: the column titles.
        rows: the cells, already formatted (see `fmt`).
        left: indexes of the left-aligned columns (the others are right-aligned).
        indent: prefix of every line.
        rule: draw a line of dashes under the headers.
    """
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        text = "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return (indent + text).rstrip()

    out = [line(headers)]
    if rule:
        out.append(indent + "  ".join("-" * w for w in widths))
    return out + [line(r) for r in rows]


#: The stage table's columns: title, StageEntry field, how a value prints.
_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("stage", "stage", str),
    ("time s", "duration_s", "{:.1f}".format),
    ("energy J", "energy_j", "{:.1f}".format),
    ("kWh", "energy_kwh", "{:.2e}".format),
    ("energy method", "energy_method", str),
    ("CO2 g", "emissions_kg", lambda v: f"{v * 1000:.3f}"),
    ("accuracy", "accuracy", "{:.4f}".format),
    ("params", "params", "{:,}".format),
    ("nonzero", "nonzero_params", "{:,}".format),
    ("gzip KB", "gzip_bytes", lambda v: f"{v / 1024:.1f}"),
)


@dataclasses.dataclass(frozen=True)
class RunReport:
    """The contents of `RUN/report.json`.

    Attributes:
        run: the run folder's name.
        entries: one `StageEntry` per stage, in pipeline order.
    """

    run: str
    entries: tuple[StageEntry, ...]

    @property
    def stages(self) -> tuple[dict, ...]:
        """The entries in their `report.json` form."""
        return tuple(e.to_dict() for e in self.entries)

    def entry(self, stage: str) -> StageEntry | None:
        """The entry of `stage`, or None when that stage has not run."""
        return next((e for e in self.entries if e.stage == stage), None)

    def to_dict(self) -> dict:
        return {"version": 1, "run": self.run, "stages": list(self.stages)}

    def method_reports(self) -> dict:
        """name -> each method's report: the finetune record, updated by what deploy found."""
        methods: dict = {}
        for stage in ("finetune", "deploy"):
            e = self.entry(stage)
            for name, rep in ((e.details.get("methods") if e else None) or {}).items():
                if isinstance(rep, dict):
                    methods[name] = {**methods.get(name, {}), **rep}
        return methods

    def summary(self) -> dict:
        """Headline figures: final accuracy and sparsity, TFLite gzip ratio, total time/energy."""
        out: dict[str, Any] = {
            "duration_s": sum(e.duration_s or 0 for e in self.entries),
            "energy_j": sum(e.energy_j or 0 for e in self.entries),
            "emissions_kg": sum(e.emissions_kg or 0 for e in self.entries),
        }
        v = self.entry("validate")
        if v is not None:
            out["validation"] = v.details
        d = self.entry("deploy")
        if d is not None:
            if d.params:
                out["sparsity"] = 1 - d.nonzero_params / d.params
            out["tflite_gzip_ratio"] = d.details.get("tflite_gzip_ratio")
            out["tflite_quantization"] = (d.details.get("export") or {}).get("quantization")
            out["tflite_accuracy"] = d.accuracy
            # Sparsity of the pruned kernels (biases and dense layers excluded), as methods report.
            for name, rep in (d.details.get("methods") or {}).items():
                final = rep.get("final") if isinstance(rep, dict) else None
                if isinstance(final, dict) and "sparsity" in final:
                    out.setdefault("pruned_sparsity", {})[name] = final["sparsity"]
        dense = self.dense_comparison()
        if dense is not None:
            out["dense_reference"] = dense
        return out

    def dense_comparison(self) -> dict | None:
        """The fine-tune against its dense reference (`dense_reference.compare`), or None.

        Computed from the two entries as they are now; `stale` is True when the fine-tune ran
        again after the dense reference was measured (its figures then describe another run).
        """
        from keras_lean.pipeline.steps.dense_reference import STAGE, compare

        dense, ft = self.entry(STAGE), self.entry("finetune")
        if dense is None or ft is None:
            return None
        out = compare(ft, dense)
        out["stale"] = dense.details.get("finetune_started_at") != ft.started_at
        return out

    def dense_line(self) -> str | None:
        """`fine-tune energy: X J vs dense Y J (−Z %), accuracy A vs dense B`, or None."""
        from keras_lean.pipeline.steps.dense_reference import comparison_line

        dense = self.dense_comparison()
        if dense is None:
            return None
        stale = " (stale: finetune ran again after the dense reference)" if dense["stale"] else ""
        return comparison_line(dense) + stale

    def table(self) -> str:
        """The stages as a fixed-width text table, then the summary and the detail tables."""
        rows = [
            ["-" if getattr(e, key) is None else show(getattr(e, key)) for _, key, show in _COLUMNS]
            for e in self.entries
        ]
        lines = text_table([c[0] for c in _COLUMNS], rows, left=(0, 4), rule=True)
        dense = self.dense_line()
        last = ["", dense] if dense is not None else []
        return "\n".join([*lines, "", *self._summary_lines(), *self._detail_lines(), *last])

    def _summary_lines(self) -> list[str]:
        summ = self.summary()
        out = []
        if "validation" in summ:
            v = summ["validation"]
            verdict = "PASS" if v["passed"] else "FAIL"
            if v.get("metric") == "perplexity":  # a causal LM: gated by the perplexity rise
                out.append(
                    f"validation: perplexity baseline {v['baseline_perplexity']:.3f} -> "
                    f"fine-tuned {v['finetuned_perplexity']:.3f} (rise "
                    f"{v['perplexity_rise']:+.2%}, max {v['max_perplexity_rise']:.2%}): {verdict}"
                )
            else:
                out.append(
                    f"validation: baseline {v['baseline_accuracy']:.4f} -> fine-tuned "
                    f"{v['finetuned_accuracy']:.4f} (drop {v['accuracy_drop']:+.4f}, max "
                    f"{v['max_accuracy_drop']}): {verdict}"
                )
        if "sparsity" in summ:
            size = tflite_size_phrase(
                summ.get("tflite_gzip_ratio"), summ.get("tflite_quantization")
            )
            pruned = summ.get("pruned_sparsity") or {}
            out.append(
                f"deployed: {summ['sparsity']:.1%} of all parameters are zero"
                + "".join(f"; {n}: {v:.1%} of pruned weights" for n, v in pruned.items())
                + (f"; {size}" if size is not None else "")
            )
        out.append(
            f"total: {summ['duration_s']:.1f} s, {summ['energy_j']:.1f} J, "
            f"{summ['emissions_kg'] * 1000:.3f} g CO2e"
        )
        return out

    def _detail_lines(self) -> list[str]:
        """Guard stages, each method's own lines and the XLA probe, where present."""
        ft_entry = self.entry("finetune")
        ft = ft_entry.details if ft_entry is not None else {}
        out = _guard_lines(ft.get("guard"))
        out += process_energy_lines(self.entries)  # --distribution data-parallel, N processes
        for name, rep in self.method_reports().items():
            out += _method_lines(name, rep)
        dep = self.entry("deploy")
        if dep is not None:  # sizes, ratios, accuracy, latency per export (deploy's own lines)
            from keras_lean.pipeline.steps.deploy import report_lines as deploy_lines

            out += deploy_lines(dep.details or {})
        out += _epoch_lines(self)
        probe, jit = ft.get("jit_probe"), ft.get("jit_compile") or {}
        if isinstance(probe, dict):
            out += [
                "",
                f"jit_compile auto: measured XLA {'on' if jit.get('jit_compile') else 'off'} in "
                f"{probe['duration_s']:.1f} s, {probe['energy_j']:.1f} J (inside the finetune "
                "stage; later fine-tunes of this run folder reuse the decision)",
            ]
        return out


def _guard_lines(guard: Any) -> list[str]:
    if not (isinstance(guard, dict) and guard.get("stages")):
        return []
    ppl = guard.get("metric") == "perplexity"  # a causal LM: judged by the perplexity rise
    value, change = (
        ("val_perplexity", "perplexity_rise") if ppl else ("val_accuracy", "accuracy_drop")
    )
    rows = [
        (
            str(r["stage"]),
            f"{r['target_sparsity']:g}",
            fmt(r.get("sparsity"), "{:.1%}"),
            fmt(r.get(value), "{:.3f}" if ppl else "{:.4f}"),
            fmt(r.get(change), "{:+.2%}" if ppl else "{:+.4f}"),
            fmt(r.get("energy_j"), "{:.1f}"),
            "kept" if r.get("kept") else ("ok" if r.get("within_budget") else "over"),
        )
        for r in guard["stages"]
    ]
    headers = (
        "stage",
        "target",
        "sparsity",
        "val ppl" if ppl else "val acc",
        "rise" if ppl else "drop",
        "energy J",
        "status",
    )
    budget = (
        f"baseline perplexity {guard['baseline_perplexity']:.3f}, "
        f"max_perplexity_rise {guard['max_perplexity_rise']:g}"
        if ppl
        else f"baseline accuracy {guard['baseline_accuracy']:.4f}, "
        f"max_accuracy_drop {guard['max_accuracy_drop']:g}"
    )
    return [
        "",
        f"guard stages ({budget}):",
        *text_table(headers, rows, indent="  "),
        f"kept: {guard.get('reason', '')}",
    ]


def _epoch_lines(report: RunReport) -> list[str]:
    """Energy per epoch of the runs that recorded it (a progressive fine-tune, the dense
    reference): `  finetune (structured): 20.1, 14.2, 11.0 J`."""
    from keras_lean.pipeline.plots import epoch_series

    series = epoch_series(report)
    if not series:
        return []
    width = max(len(label) for label in series)
    return [
        "",
        "energy per epoch:",
        *(
            f"  {label + ':':<{width + 1}} "
            + ", ".join(fmt(p["energy_j"], "{:.1f}") for p in points)
            + " J"
            for label, points in series.items()
        ),
    ]


def _method_lines(name: str, report: dict) -> list[str]:
    """The lines method `name` adds to the report (its class's `report_lines`)."""
    from keras_lean.pipeline.methods import get_method_class

    try:
        cls = get_method_class(name)
    except (ImportError, ValueError):  # a method this install does not have: print nothing
        return []
    lines = list(cls.report_lines(report))
    return ["", *lines] if lines else []


def report(out: str | os.PathLike | RunDir) -> RunReport:
    """Reads `RUN/report.json`.

    Raises:
        MissingStepError: the folder has no report yet.
        ValueError: the file is not a keras_lean report.
    """
    run = as_run(out)
    run.require(run.report_file, for_step="report")
    return RunReport(run.name, tuple(run.read_entries()))
