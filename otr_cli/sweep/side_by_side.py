"""Side-by-side results of the runs of one multirun (the `smollm2_compare` recipe).

A Hydra callback: when every job of `otr train -m ...` has finished, it reads each run's
summary.json, prints one table with the runs as columns and every evaluation point (before
training, after the warm-up, final) as rows, then the paired test of each run's final model
against the first run's (McNemar on the same problems). Writes side_by_side.json and
side_by_side.png in the sweep directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from otr_cli.atomic import write_json_atomic
from otr_cli.eval.compare import compare_runs, load_run, plot_comparison
from otr_cli.sweep.summary import format_value, load_point, point_order, swept_keys

log = logging.getLogger("otr.train")


def finished_runs(sweep_dir: Path) -> list[Path]:
    """Run directories (sorted by Hydra job number when the names are numbers) holding summary.json."""

    return sorted((path.parent for path in sweep_dir.glob("*/summary.json")), key=point_order)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """What distinguishes each run: the config keys whose values differ between the runs (the
    objective first, since that is what a comparison is usually about)."""

    points = [load_point(d) for d in run_dirs]
    keys = sorted(swept_keys(points, run_dirs[0].parent), key=lambda k: not k.endswith(".objective"))
    keys = [k for k in keys if k != "run.name"]
    return [" ".join(f"{k}={format_value(p.config.get(k))}" for k in keys) or p.name for p in points]


def side_by_side(run_dirs: list[Path]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({"runs": [label...], "rows": [{"point", "benchmark", "cells": [accuracy or None per run]}],
    "paired": [rows of otr_cli.eval.compare.compare_runs for the final models]}, the final models'
    evaluations as otr_cli.eval.compare.load_run reads them, labelled)."""

    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    labels = run_labels(run_dirs)
    points = list(dict.fromkeys(point for s in summaries for point in s.get("eval", {})))
    rows = []
    for point in points:
        benchmarks = list(dict.fromkeys(b for s in summaries for b in s.get("eval", {}).get(point, {})))
        for benchmark in benchmarks:
            cells = []
            for s in summaries:
                result = s.get("eval", {}).get(point, {}).get(benchmark)
                cells.append(None if result is None else
                             {"accuracy": result["accuracy"], "correct": result["correct"], "n": result["n"]})
            rows.append({"point": point, "benchmark": benchmark, "cells": cells})
    paired: list[dict[str, Any]] = []
    finals = [d for d in run_dirs if (d / "eval" / "final" / "results.json").is_file()]
    final_runs = [load_run(d / "eval" / "final") | {"label": labels[run_dirs.index(d)]} for d in finals]
    if len(final_runs) >= 2:
        paired = compare_runs(final_runs)
    return {"runs": labels, "dirs": [str(d) for d in run_dirs], "rows": rows, "paired": paired}, final_runs


def print_side_by_side(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="accuracy, side by side (greedy, held-out problems)")
    table.add_column("evaluated")
    table.add_column("benchmark")
    for label in result["runs"]:
        table.add_column(label, justify="right", overflow="fold")
    for row in result["rows"]:
        cells = ["-" if c is None else f"{c['accuracy']:.1%} ({c['correct']}/{c['n']})" for c in row["cells"]]
        table.add_row(row["point"], row["benchmark"], *cells)
    console.print(table)
    if result["paired"]:
        paired = Table(title=f"final models against {result['runs'][0]} (paired by problem)")
        for column in ("benchmark", "run", "n", "delta", "delta 95% CI", "McNemar p"):
            paired.add_column(column, justify="left" if column in ("benchmark", "run") else "right", overflow="fold")
        for r in result["paired"]:
            low, high = r["delta_ci95"]
            paired.add_row(r["benchmark"], r["run"], str(r["n"]), f"{r['delta']:+.1%}", f"{low:+.1%} .. {high:+.1%}",
                           f"{r['mcnemar_p']:.3f}")
        console.print(paired)


class PrintSideBySide(Callback):
    """Hydra callback (hydra.callbacks) that prints and saves the side-by-side table of a multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        run_dirs = finished_runs(sweep_dir)
        if len(run_dirs) < 2:
            log.warning("side by side: fewer than two finished runs under %s; nothing to compare", sweep_dir)
            return
        result, final_runs = side_by_side(run_dirs)
        print_side_by_side(result)

        write_json_atomic(sweep_dir / "side_by_side.json", result)
        if result["paired"]:

            plot_comparison(final_runs, result["paired"], sweep_dir / "side_by_side.png")
        print(f"side by side: {sweep_dir / 'side_by_side.json'}")
