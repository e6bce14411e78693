"""Per-run result files: what the report needs from a run, small enough to keep in git.

One JSON file per run, `<results>/<run key>.json`:

    key, size, study, method, seed, ablation ({"axis", "value"} or null), budget, command, model
    eval:  {benchmark: {accuracy, correct, n, ci95, outcomes: {problem id: correct}}}
           (per-problem outcomes are what the paired tests need)
    train: {total_steps, train_seconds, val_ce, warnings, curves: [{step, objective, loss, ce,
           match_rate, p_target, entropy, no_match_frac, unreachable_frac, step_time_s (s), tokens}]}   (null for the base model)

Never model weights: the run directories under the cache root keep those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from otr_cli.atomic import write_json_atomic
from otr_cli.eval.compare import load_run
from otr_cli.study.methods import StudyError
from otr_cli.study.plan import Run

SCHEMA = 1
CURVE_KEYS = ("step", "objective", "loss", "ce", "match_rate", "p_target", "entropy", "no_match_frac", "unreachable_frac",
              "step_time_s", "tokens")


def eval_dir(run: Run) -> Path:
    """Where the run's final evaluation lies: `otr eval` writes <dir>/eval, `otr train` <dir>/eval/final."""
    return run.run_dir / "eval" if run.is_eval_only else run.run_dir / "eval" / "final"


def collect(run: Run, size: str) -> dict[str, Any]:
    """The result record of a finished run, read from its directory."""
    evaluation = load_run(eval_dir(run))
    scores = {}
    for name, result in evaluation["benchmarks"].items():
        scores[name] = {"accuracy": result["accuracy"], "correct": result["correct"], "n": result["n"],
                        "ci95": result["ci95"], "outcomes": evaluation["outcomes"][name]}
    return {"schema": SCHEMA, "key": run.key, "size": size, "study": run.study, "method": run.method, "seed": run.seed,
            "ablation": {"axis": run.ablation[0], "value": run.ablation[1]} if run.ablation else None,
            "budget": run.budget, "command": run.command(), "model": evaluation["model"], "eval": scores,
            "train": None if run.is_eval_only else _training(run.run_dir)}


def _training(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curves = [{k: _round(r[k]) for k in CURVE_KEYS if k in r} for r in records if "loss" in r]
    val = [r["val_ce"] for r in records if "val_ce" in r]
    return {"total_steps": summary["total_steps"], "train_seconds": round(summary["train_seconds"], 1),
            "val_ce": _round(val[-1]) if val else None,
            "warnings": [r["warning"] for r in records if "warning" in r], "curves": curves}


def _round(value: Any) -> Any:
    """Six significant digits: enough for curves, and the files stay small and diff well."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def write_result(record: dict[str, Any], results_dir: Path) -> Path:
    path = results_dir / f"{record['key']}.json"
    write_json_atomic(path, record)
    return path


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every result file in `results_dir`, sorted by key; a malformed one is an error naming it."""
    if not results_dir.is_dir():
        raise StudyError(f"{results_dir}: no result files yet; run scripts/reproduce.py first (or pick --size)")
    records = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StudyError(f"{path}: malformed JSON ({exc})") from exc
        if record.get("schema") != SCHEMA:
            raise StudyError(f"{path}: result schema {record.get('schema')!r}, expected {SCHEMA}; rerun the study "
                             f"to regenerate it")
        records.append(record)
    return records
