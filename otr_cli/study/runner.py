"""Run the plan: skip finished runs, resume unfinished ones, record each result.

A run is finished when its directory says so: `run_state.json` with status finished plus
`summary.json` (otr train), or `eval/results.json` (otr eval of the base model). Anything else
in an existing directory is an interrupted run: the same `otr train` command continues it from
its newest checkpoint (trainer.resume=auto), with the same data order and random draws.

Every directory remembers the command that made it (study_command.json); a different command
for the same directory (other budget, model or overrides) is refused instead of mixing results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from otr_cli.atomic import write_json_atomic
from otr_cli.eval.compare import CompareError
from otr_cli.study.methods import StudyError
from otr_cli.study.plan import REPO, Run, display_path
from otr_cli.study.results import collect, write_result
from otr_cli.study.sizes import format_duration

COMMAND_FILE = "study_command.json"
LOG_FILE = "study.log"
# Rendezvous variables a parent process may hold; a child `otr train` must start as a single process.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Files of study B that must exist under --data-dir (docs/study.md).
B_DATA_FILES = ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "svamp/test.jsonl", "mmlu_stem/test.jsonl",
                "humaneval/HumanEval.jsonl.gz")


@dataclass
class Outcome:
    run: Run
    status: str          # skipped (finished earlier), finished, failed
    seconds: float = 0.0
    message: str = ""


def run_status(run: Run) -> str:
    """new (no directory), finished, or unfinished (interrupted: the same command resumes it)."""
    if not run.run_dir.exists():
        return "new"
    if run.is_eval_only:
        return "finished" if (run.run_dir / "eval" / "results.json").is_file() else "unfinished"
    state_file = run.run_dir / "run_state.json"
    if state_file.is_file() and (run.run_dir / "summary.json").is_file():
        try:
            if json.loads(state_file.read_text()).get("status") == "finished":
                return "finished"
        except json.JSONDecodeError:
            pass  # a torn file from a crash: treat as unfinished, otr train rewrites it
    return "unfinished"


def check_command(run: Run) -> None:
    """Refuse a cached directory made by another command (StudyError naming the directory)."""
    path = run.run_dir / COMMAND_FILE
    if not path.is_file():
        return
    stored = json.loads(path.read_text()).get("argv")
    if stored != list(run.argv):
        raise StudyError(
            f"{display_path(run.run_dir)} holds a run made by a different command:\n  before: otr "
            f"{' '.join(stored or [])}\n  now:    {run.command()}\nDelete that directory to redo the run with the "
            f"new settings, or pass another --cache-root.")


def check_data_dir(runs: list[Run], data_dir: Path) -> None:
    """Study B reads GSM8K, SVAMP, MMLU-STEM and HumanEval from --data-dir; fail before hours of work."""
    if not any(run.study == "B" and run_status(run) != "finished" for run in runs):
        return
    missing = [name for name in B_DATA_FILES if not (data_dir / name).is_file()]
    if missing:
        raise StudyError(f"--data-dir {display_path(data_dir)}: study B needs {', '.join(missing)} there "
                         f"(layout: docs/study.md); pass --data-dir or --only A")


def threads_per_job(jobs: int) -> int:
    """CPU threads each of `jobs` concurrent runs may use: the cores shared out, at least one.

    Two single-threaded runs on 2 cores did 1.3x the training tokens/s of one two-threaded run
    (docs/study.md); more threads than cores in all (OpenMP oversubscription) made runs several times slower.
    """
    return max(1, (os.cpu_count() or 1) // jobs)


def execute(run: Run, threads: Optional[int] = None) -> int:
    """`otr <argv>` in a fresh process from the repository root; output appended to study.log.

    threads: OMP_NUM_THREADS of the child (None: inherit, torch then uses every core).
    """
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.run_dir / COMMAND_FILE, {"argv": list(run.argv), "command": run.command()})
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {"PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with (run.run_dir / LOG_FILE).open("a") as log:
        log.write(f"$ {run.command()}\n")
        log.flush()
        process = subprocess.run([sys.executable, "-m", "otr_cli.cli", *run.argv], cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    return process.returncode


def log_tail(run: Run, lines: int = 15) -> str:
    path = run.run_dir / LOG_FILE
    if not path.is_file():
        return ""
    return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


def run_plan(runs: list[Run], results_dir: Path, size: str, keep_checkpoints: bool = False,
             echo: Callable[[str], None] = print, jobs: int = 1) -> list[Outcome]:
    """Run each run (skipping finished ones) and write its result file; returns outcomes in plan order.

    jobs: runs executed at once (>= 1; scripts/reproduce.py checks --jobs), each with
    threads_per_job(jobs) CPU threads; they start in plan order. Failures do not stop the others;
    they are returned with the tail of their log.
    """
    for run in runs:
        check_command(run)  # all of them first: a stale cache should fail now, not in hour two
    threads = threads_per_job(jobs) if jobs > 1 else None

    def one(numbered: tuple[int, Run]) -> Outcome:
        number, run = numbered
        return _run_one(run, f"[{number}/{len(runs)}] {run.key}", results_dir, size, keep_checkpoints, echo, threads)

    numbered = list(enumerate(runs, start=1))
    if jobs == 1:
        return [one(item) for item in numbered]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, numbered))


def _run_one(run: Run, prefix: str, results_dir: Path, size: str, keep_checkpoints: bool,
             echo: Callable[[str], None], threads: Optional[int]) -> Outcome:
    status = run_status(run)
    started = time.monotonic()
    if status == "finished":
        echo(f"{prefix}: finished earlier, skipped")
        outcome = Outcome(run, "skipped")
    else:
        echo(f"{prefix}: {'resuming' if status == 'unfinished' else 'starting'} (estimate "
             f"{format_duration(run.estimate_s)}; log {display_path(run.run_dir / LOG_FILE)})")
        code = execute(run, threads)
        seconds = time.monotonic() - started
        if code != 0 or run_status(run) != "finished":
            message = f"exit code {code}" if code else "the run did not mark itself finished"
            echo(f"{prefix}: FAILED after {format_duration(seconds)} ({message}); last lines of the log:\n"
                 f"{log_tail(run)}")
            return Outcome(run, "failed", seconds, message)
        echo(f"{prefix}: finished in {format_duration(seconds)}")
        outcome = Outcome(run, "finished", seconds)
    try:
        write_result(collect(run, size), results_dir)
    except (CompareError, OSError, KeyError, ValueError) as exc:
        echo(f"{prefix}: FAILED to read its results ({exc})")
        return Outcome(run, "failed", outcome.seconds, f"results unreadable: {exc}")
    if not keep_checkpoints:
        prune_checkpoints(run)
    return outcome


def prune_checkpoints(run: Run) -> Optional[Path]:
    """Delete a finished run's DeepSpeed checkpoints (~1.6 GB each for SmolLM2-135M with AdamW).

    A finished run never resumes, and final/ keeps its model for later evaluation.
    """
    checkpoints = run.run_dir / "checkpoints"
    if run.is_eval_only or not checkpoints.is_dir():
        return None
    shutil.rmtree(checkpoints, ignore_errors=True)
    return checkpoints
