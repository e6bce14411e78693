"""What the user watches: a rich progress bar during training and a summary table at the end."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


def format_record(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}", f"ce {record.get('ce', float('nan')):.4f}"]
    if "match_rate" in record:
        parts.append(f"match {record['match_rate']:.3f}")
    if "unreachable_frac" in record:
        parts.append(f"unreachable {100 * record['unreachable_frac']:.1f}%")
    if "val_ce" in record:
        parts.append(f"val_ce {record['val_ce']:.4f}")
    parts.append(f"{record.get('tokens_per_s', 0):.0f} tok/s")
    return " | ".join(parts)


class TrainProgress:
    """A live bar on a terminal; one plain line per step otherwise (logs, CI, SLURM)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.live = enabled and sys.stderr.isatty()
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")

    def __enter__(self):
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], status=format_record(record))
        else:
            console.print(f"step {record['step']}/{self.total_steps} [{record.get('objective', '')}] "
                          f"{format_record(record)}", highlight=False)


    def note(self, message: str) -> None:
        """A line above the live bar (or in the log stream), e.g. an evaluation during training."""
        if self.enabled:
            console.print(message, highlight=False)


def print_summary(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    steps = [r for r in records if "loss" in r]
    table = Table(title="otr train: summary", show_header=True)
    table.add_column("metric")
    table.add_column("first step", justify="right")
    table.add_column("last step", justify="right")
    for key in ("loss", "ce", "p_target", "entropy", "match_rate", "no_match_frac", "unreachable_frac", "reward_mean",
                "tokens_per_s", "padding_frac"):
        values = [r[key] for r in steps if key in r and r[key] is not None]
        if values:
            table.add_row(key, f"{values[0]:.4g}", f"{values[-1]:.4g}")
    val = [r["val_ce"] for r in records if "val_ce" in r]
    if val:
        # Validated only at the end: there is no first-step value to show.
        table.add_row("val_ce", f"{val[0]:.4g}" if len(val) > 1 else "-", f"{val[-1]:.4g}")
    console.print(table)
    for warning in summary.get("warnings", []):
        # Repeated here: the run may have logged it hundreds of lines ago.
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if summary.get("eval"):
        console.print(eval_table(summary["eval"]))
        for line in describe_evals(summary["eval"]):
            console.print(line, highlight=False)
    console.print(f"final model: [bold]{summary['final_model']}[/bold]  "
                  f"({summary['total_steps']} steps in {summary['train_seconds']:.0f} s)")


def eval_table(evals: dict[str, dict[str, Any]]) -> Table:
    """Accuracy per benchmark (rows) at each evaluated point of the run (columns)."""
    table = Table(title="accuracy (greedy, measured now on held-out problems)")
    table.add_column("benchmark")
    for phase in evals:
        table.add_column(phase, justify="right")
    benchmarks = list(dict.fromkeys(name for results in evals.values() for name in results))
    for name in benchmarks:
        cells = []
        for results in evals.values():
            result = results.get(name)
            cells.append(f"{100 * result['accuracy']:.1f}% ({result['correct']}/{result['n']})" if result else "-")
        table.add_row(name, *cells)
    return table


def describe_evals(evals: dict[str, dict[str, Any]]) -> list[str]:
    """One plain sentence per benchmark: its accuracy at each evaluated point and the changes.

    Changes are in percentage points, next to what one problem is worth, so a difference of one
    or two problems reads as what it is (`otr eval compare` gives the paired test).
    """
    lines = []
    benchmarks = list(dict.fromkeys(name for results in evals.values() for name in results))
    for name in benchmarks:
        present = [(point.split(" (")[0], results[name]) for point, results in evals.items() if name in results]
        if len(present) < 2:
            continue
        path = ", ".join(f"{100 * r['accuracy']:.1f}% {point}" for point, r in present)
        changes = "; ".join(f"{100 * (b['accuracy'] - a['accuracy']):+.1f} points from {point_a} to {point_b}"
                            for (point_a, a), (point_b, b) in zip(present, present[1:]))
        n = present[-1][1]["n"]
        lines.append(f"{name}: {path}; {changes} ({n} problems, one problem = {100 / max(n, 1):.1f} points).")
    return lines
