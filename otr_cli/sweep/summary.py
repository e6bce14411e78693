"""What a sweep produced: one row per point, the swept values, its status and metrics, the best.

A sweep directory (``otr train -m ...``, local or SLURM) holds one run directory per point,
named by the point's number (hydra.sweep.subdir). Each run directory has the files of
``otr train``: config.yaml, run_state.json, metrics.jsonl and, once finished, summary.json.
The swept keys are found by comparing the points' configs (so group choices such as
``loss=sft,otr`` show as the keys they change), in the order of the sweep's command line
when Hydra's multirun.yaml is there.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from otr_cli.errors import UserError

# Keys that differ between points by construction, not because they were swept.
IGNORED_KEYS = ("run.output_dir",)
# Metrics where lower is better; every other metric (benchmark scores) is better higher.
LOWER_IS_BETTER = ("loss", "ce", "val_ce")
# The metric that picks the best point when none is named: a benchmark score if there is one,
# else held-out cross-entropy, else training CE (the objective's own loss is not comparable
# across beta or objectives; CE is).
DEFAULT_METRICS = ("val_ce", "ce")


class SweepError(UserError, ValueError):
    """The directory is not a sweep otr can summarise; the message says what was expected."""


@dataclass
class Point:
    name: str
    path: Path
    status: str
    config: dict[str, Any]
    step: Optional[int] = None
    total_steps: Optional[int] = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None


@dataclass
class SweepSummary:
    sweep_dir: Path
    points: list[Point]
    swept_keys: list[str]
    metric: Optional[str]
    higher_is_better: bool
    best: Optional[int]  # index into points

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for point in self.points:
            names += [name for name in point.metrics if name not in names]
        return names

    def overrides(self, point: Point) -> str:
        return " ".join(f"{key}={format_value(point.config.get(key))}" for key in self.swept_keys)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def format_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written while we read
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "run_state.json").is_file()


def point_order(run_dir: Path) -> tuple[bool, int, str]:
    """Sort key of a sweep's run directories: Hydra job numbers numerically (0, 1, ..., 10), then names."""
    return (not run_dir.name.isdigit(), int(run_dir.name) if run_dir.name.isdigit() else 0, run_dir.name)


def find_point_dirs(sweep_dir: Path) -> list[Path]:
    """Run directories directly under the sweep dir, in point order (0, 1, 2, ..., then by name)."""
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir}: no such directory. Pass the sweep directory that `otr train -m` printed "
                         f"(by default multirun/<run.name>/<date>_<time>).")
    if is_run_dir(sweep_dir):
        raise SweepError(f"{sweep_dir} is a single run, not a sweep: pass the directory that holds the runs "
                         f"({sweep_dir.parent}?)")
    children = [c for c in sweep_dir.iterdir() if c.is_dir() and not c.name.startswith(".") and is_run_dir(c)]
    if not children:
        raise SweepError(f"{sweep_dir} holds no runs: expected one subdirectory per sweep point with a config.yaml, "
                         f"as `otr train -m ...` writes them. Have the jobs started yet?")
    return sorted(children, key=point_order)


def load_point(path: Path) -> Point:
    config_file = path / "config.yaml"
    config = _flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    state = _read_json(path / "run_state.json")
    status = state.get("status", "not started")
    records = _read_jsonl(path / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    point = Point(name=path.name, path=path, status=status, config=config, total_steps=state.get("total_steps"),
                  error=state.get("error"))
    if status == "failed" and state.get("rank") is not None:
        point.error = f"rank {state['rank']}: {state.get('error')}"
    if steps:
        point.step = steps[-1]["step"]
        point.metrics["loss"] = steps[-1]["loss"]
        if steps[-1].get("ce") is not None:
            point.metrics["ce"] = steps[-1]["ce"]
    validations = [r for r in records if r.get("val_ce") is not None]
    if validations:
        point.metrics["val_ce"] = validations[-1]["val_ce"]
    if status == "finished":
        point.step = state.get("step", point.step)
        point.metrics.update(_final_eval_scores(_read_json(path / "summary.json")))
    return point


def _final_eval_scores(summary: dict[str, Any]) -> dict[str, float]:
    """Benchmark scores of the final model (summary.json's "final (step N)" entry)."""
    finals = [scores for name, scores in (summary.get("eval") or {}).items() if name.startswith("final")]
    if not finals or not isinstance(finals[-1], dict):
        return {}
    return {bench: float(result["value"]) for bench, result in finals[-1].items()
            if isinstance(result, dict) and isinstance(result.get("value"), (int, float))}


def _sweep_order(sweep_dir: Path) -> list[str]:
    """Keys in the order the sweep's command line gave them (Hydra's multirun.yaml), if known."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return []
    try:
        task = (yaml.safe_load(multirun.read_text()) or {}).get("hydra", {}).get("overrides", {}).get("task", [])
    except yaml.YAMLError:
        return []
    return [entry.split("=", 1)[0].lstrip("+~") for entry in task if isinstance(entry, str) and "=" in entry]


def swept_keys(points: list[Point], sweep_dir: Path) -> list[str]:
    keys: list[str] = []
    for point in points:
        keys += [k for k in point.config if k not in keys]
    varying = [k for k in keys if k not in IGNORED_KEYS
               and len({json.dumps(p.config.get(k), sort_keys=True, default=str) for p in points if p.config}) > 1]
    order = _sweep_order(sweep_dir)
    return sorted(varying, key=lambda k: (order.index(k) if k in order else len(order), keys.index(k)))


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def pick_metric(points: list[Point], requested: Optional[str]) -> Optional[str]:
    available: list[str] = []
    for point in points:
        available += [name for name in point.metrics if name not in available]
    if requested is not None:
        if requested not in available:
            raise SweepError(f"--metric {requested!r}: no point has it; available: {', '.join(available) or 'none'}")
        return requested
    benchmarks = [name for name in available if name not in LOWER_IS_BETTER]
    if benchmarks:
        return benchmarks[0]
    return next((name for name in DEFAULT_METRICS if name in available), None)


def best_point(points: list[Point], metric: Optional[str], higher: bool) -> Optional[int]:
    """Index of the best finished point on `metric` (unfinished points are not candidates)."""
    if metric is None:
        return None
    candidates = [(p.metrics[metric], i) for i, p in enumerate(points)
                  if p.status == "finished" and metric in p.metrics and not math.isnan(p.metrics[metric])]
    if not candidates:
        return None
    return (max if higher else min)(candidates, key=lambda c: c[0])[1]


def best_setting(summary: "SweepSummary") -> Optional[tuple[str, float, int]]:
    """With seeds swept: (the other keys' values, mean metric over seeds, seeds) of the best setting.

    One lucky seed should not pick the hyperparameters; the mean over the finished seeds does.
    """
    if "seed" not in summary.swept_keys or summary.metric is None:
        return None
    others = [k for k in summary.swept_keys if k != "seed"]
    groups: dict[str, list[float]] = {}
    for point in summary.points:
        value = point.metrics.get(summary.metric)
        if point.status == "finished" and value is not None and not math.isnan(value):
            label = " ".join(f"{k}={format_value(point.config.get(k))}" for k in others)
            groups.setdefault(label, []).append(value)
    if not others or not groups:
        return None
    means = {label: sum(values) / len(values) for label, values in groups.items()}
    label = (max if summary.higher_is_better else min)(means, key=means.get)
    return label, means[label], len(groups[label])


def summarize(sweep_dir: Path, metric: Optional[str] = None, mode: Optional[str] = None) -> SweepSummary:
    sweep_dir = Path(sweep_dir)
    points = [load_point(path) for path in find_point_dirs(sweep_dir)]
    chosen = pick_metric(points, metric)
    higher = higher_is_better(chosen or "") if mode is None else mode == "max"
    return SweepSummary(sweep_dir, points, swept_keys(points, sweep_dir), chosen, higher,
                        best_point(points, chosen, higher))


def write_csv(summary: SweepSummary, path: Path) -> None:
    metrics = summary.metric_names
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["point", *summary.swept_keys, "status", "step", "total_steps", *metrics, "best", "error",
                         "run_dir"])
        for i, point in enumerate(summary.points):
            writer.writerow([point.name, *[format_value(point.config.get(k)) for k in summary.swept_keys],
                             point.status, point.step, point.total_steps,
                             *[point.metrics.get(m, "") for m in metrics], "yes" if i == summary.best else "",
                             point.error or "", str(point.path)])
