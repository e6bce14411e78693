"""The sweep plot: the chosen metric against each swept key, one line per setting of the others.

Seeds are repetitions, not a setting: when `seed` is swept next to other keys it gets no panel
of its own; every seed's point is drawn and the line goes through the mean over seeds.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any, Optional

from otr_cli.sweep.summary import SweepSummary, format_value

SEED_KEY = "seed"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_sweep(summary: SweepSummary, out_png: Path) -> Optional[Path]:
    """One panel per swept key; None when there is nothing to draw (no metric, no swept key)."""
    metric = summary.metric
    scored = [p for p in summary.points if metric is not None and metric in p.metrics]
    keys = [k for k in summary.swept_keys if k != SEED_KEY] or summary.swept_keys
    if not scored or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    best = summary.points[summary.best] if summary.best is not None else None
    for axis, key in zip(axes.flat, keys):
        others = [k for k in keys if k != key]
        values = [p.config.get(key) for p in scored]
        numeric = all(_is_number(v) for v in values)
        categories = sorted(dict.fromkeys(format_value(v) for v in values))

        def x_of(point):
            value = point.config.get(key)
            return value if numeric else categories.index(format_value(value))

        groups: dict[str, list] = {}
        for point in scored:
            label = " ".join(f"{k}={format_value(point.config.get(k))}" for k in others)
            groups.setdefault(label, []).append(point)
        for label, members in groups.items():
            by_x: dict[Any, list[float]] = {}
            for point in members:
                by_x.setdefault(x_of(point), []).append(point.metrics[metric])
            xs = sorted(by_x)
            line = axis.plot(xs, [mean(by_x[x]) for x in xs], "-", label=label or None)[0]
            repeated = [(x, v) for x in xs for v in by_x[x]]
            axis.plot([x for x, _ in repeated], [v for _, v in repeated], "o", ms=4, color=line.get_color())
        if best is not None and metric in best.metrics:
            axis.plot([x_of(best)], [best.metrics[metric]], "*", ms=16, color="gold", markeredgecolor="black",
                      label=f"best (point {best.name})", zorder=5)
        if not numeric:
            axis.set_xticks(range(len(categories)), categories, rotation=20, fontsize=8)
        axis.ticklabel_format(axis="y", useOffset=False)  # small differences matter: show plain values
        axis.set_xlabel(key)
        axis.set_ylabel(metric + (" (mean over seeds)" if SEED_KEY in summary.swept_keys and key != SEED_KEY else ""))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    direction = "higher" if summary.higher_is_better else "lower"
    fig.suptitle(f"{summary.sweep_dir.name}: {metric} ({direction} is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
