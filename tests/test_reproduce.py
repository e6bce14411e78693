"""scripts/reproduce.py: the study machinery on the tiny random model (cache, skip, resume, report, commands)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import threading
from pathlib import Path

import pytest

from helpers import REPO

from otr_cli.study import analysis
from otr_cli.study import report as reproduce_report
from otr_cli.study.methods import METHODS
from otr_cli.study.plan import StudyOptions, build_plan, display_path
from otr_cli.study.runner import run_plan, run_status
from otr_cli.study.sizes import SIZES

spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)

# One method pair on study A, as short as it gets: 3 steps (2 of them the SFT warm-up), 3 problems per split.
FAST = ["--override", "trainer.max_steps=3", "--override", "data.synthetic.num_train=48", "--override",
        "data.synthetic.num_validation=8", "--override", "eval.limit=3", "--override", "eval.max_new_tokens=12",
        "--override", "eval.batch_size=6"]


def study_args(tiny_model_dir: Path, root: Path, *extra: str) -> list[str]:
    return ["--size", "tiny", "--only", "A", "--methods", "sft", "warmup_otr", "--model", str(tiny_model_dir),
            "--cache-root", str(root / "cache"), "--docs-dir", str(root / "docs"), *FAST, *extra]


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    """The study run once (base model eval + sft + warmup_otr, 1 seed) and its first output."""
    root = tmp_path_factory.mktemp("study")
    import contextlib
    import io

    out = io.StringIO()
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the `otr` subprocesses: a tiny model gains nothing from a second thread
    try:
        with contextlib.redirect_stdout(out):
            code = reproduce.main(study_args(tiny_model_dir, root))
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = threads
    return {"root": root, "code": code, "stdout": out.getvalue(), "model": tiny_model_dir}


@pytest.mark.slow
def test_runs_land_in_the_cache_with_their_result_files(study):
    assert study["code"] == 0, study["stdout"]
    cache = study["root"] / "cache" / "tiny" / "A"
    for method in ("sft", "warmup_otr"):
        run_dir = cache / method / "seed-1"
        assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"
        assert (run_dir / "summary.json").is_file() and (run_dir / "final").is_dir()
        assert not (run_dir / "checkpoints").exists()  # pruned once finished: ~1.6 GB each on the real model
    assert (cache / "base" / "eval" / "results.json").is_file()
    results = study["root"] / "docs" / "study" / "results" / "tiny"
    assert sorted(p.name for p in results.glob("*.json")) == ["A-base.json", "A-sft-seed1.json",
                                                                "A-warmup_otr-seed1.json"]
    record = json.loads((results / "A-warmup_otr-seed1.json").read_text())
    assert set(record["eval"]) == {"synthetic_arith", "synthetic_arith_ood"}
    assert len(record["eval"]["synthetic_arith"]["outcomes"]) == 3
    assert [c["objective"] for c in record["train"]["curves"]] == ["sft", "sft", "otr"]
    assert all("step_time_s" in c for c in record["train"]["curves"])
    assert "match_rate" in record["train"]["curves"][-1]
    assert record["command"].startswith("otr train recipe=smollm2_demo")
    assert not list(results.glob("*.safetensors"))


def test_a_second_invocation_skips_finished_runs(study, capsys):
    logs = sorted((study["root"] / "cache").rglob("study.log"))
    before = [p.read_text() for p in logs]
    assert reproduce.main(study_args(study["model"], study["root"])) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 3 and "starting" not in out
    assert [p.read_text() for p in logs] == before  # no `otr` process was started


def test_an_unfinished_run_is_resumed_with_the_same_command(study, tmp_path, monkeypatch):
    options = StudyOptions(size=SIZES["tiny"], only="A", methods=["sft"], cache_root=tmp_path / "cache",
                           model=str(study["model"]))
    run = [r for r in build_plan(options) if r.method == "sft"][0]
    assert run_status(run) == "new"
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "run_state.json").write_text(json.dumps({"status": "running", "step": 2}))
    assert run_status(run) == "unfinished"
    started = []

    def fake_execute(r, threads=None):  # stands in for `otr train ... trainer.resume=auto` finishing the run
        started.append(r.argv)
        (r.run_dir / "summary.json").write_text("{}")
        (r.run_dir / "run_state.json").write_text(json.dumps({"status": "finished"}))
        return 0

    monkeypatch.setattr("otr_cli.study.runner.execute", fake_execute)
    monkeypatch.setattr("otr_cli.study.runner.collect", lambda r, size: {"key": r.key})
    lines = []
    outcomes = run_plan([run], tmp_path / "results", "tiny", echo=lines.append)
    assert "trainer.resume=auto" in started[0] and "resuming" in lines[0]
    assert [o.status for o in outcomes] == ["finished"] and run_status(run) == "finished"


def test_jobs_runs_two_at_once_with_the_cores_shared_out(study, tmp_path, monkeypatch):
    options = StudyOptions(size=SIZES["tiny"], only="A", methods=["sft", "otr"], cache_root=tmp_path / "cache",
                           model=str(study["model"]))
    runs = [r for r in build_plan(options) if r.method != "base"]
    both_running = threading.Barrier(2, timeout=30)  # breaks (and fails the runs) unless two run at once
    threads_given = []

    def fake_execute(r, threads=None):  # stands in for `otr train` finishing the run
        threads_given.append(threads)
        both_running.wait()
        r.run_dir.mkdir(parents=True)
        (r.run_dir / "summary.json").write_text("{}")
        (r.run_dir / "run_state.json").write_text(json.dumps({"status": "finished"}))
        return 0

    monkeypatch.setattr("otr_cli.study.runner.execute", fake_execute)
    monkeypatch.setattr("otr_cli.study.runner.collect", lambda r, size: {"key": r.key})
    monkeypatch.setattr("otr_cli.study.runner.os.cpu_count", lambda: 2)
    outcomes = run_plan(runs, tmp_path / "results", "tiny", echo=lambda line: None, jobs=2)
    assert [o.run.key for o in outcomes] == [r.key for r in runs]  # reported in plan order
    assert [o.status for o in outcomes] == ["finished", "finished"]
    assert threads_given == [1, 1]  # 2 cores shared by 2 runs: OMP_NUM_THREADS=1 each


def test_jobs_below_one_is_refused(capsys):
    assert reproduce.main(["--dry-run", "--jobs", "0"]) == 2
    assert "--jobs 0" in capsys.readouterr().err


def test_a_cache_made_by_another_command_is_refused(study, capsys):
    code = reproduce.main(study_args(study["model"], study["root"], "--override", "optim.lr=5e-5"))
    err = capsys.readouterr().err
    assert code == 2 and "holds a run made by a different command" in err and "--cache-root" in err


def test_report_tables_come_from_the_result_files(study):
    docs = study["root"] / "docs"
    report = (docs / "results.md").read_text()
    assert (docs / "study" / "accuracy_A.png").stat().st_size > 0
    assert (docs / "study" / "curves_A.png").stat().st_size > 0
    assert "study/accuracy_A.png" in report and "study/curves_A.png" in report
    for heading in ("## Verdict", "### Accuracy", "### Paired differences against SFT", "### On-policy signal",
                    "### Wall-clock cost per training step", "## Commands"):
        assert heading in report
    assert "Study B" in report and "No results yet" in report  # absent studies say so
    # The verdict sentence is computed from the per-problem outcomes in the kept files.
    results = [json.loads(p.read_text()) for p in (docs / "study" / "results" / "tiny").glob("*.json")]
    runs = {r["method"]: r for r in results}
    sft = runs["sft"]["eval"]["synthetic_arith"]["outcomes"]
    otr = runs["warmup_otr"]["eval"]["synthetic_arith"]["outcomes"]
    delta = 100 * (sum(otr.values()) - sum(sft.values())) / len(sft)
    sentence = next(line for line in report.splitlines() if "On synthetic_arith, SFT warm-up, then OTR" in line)
    assert f"{abs(delta):.1f} points" in sentence
    assert "3 paired problems over 1 seed" in sentence
    for method in ("base model", "SFT", "SFT warm-up, then OTR"):
        assert f"| {method} |" in report
    assert runs["sft"]["command"] in report  # the exact commands
    assert reproduce.main(["--report", "--size", "tiny", "--docs-dir", str(docs)]) == 0
    assert (docs / "results.md").read_text() == report  # deterministic: regenerating changes nothing


def test_verdict_says_who_won_and_by_how_much():
    def result(method, seed, outcomes):
        return {"study": "A", "method": method, "seed": seed, "ablation": None, "train": None,
                "eval": {"synthetic_arith": {"accuracy": sum(outcomes) / len(outcomes), "correct": sum(outcomes),
                                             "n": len(outcomes),
                                             "outcomes": {f"test-{i}": o for i, o in enumerate(outcomes)}}}}

    results = [result("sft", s, [False] * 40) for s in (1, 2, 3)]
    results += [result("otr", s, [True] * 12 + [False] * 28) for s in (1, 2, 3)]
    results += [result("warmup_otr", s, [i == s for i in range(40)]) for s in (1, 2, 3)]
    rows = {r["method"]: r for r in analysis.differences_vs(results, "A")}
    assert analysis.verdict(rows["otr"]).startswith("On synthetic_arith, OTR beat SFT by 30.0 points (30.0% against "
                                                    "0.0%")
    assert "did not differ significantly" in analysis.verdict(rows["warmup_otr"])
    mean, (low, high) = analysis.mean_interval([0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.3) and high - mean == pytest.approx(4.303 * 0.1 / 3 ** 0.5)


def test_report_signal_table_replays_the_warning_on_the_recorded_curves():
    def result(method, seed, fractions):
        curves = [{"step": s, "objective": "otr", "match_rate": 0.8, "ce": 1.0} for s in range(1, len(fractions) + 1)]
        for curve, fraction in zip(curves, fractions):
            if fraction is not None:
                curve["unreachable_frac"] = fraction
        return {"study": "A", "method": method, "seed": seed, "ablation": None, "eval": {},
                "train": {"warnings": [], "curves": curves}}

    results = [result("otr", 1, [0.09] * 24), result("otr", 2, [0.01] * 24),
               result("warmup_otr", 1, [0.0] * 12), result("otr_exact", 1, [None] * 24)]
    rows = {row["method"]: row for row in analysis.signal_rows(results, "A")}
    assert rows["otr"]["unreachable_frac"] == pytest.approx(0.05) and rows["otr"]["warned_at"] == [20]
    assert rows["otr"]["by_unreachable"] == 1 and rows["otr_exact"]["unreachable_frac"] is None
    table = "\n".join(reproduce_report._weak_signal(results, "A"))
    assert "| OTR | 2 | 24 | 80.0% | 5.0% | 1 of 2 runs, at step 20 (unreachable targets) |" in table
    assert "| SFT warm-up, then OTR | 1 | 12 | 80.0% | 0.0% | 0 of 1 runs (too few OTR steps to judge) |" in table
    assert "| OTR-exact | 1 | 24 | 80.0% | not recorded | 0 of 1 runs |" in table
    assert "1 of these runs were recorded before otr measured unreachable targets" in table


def test_dry_run_prints_every_command_and_the_time_estimate(capsys, tmp_path):
    assert reproduce.main(["--dry-run", "--cache-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("otr ")]
    # A: 6 methods x 3 seeds + base; B: 3 methods x 1 + base; ablations: 6 non-default points (1 seed).
    assert len(commands) == 18 + 1 + 3 + 1 + 6
    estimate = out.splitlines()[0]
    assert "29 new" in estimate and " h " in estimate and "--jobs" in estimate
    # Shown as display_path shows it: relative (../) when pytest's tmp dir lies beside the checkout.
    assert all(f"run.output_dir={display_path(tmp_path)}/default/" in c for c in commands)
    assert any("loss.baseline=loo" in c and "loss.sft_warmup_steps=12" in c for c in commands)
    assert not list(tmp_path.iterdir())  # nothing was run or created


def test_study_commands_compose(capsys):
    """A study B command and a paper point are valid `otr train` configurations (dry_run, nothing loaded)."""
    from otr_cli.cli import main as otr_main

    assert reproduce.main(["--dry-run", "--only", "B", "--methods", "warmup_otr"]) == 0
    b_command = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("otr train"))
    assert reproduce.main(["--size", "paper", "--only", "ablations"]) == 0
    paper = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("otr train"))
    # One point of the sweep: drop -m and keep the first value of each comma list.
    point = [arg.split(",")[0] if "=" in arg and "[" not in arg else arg for arg in shlex.split(paper)[2:]
             if arg != "-m"]
    for args in (shlex.split(b_command)[1:], ["train", *point]):
        assert otr_main([*args, "dry_run=true"]) == 0
        assert "dry run: nothing was loaded or written" in capsys.readouterr().out


def test_paper_size_prints_slurm_sweeps(capsys):
    assert reproduce.main(["--size", "paper", "--partition", "a100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sweeps = [line for line in lines if line.startswith("otr train -m recipe=qwen8b_math launcher=slurm")]
    assert len(sweeps) == len(METHODS) + 3  # one array per method, one per ablation axis
    assert all("launcher.partition=a100" in s and "trainer.max_steps=390" in s for s in sweeps)
    assert any("loss.k=1,8,64" in s for s in sweeps) and any("seed=1,2,3" in s for s in sweeps)
    assert any(line.startswith("otr eval model=qwen3_8b") for line in lines)
    assert reproduce.main(["--size", "paper", "--only", "A"]) == 2
    assert "no paper-scale version" in capsys.readouterr().err


def test_bad_options_name_the_option(capsys, tmp_path):
    assert reproduce.main(["--dry-run", "--methods", "ppo"]) == 2
    assert "--methods: unknown method(s) ppo" in capsys.readouterr().err
    assert reproduce.main(["--report", "--docs-dir", str(tmp_path)]) == 2
    assert "no result files yet" in capsys.readouterr().err
    assert reproduce.main(["--only", "B", "--data-dir", str(tmp_path), "--cache-root", str(tmp_path / "c")]) == 2
    assert "gsm8k/train.jsonl" in capsys.readouterr().err
