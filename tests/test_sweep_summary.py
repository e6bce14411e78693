"""`otr sweep summary`: rows, swept keys, status, best point, CSV and plot; clear errors on bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from helpers import tiny_overrides
from otr_cli.cli import main
from otr_cli.sweep.summary import summarize


def write_point(sweep: Path, name: str, beta: float, seed: int, status: str = "finished", accuracy: float | None = None,
                steps: int = 3, error: dict | None = None) -> None:
    run = sweep / name
    run.mkdir(parents=True)
    config = {"seed": seed, "loss": {"objective": "otr", "beta": beta, "k": 8}, "run": {"output_dir": None}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": -beta * s, "ce": 2.0 - 0.1 * s + beta}) + "\n" for s in range(1, steps + 1)))
    state = {"status": status, "step": steps, "total_steps": 3, **(error or {})}
    (run / "run_state.json").write_text(json.dumps(state))
    if status == "finished":
        with (run / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": steps, "val_ce": 1.5 + beta}) + "\n")
        evals = {"final (step 3)": {"synthetic_arith": {"metric": "accuracy", "value": accuracy, "n": 20}}}
        (run / "summary.json").write_text(json.dumps({"eval": evals if accuracy is not None else {}}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "demo" / "2025-01-01_00-00-00"
    root.mkdir(parents=True)
    # Hydra's record of the command line: gives the swept keys their order.
    (root / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["recipe=smollm2_demo", "loss.beta=-0.1,-0.3", "seed=1,2"]}}}))
    write_point(root, "0", -0.1, 1, accuracy=0.40)
    write_point(root, "1", -0.1, 2, accuracy=0.55)
    write_point(root, "2", -0.3, 1, accuracy=0.45)
    write_point(root, "3", -0.3, 2, status="failed", steps=1,
                error={"rank": 1, "error": "RuntimeError: CUDA out of memory"})
    (root / ".submitit").mkdir()  # submitit's folder is not a point
    return root


def test_summary_has_one_row_per_point_with_swept_values_status_and_the_best_marked(sweep, capsys):
    assert main(["sweep", "summary", str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == 4
    assert "loss.beta" in out and "seed" in out and "loss.k" not in out  # only what was swept
    best_rows = [row for row in rows if "best" in row]
    assert len(best_rows) == 1 and "0.55" in best_rows[0]
    text = " ".join(out.split())  # the lines under the table wrap at the table's width
    assert "failed" in rows[3] and "rank 1: RuntimeError: CUDA out of memory" in text
    assert "best (max synthetic_arith): point 1 loss.beta=-0.1 seed=2" in text
    # 0.40 and 0.55 for beta -0.1 (mean 0.475) beat 0.45 for beta -0.3 (its seed 2 failed)
    assert "best setting, mean over seeds (max synthetic_arith): loss.beta=-0.1 synthetic_arith=0.475 (2 seeds)" in text

    table = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["point"] for r in table] == ["0", "1", "2", "3"]
    assert [r["best"] for r in table] == ["", "yes", "", ""]
    assert table[2]["loss.beta"] == "-0.3" and table[2]["seed"] == "1" and table[2]["synthetic_arith"] == "0.45"
    assert table[3]["status"] == "failed" and table[3]["step"] == "1"
    assert (sweep / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"


def test_swept_keys_follow_the_command_line_order_and_the_metric_can_be_chosen(sweep):
    summary = summarize(sweep, metric="val_ce")
    assert summary.swept_keys == ["loss.beta", "seed"]
    assert not summary.higher_is_better
    assert summary.points[summary.best].name == "2"  # lowest val_ce; the failed point is not a candidate
    assert summarize(sweep, metric="ce", mode="max").higher_is_better


def test_without_benchmarks_the_best_point_is_the_lowest_validation_ce(tmp_path):
    write_point(tmp_path, "0", -0.1, 1)
    write_point(tmp_path, "1", -0.3, 1)
    summary = summarize(tmp_path)
    assert summary.metric == "val_ce" and summary.points[summary.best].name == "1"
    assert summary.swept_keys == ["loss.beta"]  # found from the configs alone, without multirun.yaml


def test_a_sweep_still_running_shows_progress_and_no_best(tmp_path, capsys):
    write_point(tmp_path, "0", -0.1, 1, status="running", steps=2)
    write_point(tmp_path, "1", -0.3, 1, status="preempted", steps=1)
    (tmp_path / "2").mkdir()  # Hydra made it, the job has not started: not a run yet
    assert main(["sweep", "summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "preempted" in out and "2/3" in out
    assert "no finished point has ce: no best point yet" in out


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "no such directory"),
    (lambda d: d, "holds no runs"),
    (lambda d: (write_point(d, "0", -0.1, 1), d / "0")[1], "is a single run, not a sweep"),
])
def test_bad_sweep_dirs_are_clear_errors(tmp_path, capsys, make, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "summary", str(make(tmp_path))])
    assert exit_info.value.code == 2
    assert expected in " ".join(capsys.readouterr().err.split())


def test_unknown_metric_names_the_available_ones(sweep, capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "summary", str(sweep), "--metric", "gsm8k"])
    err = " ".join(capsys.readouterr().err.split())
    assert "--metric 'gsm8k': no point has it; available: loss, ce, val_ce, synthetic_arith" in err


def test_unknown_sweep_subcommand_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "summarise", "x"])
    assert "unknown sweep command 'summarise'" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_local_launcher_runs_a_sweep_sequentially_with_a_run_dir_per_point(tiny_model_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(tiny_model_dir, sweep, "loss=sft", "trainer.max_steps=2")
                 if not o.startswith("run.output_dir=")]
    main(["train", "-m", *overrides, "launcher=local", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"])
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    capsys.readouterr()
    main(["sweep", "summary", str(sweep)])
    out = capsys.readouterr().out
    assert "optim.lr" in out and out.count("finished") == 2
