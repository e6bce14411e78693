"""The report's figures: accuracy by method (with 95% intervals) and training curves per study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from otr_cli.study.analysis import ROW_ORDER, accuracy_rows, benchmarks, label, main_runs
from otr_cli.study.methods import METHODS

CURVE_PANELS = (("loss", "objective loss"), ("ce", "cross-entropy of targets (nats)"),
                ("match_rate", "OTR match rate"), ("unreachable_frac", "OTR: targets with q(y) < 0.001"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(plt) -> dict[str, Any]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {method: cycle[i % len(cycle)] for i, method in enumerate(ROW_ORDER)}


def plot_accuracy(results: list[dict], study: str, path: Path, title: str) -> Path:
    """Grouped bars: one group per benchmark, one bar per method; error bars are the 95% interval
    across seeds (Wilson of the pooled runs with one seed); dots are the individual runs."""
    plt = _pyplot()
    colours = _colours(plt)
    names = benchmarks(results, study)
    rows = {name: {row["method"]: row for row in accuracy_rows(results, study, name)} for name in names}
    methods = [m for m in ROW_ORDER if any(m in rows[name] for name in names)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) * len(methods) * 0.6 + 2), 3.8))
    for k, method in enumerate(methods):
        for j, name in enumerate(names):
            row = rows[name].get(method)
            if row is None:
                continue
            x = j + (k - (len(methods) - 1) / 2) * width
            low, high = row["ci95"] or row["pooled_wilson"]
            centre = row["mean"] if row["ci95"] else row["pooled"]
            ax.bar(x, 100 * centre, width, color=colours[method], label=label(method) if j == 0 else None,
                   yerr=[[100 * (centre - low)], [100 * (high - centre)]], capsize=3)
            if len(row["runs"]) > 1:
                ax.plot([x] * len(row["runs"]), [100 * r["accuracy"] for r in row["runs"]], "k.", ms=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(results: list[dict], study: str, path: Path, title: str) -> Path:
    """Loss, CE, OTR match rate and unreachable targets against step: each method's mean over seeds (thin: each
    seed)."""
    plt = _pyplot()
    colours = _colours(plt)
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.3 * len(CURVE_PANELS), 3.3), squeeze=False)
    for axis, (key, panel_title) in zip(axes.flat, CURVE_PANELS):
        for method in METHODS:
            runs = [r for r in main_runs(results, study, method) if r["train"]]
            series = [{c["step"]: c[key] for c in r["train"]["curves"] if key in c} for r in runs]
            series = [s for s in series if s]
            if not series:
                continue
            for points in series if len(series) > 1 else []:
                axis.plot(list(points), list(points.values()), color=colours[method], lw=0.5, alpha=0.35)
            steps = sorted(set.intersection(*(set(s) for s in series)))
            mean = [sum(s[step] for s in series) / len(series) for step in steps]
            axis.plot(steps, mean, color=colours[method], lw=1.5, label=label(method),
                      marker="o" if len(steps) < 12 else None, ms=3)  # short series stay visible
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("optimizer step", fontsize=8)
        axis.grid(alpha=0.3)
        if key == "loss":  # OTR's surrogate goes to ~0 and below while CE-like losses stay near 1
            axis.set_yscale("symlog", linthresh=1e-2)
    axes.flat[0].legend(fontsize="x-small")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
