"""Plots (the only module that imports matplotlib): the sweep's PNG and a run's PNG.

Figures are made with `matplotlib.figure.Figure`, never `pyplot`, so no global backend or state
is touched, and written atomically as PNG. matplotlib is optional (the `plot` extra): every
function raises `ImportError` without it, and callers say how to install it
(`PLOT_INSTALL_HINT`).

- `plot_sweep(points, path)`: accuracy, fine-tune energy and TFLite latency against sparsity,
  one line per method (`keras-lean sweep`).
- `plot_run(report, path)`: one run folder's stages: energy and accuracy per stage, energy and
  validation accuracy per epoch where the report has them (progressive structured segments, the
  dense reference), and what the methods did per layer: sparsity (unstructured) or width
  before / after (structured) (`keras-lean report RUN --plot FILE.png`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keras_lean.pipeline.rundir import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from keras_lean.pipeline.sweep import SweepPoint

PLOT_INSTALL_HINT = 'pip install "keras_lean[plot]"'


def fmt(value: Any, spec: str) -> str:
    """`spec.format(value)`, or `-` for a missing value."""
    return "-" if value is None else spec.format(value)


def nan_if_none(value: float | None) -> float:
    """A missing figure as NaN, which matplotlib leaves out of a line."""
    return float("nan") if value is None else value


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A pyplot-free figure with constrained layout.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Writes the figure as a PNG (atomically) and returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# The sweep


def plot_sweep(points: Sequence[SweepPoint], path: str | os.PathLike) -> Path:
    """Draws the gated metric, fine-tune energy and TFLite latency against sparsity into a PNG.

    Three panels share the sparsity axis, one line per method; the top panel shows the
    metric the points were judged by (accuracy, or perplexity for a causal LM), its baseline
    and the band the budget allows (`max_accuracy_drop` below, `max_perplexity_rise` above),
    and the sweet spot is a star with its figures. Failed points are counted in the title.

    Args:
        points: the sweep's points (failed ones are skipped).
        path: the PNG file (written atomically).

    Returns:
        The path.

    Raises:
        ImportError: matplotlib is not installed (`pip install "keras_lean[plot]"`).
    """
    ok = [p for p in points if p.ok and p.sparsity is not None and p.value is not None]
    lm = any(p.metric == "perplexity" for p in ok)  # a causal LM: judged by perplexity
    scale = 1.0 if lm else 100.0

    def baseline_of(p):
        return p.baseline_perplexity if lm else p.baseline_accuracy

    base = next((p for p in ok if baseline_of(p) is not None), None)
    # The decision happens near the baseline: points far below it (a collapsed method) would
    # squash that band, so they sit on the bottom edge as open triangles with their accuracy.
    floor = None
    if base is not None and not lm:
        floor = 100 * (base.baseline_accuracy - max(10 * (base.max_accuracy_drop or 0.0), 0.05))
        if all(100 * p.accuracy >= floor for p in ok):
            floor = None
    fig = new_figure((8.5, 10))
    ax_acc, ax_e, ax_lat = fig.subplots(3, 1, sharex=True, height_ratios=[2.2, 1, 1])
    markers = "osD^vP*X"
    methods = list(dict.fromkeys(p.method for p in ok))
    for k, method in enumerate(methods):
        pts = sorted((p for p in ok if p.method == method), key=lambda p: p.sparsity)
        xs = [100 * p.sparsity for p in pts]
        ys = [scale * p.value if floor is None else max(100 * p.value, floor) for p in pts]
        style = dict(marker=markers[k % len(markers)], label=method, color=f"C{k}")
        ax_acc.plot(xs, ys, **style)
        for p, x, y in zip(pts, xs, ys, strict=True):
            clipped = floor is not None and 100 * p.accuracy < floor
            if clipped:
                ax_acc.scatter(
                    [x], [y], marker="v", s=90, facecolor="white", color=f"C{k}", zorder=4
                )
            ax_acc.annotate(
                f"{p.target:g}: {p.accuracy:.1%}" if clipped else f"{p.target:g}",
                (x, y),
                textcoords="offset points",
                xytext=(4, 6) if clipped else (4, -11),
                fontsize=7,
                color=f"C{k}",
            )
        ax_e.plot(xs, [nan_if_none(p.finetune_energy_j) for p in pts], **style)
        ax_lat.plot(xs, [nan_if_none(p.tflite_latency_ms) for p in pts], **style)

    if base is not None:
        b, budget = scale * baseline_of(base), base.budget or 0.0
        ax_acc.axhline(b, color="0.3", linestyle="--", linewidth=1, label="baseline")
        if lm:  # the relative rise allowed above the baseline's perplexity
            ax_acc.axhspan(
                b, b * (1 + budget), color="tab:green", alpha=0.12, label=f"max rise {budget:.0%}"
            )
        else:
            ax_acc.axhspan(
                b - 100 * budget, b, color="tab:green", alpha=0.12, label=f"max drop {budget:g}"
            )
    best = next((p for p in ok if p.sweet_spot), None)
    what = "perplexity" if lm else "accuracy"
    if best is not None:
        x = 100 * best.sparsity
        star = dict(marker="*", s=320, color="gold", edgecolor="black", zorder=5)
        ax_acc.scatter([x], [scale * best.value], label="sweet spot", **star)
        ax_e.scatter([x], [nan_if_none(best.finetune_energy_j)], **star)
        ax_lat.scatter([x], [nan_if_none(best.tflite_latency_ms)], **star)
        change = (
            f"perplexity {best.value:.3f} (rise {fmt(best.change, '{:+.1%}')})"
            if lm
            else f"accuracy {best.accuracy:.4f} (drop {fmt(best.accuracy_drop, '{:+.4f}')})"
        )
        ax_acc.set_title(
            f"sweet spot \u2605 {best.method} {best.target:g}: {best.sparsity:.1%} sparse, "
            f"{change}, fine-tune "
            f"{fmt(best.finetune_energy_j, '{:.1f}')} J, TFLite "
            f"{fmt(best.tflite_latency_ms, '{:.3f}')} ms",
            fontsize=9,
            loc="left",
        )
    else:
        limit = "max perplexity rise" if lm else "max accuracy drop"
        ax_acc.set_title(f"no sweet spot: no point passed the {limit}", fontsize=9)
    ax_acc.set_ylabel(f"validation {what}" + ("" if lm else " (%)"))
    if floor is not None:
        top = max(100 * p.accuracy for p in ok)
        ax_acc.set_ylim(floor - 0.6, max(top, 100 * base.baseline_accuracy) + 0.6)
        ax_acc.scatter(
            [], [], marker="v", s=60, facecolor="white", color="0.4", label=f"< {floor:.1f} %"
        )
    ax_acc.legend(fontsize=8, loc="best")
    energy_method = next((p.energy_method for p in ok if p.energy_method), None)
    ax_e.set_ylabel("fine-tune energy (J)")
    if energy_method:
        ax_e.set_title(f"fine-tune energy ({energy_method})", fontsize=9, loc="left")
    batch = next((p.latency_batch_size for p in ok if p.latency_batch_size), None)
    ax_lat.set_ylabel("TFLite latency (ms)")
    ax_lat.set_title(
        f"TFLite latency per batch{f' of {batch}' if batch else ''} (median)",
        fontsize=9,
        loc="left",
    )
    ax_lat.set_xlabel("sparsity: % of the baseline's parameters removed or zero")
    for ax in (ax_acc, ax_e, ax_lat):
        ax.grid(True, alpha=0.3)
    failed = len(points) - len(ok)
    fig.suptitle(
        f"keras_lean sweep: {len(ok)} points"
        + (f", {failed} failed (see sweep.csv)" if failed else ""),
        fontsize=11,
    )
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# One run


def _stage_dicts(report: Any) -> list[dict]:
    return [dict(s) for s in report.stages]


def _method_reports(report: Any) -> dict:
    if hasattr(report, "method_reports"):
        return report.method_reports()
    methods: dict = {}
    for s in _stage_dicts(report):
        if s.get("stage") in ("finetune", "deploy"):
            for name, rep in ((s.get("details") or {}).get("methods") or {}).items():
                if isinstance(rep, dict):
                    methods[name] = {**methods.get(name, {}), **rep}
    return methods


def layer_sparsity(report: Any) -> dict[str, dict[str, float]]:
    """method -> {layer: sparsity} from the methods' reports (`final.layers`)."""
    out = {}
    for name, rep in _method_reports(report).items():
        layers = (
            (rep.get("final") or {}).get("layers") if isinstance(rep.get("final"), dict) else None
        )
        if isinstance(layers, dict) and layers:
            out[name] = {str(k): float(v) for k, v in layers.items() if isinstance(v, (int, float))}
    return {k: v for k, v in out.items() if v}


def layer_widths(report: Any) -> dict[str, tuple[int, int]]:
    """layer -> (width before, width after) from the structured method's report."""
    out = {}
    for rep in _method_reports(report).values():
        structure = rep.get("structure") if isinstance(rep, dict) else None
        for r in (structure or {}).get("layers") or [] if isinstance(structure, dict) else []:
            if r.get("width_before") is not None and r.get("width_after") is not None:
                out[str(r["name"])] = (int(r["width_before"]), int(r["width_after"]))
    return out


def epoch_series(report: Any) -> dict[str, list[dict]]:
    """label -> one `{epoch, energy_j, accuracy}` per epoch, for the runs that recorded them.

    A method's report that lists its epochs (`epochs`, or `<part>.epochs` such as the
    progressive segments' `progressive.epochs`: epoch, energy_j, metrics.val_accuracy) gives
    the series `finetune (<method>)`; the dense reference's `details.epoch_log` gives `dense
    reference`.
    """
    out: dict[str, list[dict]] = {}
    for name, rep in _method_reports(report).items():
        if not isinstance(rep, dict):
            continue
        parts = [rep, *(v for v in rep.values() if isinstance(v, dict))]
        epochs = next((p["epochs"] for p in parts if _is_epoch_list(p.get("epochs"))), None)
        if epochs:
            out[f"finetune ({name})"] = [_epoch_point(e) for e in epochs]
    dense = next((s for s in _stage_dicts(report) if s.get("stage") == "dense_reference"), None)
    log = (dense.get("details") or {}).get("epoch_log") if dense else None
    if _is_epoch_list(log):
        out["dense reference"] = [_epoch_point(e) for e in log]
    return out


def _is_epoch_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(e, dict) and "epoch" in e for e in value)
    )


def _epoch_point(e: dict) -> dict:
    metrics = e.get("metrics") if isinstance(e.get("metrics"), dict) else e
    acc = metrics.get("val_accuracy", metrics.get("accuracy"))
    energy = e.get("energy_j")
    return {
        "epoch": int(e["epoch"]),
        "energy_j": None if energy is None else float(energy),
        "accuracy": None if acc is None else float(acc),
    }


def plot_run(report: Any, path: str | os.PathLike) -> Path:
    """Draws one run's stages into a PNG: energy and accuracy per stage, and per-layer results.

    Panels: energy per stage (J, bars, labelled with the energy method); accuracy per stage
    (the stages that measured it, with the baseline and the band `max_accuracy_drop` allows);
    energy and validation accuracy per epoch (`epoch_series`: a progressive fine-tune beside
    its dense reference); then per-layer sparsity for each pruning method and/or each layer's
    width before and after structured pruning, where the report has them.

    Args:
        report: a `RunReport` (`keras_lean.pipeline.report(RUN)`).
        path: the PNG file (written atomically).

    Returns:
        The path.

    Raises:
        ValueError: the report has no stages.
        ImportError: matplotlib is not installed (`pip install "keras_lean[plot]"`).
    """
    stages = _stage_dicts(report)
    if not stages:
        raise ValueError(f"report of run {report.run!r} has no stages to plot")
    sparsity = layer_sparsity(report)
    widths = layer_widths(report)
    epochs = epoch_series(report)
    panels = 2 + bool(epochs) + bool(sparsity) + bool(widths)
    fig = new_figure((9, 3.1 * panels + 0.6))
    axes = fig.subplots(panels, 1)
    _energy_panel(axes[0], stages)
    _accuracy_panel(axes[1], stages)
    k = 2
    if epochs:
        _epoch_panel(axes[k], epochs)
        k += 1
    if sparsity:
        _sparsity_panel(axes[k], sparsity)
        k += 1
    if widths:
        _width_panel(axes[k], widths)
    total_j = sum(s.get("energy_j") or 0 for s in stages)
    total_s = sum(s.get("duration_s") or 0 for s in stages)
    fig.suptitle(
        f"keras_lean run {report.run!r}: {len(stages)} stages, {total_s:.1f} s, {total_j:.1f} J",
        fontsize=11,
    )
    return save_png(fig, path)


def _bar_labels(ax, bars, labels: Sequence[str]) -> None:
    for bar, label in zip(bars, labels, strict=True):
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
        )


def _energy_panel(ax, stages: list[dict]) -> None:
    names = [s["stage"] for s in stages]
    joules = [s.get("energy_j") or 0.0 for s in stages]
    bars = ax.bar(names, joules, color="C0")
    _bar_labels(
        ax,
        bars,
        [
            f"{j:.1f} J\n{s.get('duration_s') or 0:.1f} s"
            for j, s in zip(joules, stages, strict=True)
        ],
    )
    methods = sorted({str(s.get("energy_method")) for s in stages if s.get("energy_method")})
    ax.set_ylabel("energy (J)")
    ax.set_ylim(0, max(joules + [1e-9]) * 1.3)
    ax.set_title(
        f"energy per stage ({', '.join(methods) or 'unknown method'})", fontsize=9, loc="left"
    )
    ax.grid(True, axis="y", alpha=0.3)


def _accuracy_panel(ax, stages: list[dict]) -> None:
    measured = [s for s in stages if s.get("accuracy") is not None]
    validation = next((s.get("details") or {} for s in stages if s["stage"] == "validate"), {})
    if not measured:
        ax.text(0.5, 0.5, "no stage measured accuracy yet", ha="center", va="center")
        ax.set_axis_off()
        return
    names = [s["stage"] for s in measured]
    acc = [100 * s["accuracy"] for s in measured]
    bars = ax.bar(names, acc, color="C2")
    _bar_labels(ax, bars, [f"{a:.2f} %" for a in acc])
    base = validation.get("baseline_accuracy")
    drop = validation.get("max_accuracy_drop")
    if base is None:
        base = next((s["accuracy"] for s in measured if s["stage"] == "baseline"), None)
    if base is not None:
        ax.axhline(100 * base, color="0.3", linestyle="--", linewidth=1, label="baseline")
        if drop is not None:
            ax.axhspan(
                100 * (base - drop),
                100 * base,
                color="tab:green",
                alpha=0.15,
                label=f"max drop {drop:g}",
            )
        ax.legend(fontsize=8, loc="lower right")
    lo = min(acc + ([100 * (base - (drop or 0))] if base is not None else []))
    bottom = max(0.0, math.floor(lo - 3))
    ax.set_ylim(bottom, max(acc) + 0.1 * (max(acc) - bottom) + 1)  # room for the labels
    ax.set_ylabel("accuracy (%)")
    verdict = validation.get("passed")
    gate = "" if verdict is None else f": validation {'PASS' if verdict else 'FAIL'}"
    ax.set_title(f"validation accuracy per stage{gate}", fontsize=9, loc="left")
    ax.grid(True, axis="y", alpha=0.3)


def _epoch_panel(ax, series: dict[str, list[dict]]) -> None:
    """J per epoch (solid, left axis) and validation accuracy (dashed, right axis)."""
    acc_ax = ax.twinx()
    joules = [p["energy_j"] for points in series.values() for p in points if p["energy_j"]]
    for k, (label, points) in enumerate(series.items()):
        xs = [p["epoch"] for p in points]
        ax.plot(xs, [nan_if_none(p["energy_j"]) for p in points], "o-", color=f"C{k}", label=label)
        acc = [100 * nan_if_none(p["accuracy"]) for p in points]
        acc_ax.plot(xs, acc, "s--", color=f"C{k}", alpha=0.7, label=f"{label} accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("energy per epoch (J)")
    ax.set_ylim(0, 1.15 * max(joules + [1e-9]))  # room above the highest point
    acc_ax.set_ylabel("validation accuracy (%)")
    epochs = sorted({p["epoch"] for points in series.values() for p in points})
    ax.set_xticks(epochs)
    ax.set_title(
        "energy (solid) and validation accuracy (dashed) per epoch", fontsize=9, loc="left"
    )
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = acc_ax.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="lower left")
    ax.grid(True, alpha=0.3)


def _sparsity_panel(ax, sparsity: dict[str, dict[str, float]]) -> None:
    layers = list(dict.fromkeys(name for per in sparsity.values() for name in per))
    n = len(sparsity)
    width = 0.8 / n
    for k, (method, per) in enumerate(sparsity.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(layers))]
        ys = [100 * per.get(layer, float("nan")) for layer in layers]
        bars = ax.bar(xs, ys, width=width, color=f"C{k + 3}", label=method)
        _bar_labels(ax, bars, [f"{y:.1f}" for y in ys])
    ax.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 6 else 0, fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("sparsity (%)")
    ax.set_title("per-layer sparsity of the pruned weights", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="y", alpha=0.3)


def _width_panel(ax, widths: dict[str, tuple[int, int]]) -> None:
    layers = list(widths)
    before = [widths[n][0] for n in layers]
    after = [widths[n][1] for n in layers]
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, color="0.7", label="before")
    bars = ax.bar([x + 0.2 for x in xs], after, width=0.4, color="C1", label="after")
    _bar_labels(ax, bars, [f"{a}/{b}" for a, b in zip(after, before, strict=True)])
    ax.set_xticks(list(xs), layers, rotation=30 if len(layers) > 6 else 0, fontsize=8)
    ax.set_ylim(0, max(before) * 1.2)
    ax.set_ylabel("width (channels / units)")
    ax.set_title("structured pruning: width per layer before and after", fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)


__all__ = [
    "PLOT_INSTALL_HINT",
    "epoch_series",
    "fmt",
    "layer_sparsity",
    "layer_widths",
    "nan_if_none",
    "new_figure",
    "plot_run",
    "plot_sweep",
    "save_png",
]
