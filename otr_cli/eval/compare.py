"""`otr eval compare DIR_A DIR_B ...`: per-benchmark table with deltas, paired significance and a bar chart.

Each DIR is an eval directory holding results.json and <benchmark>.jsonl (what `otr eval` writes
under <output_dir>/eval), or a directory above one (<output_dir>, or a training run whose final
evaluation is in eval/final). Problems are paired by id; the first DIR is the baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from otr_cli.atomic import write_json_atomic
from otr_cli.errors import UserError
from otr_cli.eval.stats import paired_comparison, shared_outcomes

# The old `output=FILE` spelling, still taken for one release (command_line.py).
DEPRECATED_COMPARE_KEYS = {"output": "--output"}


class CompareError(UserError, ValueError):
    """Directories that cannot be compared; the message names the directory or file."""


def find_eval_dir(directory: Path) -> Path:
    """The directory holding results.json: DIR, DIR/eval or DIR/eval/final."""
    for candidate in (directory, directory / "eval", directory / "eval" / "final"):
        if (candidate / "results.json").is_file():
            return candidate
    raise CompareError(f"{directory}: no results.json in it, in eval/ or in eval/final/ (run `otr eval` first)")


def load_run(directory: Path) -> dict[str, Any]:
    """{"label", "dir", "model", "benchmarks": {name: scores}, "outcomes": {name: {id: correct}}}."""
    eval_dir = find_eval_dir(directory)
    try:
        results = json.loads((eval_dir / "results.json").read_text())
    except json.JSONDecodeError as exc:
        raise CompareError(f"{eval_dir / 'results.json'}: malformed JSON ({exc})") from exc
    outcomes: dict[str, dict[str, bool]] = {}
    for name in results.get("benchmarks", {}):
        path = eval_dir / f"{name}.jsonl"
        if not path.is_file():
            raise CompareError(f"{path} is missing: the per-problem results are needed for a paired test")
        outcomes[name] = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    outcomes[name][str(row["id"])] = bool(row["correct"])
                except (json.JSONDecodeError, KeyError) as exc:
                    raise CompareError(f"{path}:{number}: not a predictions line with id and correct ({exc})") from exc
    return {"label": str(directory), "dir": str(eval_dir), "model": results.get("model"),
            "benchmarks": results.get("benchmarks", {}), "outcomes": outcomes}


def compare_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, run after the first): accuracies on the shared problems, delta, p-value, CI."""
    rows = []
    base = runs[0]
    for name in base["outcomes"]:
        for other in runs[1:]:
            if name not in other["outcomes"]:
                continue
            test = paired_comparison(*shared_outcomes(base["outcomes"][name], other["outcomes"][name]))
            rows.append({"benchmark": name, "baseline": base["label"], "run": other["label"], "n": test["n"],
                         "baseline_value": test["reference_accuracy"], "value": test["accuracy"],
                         "delta": test["delta"], "baseline_ci95": test["reference_ci95"], "ci95": test["ci95"],
                         "delta_ci95": test["delta_ci95"], "mcnemar_p": test["mcnemar_p"],
                         "baseline_only": test["reference_only"], "run_only": test["other_only"]})
    if not rows:
        raise CompareError("the directories share no benchmark; nothing to compare")
    return rows


def plot_comparison(runs: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars (one group per benchmark, one bar per run) with 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["benchmark"] for r in rows))
    labels = [run["label"] for run in runs]
    values = {(r["benchmark"], r["baseline"]): (r["baseline_value"], r["baseline_ci95"]) for r in rows}
    values.update({(r["benchmark"], r["run"]): (r["value"], r["ci95"]) for r in rows})
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) * len(labels)), 3.6))
    for k, label in enumerate(labels):
        xs, ys, errors = [], [], [[], []]
        for j, name in enumerate(names):
            if (name, label) in values:
                value, (low, high) = values[(name, label)]
                xs.append(j + (k - (len(labels) - 1) / 2) * width)
                ys.append(100 * value)
                errors[0].append(100 * (value - low))
                errors[1].append(100 * (high - value))
        ax.bar(xs, ys, width, yerr=errors, capsize=3, label=Path(label).name or label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.set_title("accuracy with 95% intervals; paired by problem")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_parser():
    from otr_cli.command_line import CommandParser

    parser = CommandParser(
        prog="otr eval compare",
        description="Per-benchmark table of finished evaluations with deltas, paired 95% intervals and McNemar "
                    "p-values against the first directory; a bar chart and its numbers as JSON.",
        epilog="The old spelling `output=compare.png` still works in this release, with a deprecation note.")
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                        help="an eval directory (results.json and <benchmark>.jsonl), the output directory of "
                             "`otr eval` or a training run; the first is the baseline; two or more")
    parser.add_argument("--output", type=Path, default=Path("compare.png"), metavar="FILE.png",
                        help="the chart; the numbers go beside it as FILE.json (default compare.png)")
    return parser


def parse_compare_args(args: list[str]):
    """`otr eval compare`'s arguments (flags, or the deprecated output=FILE) as an argparse namespace."""
    from otr_cli.command_line import rewrite_deprecated_key_values

    return compare_parser().parse_args(rewrite_deprecated_key_values(args, DEPRECATED_COMPARE_KEYS,
                                                                     "otr eval compare"))


def compare_command(args: list[str]) -> int:
    """Body of `otr eval compare`: print the table, write compare.json and the PNG beside it."""
    from rich.console import Console
    from rich.table import Table

    options = parse_compare_args(args)
    output, dirs = options.output, options.dirs
    if len(dirs) < 2:
        raise CompareError("otr eval compare: need at least two directories (see `otr eval compare --help`)")
    for directory in dirs:
        if not directory.is_dir():
            raise CompareError(f"{directory} is not a directory")
    runs = [load_run(d) for d in dirs]
    rows = compare_runs(runs)
    table = Table(title=f"baseline: {runs[0]['label']}")
    for column in ("benchmark", "run", "n", "baseline", "run acc.", "delta", "delta 95% CI", "McNemar p"):
        table.add_column(column, justify="left" if column in ("benchmark", "run") else "right")
    for r in rows:
        table.add_row(r["benchmark"], r["run"], str(r["n"]), f"{r['baseline_value']:.1%}", f"{r['value']:.1%}",
                      f"{r['delta']:+.1%}", f"{r['delta_ci95'][0]:+.1%} .. {r['delta_ci95'][1]:+.1%}",
                      f"{r['mcnemar_p']:.3g}")
    console = Console()
    console.print(table)
    plot_comparison(runs, rows, output)
    write_json_atomic(output.with_suffix(".json"), {"runs": [{k: run[k] for k in ("label", "dir", "model")}
                                                             for run in runs], "comparisons": rows})
    console.print(f"chart: {output}; numbers: {output.with_suffix('.json')}", highlight=False)
    return 0
