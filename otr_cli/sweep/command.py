"""`otr sweep summary SWEEP_DIR`: the table on the terminal, plus sweep_summary.csv and .png."""

from __future__ import annotations

import math
from pathlib import Path

from otr_cli.command_line import CommandParser
from otr_cli.errors import UserError, fail
from otr_cli.sweep.summary import SweepSummary, best_setting, format_value, summarize, write_csv

USAGE = "otr sweep summary SWEEP_DIR [--metric NAME] [--mode max|min] [--out DIR]"

STATUS_STYLE = {"finished": "green", "running": "yellow", "preempted": "yellow", "failed": "red"}


def _parser() -> CommandParser:
    parser = CommandParser(prog="otr sweep summary", usage=USAGE,
                                     description="One row per sweep point: swept values, status, final loss and "
                                                 "metrics; the best point is marked.")
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR",
                        help="the directory `otr train -m` wrote (one subdirectory per point)")
    parser.add_argument("--metric", metavar="NAME", help="metric that picks the best point (default: the first benchmark of the "
                                         "final evaluation, else val_ce, else ce)")
    parser.add_argument("--mode", choices=("max", "min"), help="max or min is best (default: min for loss, ce and "
                                                               "val_ce, max for benchmark scores)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where sweep_summary.csv and .png go (default: SWEEP_DIR)")
    return parser


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.5g}"
    return str(value)


def print_table(summary: SweepSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = summary.metric_names
    table = Table(title=f"sweep {summary.sweep_dir}", title_justify="left")
    table.add_column("point", justify="right")
    for key in summary.swept_keys:
        table.add_column(key)
    table.add_column("status")
    table.add_column("step", justify="right")
    for name in metrics:
        table.add_column(f"{name} *" if name == summary.metric else name, justify="right")
    table.add_column("best")
    for i, point in enumerate(summary.points):
        style = STATUS_STYLE.get(point.status, "dim")
        status = f"[{style}]{point.status}[/{style}]"
        step = f"{_cell(point.step)}/{_cell(point.total_steps)}" if point.total_steps else _cell(point.step)
        table.add_row(point.name, *[format_value(point.config.get(k)) for k in summary.swept_keys], status, step,
                      *[_cell(point.metrics.get(m)) for m in metrics], "[bold]<- best[/bold]" if i == summary.best
                      else "", style="bold" if i == summary.best else None)
    console = Console()
    if not console.is_terminal:
        # Piped or redirected: never truncate cells to an assumed 80 columns.
        console = Console(width=max(80, Console(width=10_000).measure(table).maximum))
    console.print(table)
    for point in summary.points:
        if point.error:
            console.print(f"point {point.name} failed: {point.error}", highlight=False, markup=False)
    if summary.metric is None:
        console.print("no point has a metric yet: no best point.", highlight=False)
    elif summary.best is None:
        console.print(f"no finished point has {summary.metric}: no best point yet.", highlight=False)
    else:
        best = summary.points[summary.best]
        direction = "max" if summary.higher_is_better else "min"
        console.print(f"best ({direction} {summary.metric}): point {best.name}  {summary.overrides(best)}  "
                      f"{summary.metric}={_cell(best.metrics[summary.metric])}  ({best.path})", highlight=False,
                      markup=False)
        setting = best_setting(summary)
        if setting is not None:
            label, value, seeds = setting
            console.print(f"best setting, mean over seeds ({direction} {summary.metric}): {label}  "
                          f"{summary.metric}={_cell(value)}  ({seeds} seeds)", highlight=False, markup=False)


def summary_command(args: list[str]) -> int:
    options = _parser().parse_args(args)
    summary = summarize(options.sweep_dir, metric=options.metric, mode=options.mode)
    out_dir = options.out or options.sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    print_table(summary)
    csv_path = out_dir / "sweep_summary.csv"
    write_csv(summary, csv_path)
    from otr_cli.sweep.plot import plot_sweep

    png = plot_sweep(summary, out_dir / "sweep_summary.png")
    print(f"wrote {csv_path}" + (f" and {png}" if png else " (no plot: no swept key or no metric yet)"))
    return 0


def sweep_entry(args: list[str]) -> int:
    """`otr sweep SUBCOMMAND ...` (wired in otr_cli/cli.py); user errors exit 2 with one message."""

    if not args or args[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n`otr sweep summary --help` describes the options.")
        return 0
    if args[0] != "summary":
        fail(f"unknown sweep command {args[0]!r}; usage: {USAGE}")
    try:
        return summary_command(args[1:])
    except UserError as err:
        fail(str(err))
