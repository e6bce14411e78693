"""Numbers of the report, computed from result records (otr_cli/study/results.py).

- Accuracy per method: mean over seeds with a 95% Student-t interval across seeds (needs >= 2
  seeds), the pooled accuracy, and each run's own 95% Wilson interval.
- Paired difference of a method against SFT: the same seeds and problems, pooled over seeds;
  exact McNemar test and paired-bootstrap 95% interval (otr_cli/eval/stats.py). Pooling treats
  (seed, problem) pairs as independent although the seeds share problems, so with several seeds
  the p-value is somewhat optimistic; the across-seed intervals are the conservative view.
- Wall-clock cost per optimizer step (step_time_s of metrics.jsonl), first step of each run left
  out (it includes one-off allocation).
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from otr_cli.config import LossConfig
from otr_cli.eval.stats import paired_comparison, shared_outcomes, wilson_interval
from otr_cli.study.methods import ABLATION_GRID, METHODS, OTR_DEFAULTS
from otr_cli.train.signals import WeakSignalMonitor

# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1); 1.96 beyond 30.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
SIGNIFICANCE = 0.05
ROW_ORDER = ("base", *METHODS)


def label(method: str) -> str:
    return "base model" if method == "base" else METHODS[method].label


def mean_interval(values: list[float]) -> tuple[float, Optional[tuple[float, float]]]:
    """Mean and 95% t interval across seeds (None with fewer than two values), clipped to [0, 1]."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    df = len(values) - 1
    half = (T_975[df - 1] if df <= len(T_975) else 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return mean, (max(0.0, mean - half), min(1.0, mean + half))


def main_runs(results: list[dict], study: str, method: str) -> list[dict]:
    """The study's runs of `method` (not the ablations), by seed."""
    runs = [r for r in results if r["study"] == study and r["method"] == method and not r["ablation"]]
    return sorted(runs, key=lambda r: r["seed"] or 0)


def benchmarks(results: list[dict], study: str) -> list[str]:
    return list(dict.fromkeys(name for r in results if r["study"] == study for name in r["eval"]))


def accuracy_rows(results: list[dict], study: str, benchmark: str) -> list[dict[str, Any]]:
    """One row per method that has results: mean, across-seed interval, pooled, per-run Wilson."""
    rows = []
    for method in ROW_ORDER:
        runs = [r for r in main_runs(results, study, method) if benchmark in r["eval"]]
        if not runs:
            continue
        scores = [r["eval"][benchmark] for r in runs]
        mean, interval = mean_interval([s["accuracy"] for s in scores])
        correct, n = sum(s["correct"] for s in scores), sum(s["n"] for s in scores)
        rows.append({"method": method, "label": label(method), "seeds": [r["seed"] for r in runs], "mean": mean,
                     "ci95": interval, "pooled": correct / n if n else 0.0,
                     "pooled_wilson": wilson_interval(correct, n),
                     "runs": [{"seed": r["seed"], "accuracy": s["accuracy"], "correct": s["correct"], "n": s["n"],
                               "wilson": wilson_interval(s["correct"], s["n"])} for r, s in zip(runs, scores)]})
    return rows


def paired_outcomes(reference: list[dict], other: list[dict], benchmark: str
                    ) -> tuple[list[int], list[bool], list[bool]]:
    """Seeds both have, and their outcomes on the problems both solved or failed, pooled over seeds."""
    ref = {r["seed"]: r["eval"][benchmark]["outcomes"] for r in reference if benchmark in r["eval"]}
    oth = {r["seed"]: r["eval"][benchmark]["outcomes"] for r in other if benchmark in r["eval"]}
    seeds = sorted(set(ref) & set(oth), key=lambda s: s or 0)
    a, b = [], []
    for seed in seeds:
        seed_a, seed_b = shared_outcomes(ref[seed], oth[seed])
        a += seed_a
        b += seed_b
    return seeds, a, b


def paired_test(reference: list[dict], other: list[dict], benchmark: str) -> Optional[dict[str, Any]]:
    """accuracy(other) - accuracy(reference) on shared (seed, problem) pairs, with McNemar and bootstrap."""
    seeds, a, b = paired_outcomes(reference, other, benchmark)
    if not a:
        return None
    test = paired_comparison(a, b)
    return {"benchmark": benchmark, "seeds": seeds, "pairs": test["n"], "reference_accuracy": test["reference_accuracy"],
            "accuracy": test["accuracy"], "delta": test["delta"], "delta_ci95": tuple(test["delta_ci95"]),
            "mcnemar_p": test["mcnemar_p"], "reference_only": test["reference_only"], "method_only": test["other_only"]}


def differences_vs(results: list[dict], study: str, reference: str = "sft") -> list[dict[str, Any]]:
    """Every other method (base model included) against `reference`, per benchmark."""
    ref_runs = main_runs(results, study, reference)
    rows = []
    for benchmark in benchmarks(results, study):
        for method in ROW_ORDER:
            if method == reference:
                continue
            other = main_runs(results, study, method)
            if method == "base":  # one evaluation stands for every seed: greedy decoding of the same model
                other = [dict(run, seed=r["seed"]) for r in ref_runs for run in other[:1]]
            row = paired_test(ref_runs, other, benchmark)
            if row:
                rows.append({"method": method, "label": label(method), "reference": reference, **row})
    return rows


def verdict(row: dict[str, Any], reference_label: str = "SFT") -> str:
    """One plain sentence: who won on this benchmark, by how much, and how sure we are."""
    delta = 100 * row["delta"]
    low, high = (100 * x for x in row["delta_ci95"])
    evidence = (f"{row['accuracy']:.1%} against {row['reference_accuracy']:.1%}; 95% CI of the difference "
                f"{low:+.1f} to {high:+.1f} points; McNemar p = {row['mcnemar_p']:.3g}; {row['pairs']} paired problems "
                f"over {len(row['seeds'])} seed{'s' if len(row['seeds']) != 1 else ''}")
    subject = f"On {row['benchmark']}, {row['label']}"
    if row["mcnemar_p"] < SIGNIFICANCE and delta > 0:
        return f"{subject} beat {reference_label} by {delta:.1f} points ({evidence})."
    if row["mcnemar_p"] < SIGNIFICANCE and delta < 0:
        return f"{subject} did worse than {reference_label}, by {-delta:.1f} points ({evidence})."
    return (f"{subject} did not differ significantly from {reference_label} (difference {delta:+.1f} points: "
            f"{evidence}).")


def step_costs(results: list[dict], study: str) -> list[dict[str, Any]]:
    """Median seconds per optimizer step per method (all its runs, first step of each left out)."""
    rows = []
    for method in METHODS:
        curves = [c for r in main_runs(results, study, method) if r["train"]
                  for c in r["train"]["curves"] if c["step"] > 1 and "step_time_s" in c]
        if not curves:
            continue
        by_objective = {}
        for objective in dict.fromkeys(c["objective"] for c in curves):
            by_objective[objective] = statistics.median(c["step_time_s"] for c in curves if c["objective"] == objective)
        rows.append({"method": method, "label": label(method), "steps": len(curves),
                     "median_s": statistics.median(c["step_time_s"] for c in curves), "by_objective": by_objective})
    sft = next((r["median_s"] for r in rows if r["method"] == "sft"), None)
    for row in rows:
        row["vs_sft"] = row["median_s"] / sft if sft else None
    return rows


def signal_rows(results: list[dict], study: str) -> list[dict[str, Any]]:
    """One row per method that ran OTR steps: how much on-policy signal its OTR steps had.

    Each row: method, label, runs, otr_steps (per run, the most of any run), match_rate and
    unreachable_frac (means over every OTR step of every run; unreachable_frac None when no run
    recorded it), warned_at (per run that warns: the step), by_unreachable (how many of those by the
    unreachable-targets rule), unmeasured (runs recorded before otr measured unreachable_frac).
    The warnings are replayed from the recorded curves with today's default settings, so a report
    regenerated after the defaults change says what a user would see now.
    """
    rows = []
    for method in METHODS:
        runs = [r for r in main_runs(results, study, method) if r["train"]]
        curves = [[c for c in r["train"]["curves"] if c.get("objective") in ("otr", "otr_exact")] for r in runs]
        if not any(curves):
            continue
        steps = [c for curve in curves for c in curve]
        unreachable = [c["unreachable_frac"] for c in steps if c.get("unreachable_frac") is not None]
        warnings = [w for w in (replay_warning(r["train"]["curves"]) for r in runs) if w]
        rows.append({
            "method": method, "label": label(method), "runs": len(runs), "otr_steps": max(len(c) for c in curves),
            "match_rate": sum(c["match_rate"] for c in steps) / len(steps),
            "unreachable_frac": sum(unreachable) / len(unreachable) if unreachable else None,
            "warned_at": [step for step, _ in warnings],
            "by_unreachable": sum(1 for _, rule in warnings if rule == "unreachable"),
            "unmeasured": sum(1 for curve in curves if curve and "unreachable_frac" not in curve[0]),
        })
    return rows


def replay_warning(curves: list[dict[str, Any]]) -> Optional[tuple[int, str]]:
    """(step, rule) of the weak-OTR-signal warning a run with these curves gets at the default settings;
    rule is "match_rate" or "unreachable"."""
    monitor = WeakSignalMonitor.from_config(LossConfig())
    for record in curves:
        if monitor.observe(record):
            return record["step"], monitor.fired_rule
    return None


def ablation_rows(results: list[dict]) -> list[dict[str, Any]]:
    """One row per (axis, value) of each ablated method; the default point is study A's run of it.

    Each row: mean accuracy per benchmark over its seeds and the paired difference against the
    default point on the same seeds.
    """
    ablated = [r for r in results if r["study"] == "ablations"]
    rows = []
    for method in dict.fromkeys(r["method"] for r in ablated):
        seeds = {r["seed"] for r in ablated if r["method"] == method}
        default_runs = [r for r in main_runs(results, "A", method) if r["seed"] in seeds]
        names = list(dict.fromkeys(b for r in ablated + default_runs for b in r["eval"]))
        for axis, values in ABLATION_GRID.items():
            for value in values:
                if value == OTR_DEFAULTS[axis]:
                    runs = default_runs
                else:
                    runs = [r for r in ablated if r["method"] == method and r["ablation"]["axis"] == axis
                            and r["ablation"]["value"] == value]
                if not runs:
                    continue
                cells = {}
                for name in names:
                    scored = [r["eval"][name]["accuracy"] for r in runs if name in r["eval"]]
                    if not scored:
                        continue
                    cell = {"mean": sum(scored) / len(scored), "seeds": len(scored)}
                    if value != OTR_DEFAULTS[axis]:
                        cell["vs_default"] = paired_test(default_runs, runs, name)
                    cells[name] = cell
                rows.append({"method": method, "axis": axis, "value": value,
                             "default": value == OTR_DEFAULTS[axis], "cells": cells})
    return rows
