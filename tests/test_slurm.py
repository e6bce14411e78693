"""`otr train -m ... launcher=slurm` on a real one-node SLURM cluster started for this session.

Skipped, with the reason, where SLURM's daemons are not installed (CI installs them: .ci/run).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import read_jsonl, subprocess_env, tiny_overrides
from otr_cli.cli import main
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def sweep_overrides(model_dir: Path, sweep_dir: Path, *extra: str) -> list[str]:
    """The tiny run's overrides for a sweep: every point writes under the sweep dir, not run.output_dir."""
    base = [o for o in tiny_overrides(model_dir, sweep_dir) if not o.startswith("run.output_dir=")]
    return [*base, "launcher=slurm", f"hydra.sweep.dir={sweep_dir}", *extra]


def otr(args: list[str], cluster: SlurmCluster, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "otr_cli.cli", *args], cwd=cwd, env=subprocess_env() | cluster.env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"otr {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}\n{job_logs(cwd)}")
    return result


def job_logs(directory: Path, tail: int | None = 3000) -> str:
    """The SLURM jobs' own logs (submitit writes them under <sweep>/.submitit): the last `tail` characters of
    each for a failure message, all of them (tail=None) for a search."""
    logs = sorted(directory.rglob(".submitit/*/*_log.*"))
    return "\n".join(f"--- {log}\n{log.read_text()[-tail if tail else 0:]}" for log in logs)


def array_jobs(sweep_dir: Path) -> dict[str, list[str]]:
    """{array job id: [element indices]} from submitit's per-element folders (<id>_<index>)."""
    found: dict[str, list[str]] = {}
    for child in (sweep_dir / ".submitit").iterdir():
        match = re.fullmatch(r"(\d+)_(\d+)", child.name)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return {job: sorted(indices) for job, indices in found.items()}


def submitted_job_ids(sweep_dir: Path) -> list[str]:
    """Ids SLURM knows the sweep's jobs by: <array>_<index> per element (a one-point sweep is a plain job)."""
    names = [child.name for child in (sweep_dir / ".submitit").iterdir()]
    elements = sorted(name for name in names if re.fullmatch(r"\d+_\d+", name))
    return elements or sorted(name for name in names if name.isdigit())


def losses(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r or "val_ce" in r]


def test_three_point_sweep_is_one_job_array_with_a_run_dir_per_point(slurm, tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    otr(["train", "-m", *sweep_overrides(tiny_model_dir, sweep, "loss=otr", "loss.k=8", "loss.beta=0,-0.1,-0.3")],
        slurm, cwd=tmp_path)
    jobs = array_jobs(sweep)
    assert len(jobs) == 1, f"expected one array job, got {jobs}"
    assert list(jobs.values())[0] == ["0", "1", "2"]
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --signal=USR1@120" in script
    assert "#SBATCH --open-mode=append" in script  # a requeued job keeps the log of the run before it
    for point, beta in zip("012", (0.0, -0.1, -0.3)):
        run = sweep / point
        assert json.loads((run / "run_state.json").read_text())["status"] == "finished"
        assert f"beta: {beta}" in (run / "config.yaml").read_text()
        assert (run / "final" / "model.safetensors").is_file()

    result = otr(["sweep", "summary", str(sweep)], slurm, cwd=tmp_path)
    rows = [line for line in result.stdout.splitlines() if re.match(r"^│\s+\d\s+│", line)]
    assert len(rows) == 3, result.stdout
    assert all("finished" in row for row in rows)
    assert "loss.beta" in result.stdout and "best" in result.stdout
    assert (sweep / "sweep_summary.csv").read_text().count("\n") == 4
    assert (sweep / "sweep_summary.png").stat().st_size > 0


def test_recipe_file_sweep_runs_its_points_as_slurm_jobs(slurm, tiny_model_dir, tmp_path):
    # The file is stored in Hydra's ConfigStore, which each SLURM job receives with the sweep.
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults:\n  - smollm2_demo\n  - _self_\nloss:\n  k: 8\ntrainer:\n  max_steps: 2\n")
    sweep = tmp_path / "sweep"
    overrides = [o for o in sweep_overrides(tiny_model_dir, sweep) if not o.startswith(("recipe=", "trainer.max_steps="))]
    otr(["train", "-m", str(recipe), *overrides, "loss.beta=-0.2"], slurm, cwd=tmp_path)
    run = sweep / "0"
    assert json.loads((run / "run_state.json").read_text())["status"] == "finished"
    assert "k: 8" in (run / "config.yaml").read_text() and "beta: -0.2" in (run / "config.yaml").read_text()


def test_two_task_zero2_job_initialises_from_slurm_and_matches_one_process(slurm, tiny_model_dir, tmp_path):
    common = ["loss=otr_exact", "loss.temperature=1.3", "loss.beta=-0.1", "deepspeed=zero2", "trainer.max_steps=3"]
    sweep = tmp_path / "sweep"
    otr(["train", "-m", *sweep_overrides(tiny_model_dir, sweep, *common, "trainer.micro_batch_size=2",
                                         "launcher.tasks_per_node=2")], slurm, cwd=tmp_path)
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "one", *common, "trainer.micro_batch_size=4")])
    one, two = losses(tmp_path / "one"), losses(sweep / "0")
    assert [r["step"] for r in two if "loss" in r] == [1, 2, 3]
    for left, right in zip(one, two):
        if "loss" in left:
            assert right["loss"] == pytest.approx(left["loss"], rel=1e-4, abs=1e-7)
            assert right["supervised_tokens"] == left["supervised_tokens"]
    shards = list((sweep / "0" / "checkpoints" / "checkpoint-3" / "ds").glob("*optim_states.pt"))
    assert len(shards) == 2, "each of the two SLURM tasks writes its ZeRO-2 optimizer shard"
    logs = job_logs(tmp_path)
    assert "global_rank=1(2)" in logs  # two tasks in one job step
    assert "[rank 0]" in logs  # log lines name their rank


def _wait_for_steps(metrics: Path, steps: int, process: subprocess.Popen, timeout: float, sweep: Path) -> None:
    deadline = time.time() + timeout
    while not (metrics.is_file() and sum(1 for r in read_jsonl(metrics) if "loss" in r) >= steps):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise AssertionError(f"no step {steps} in {metrics} (exit {process.returncode}):\n{job_logs(sweep.parent)}")
        time.sleep(0.1)


@pytest.mark.faults
def test_preempted_job_saves_requeues_itself_and_ends_like_an_uninterrupted_run(slurm, tiny_model_dir, tmp_path):
    common = ["loss=otr", "loss.k=16", "loss.temperature=1.3", "loss.beta=-0.1", "trainer.max_steps=16",
              "data.synthetic.num_train=20"]
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "reference", *common)])

    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "otr_cli.cli", "train", "-m", *sweep_overrides(tiny_model_dir, sweep, *common)]
    with (tmp_path / "submit.log").open("w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env() | slurm.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        _wait_for_steps(sweep / "0" / "metrics.jsonl", 2, process, timeout=180, sweep=sweep)
        [job] = submitted_job_ids(sweep)
        # What SLURM sends before the time limit (--signal=USR1@N); scancel delivers it to the job's tasks.
        subprocess.run(["scancel", "--signal=USR1", job], env=subprocess_env() | slurm.env, check=True)
        try:
            process.wait(timeout=240)
        finally:
            process.kill()
    logs = job_logs(tmp_path)
    assert process.returncode == 0, f"{(tmp_path / 'submit.log').read_text()[-3000:]}\n{logs}"
    # The whole log: the run before the requeue (appended to, not overwritten: open-mode=append) comes first.
    whole = job_logs(tmp_path, tail=None)
    assert "Preempted at step" in whole and "requeued" in whole, logs
    assert whole.index("Preempted at step") < whole.index("Resumed from"), logs
    restarts = subprocess.run(["scontrol", "show", "job", job], env=subprocess_env() | slurm.env,
                              capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts, restarts

    reference, resumed = losses(tmp_path / "reference"), losses(sweep / "0")
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 17))
    assert len(resumed) == len(reference)
    for left, right in zip(reference, resumed):
        for key in ("loss", "ce", "match_rate", "grad_norm", "lr", "val_ce"):
            if key in left:
                assert right[key] == pytest.approx(left[key], rel=1e-6, abs=1e-9), (left["step"], key)
    assert json.loads((sweep / "0" / "run_state.json").read_text())["status"] == "finished"


def sbatch(script: str, cluster: SlurmCluster, cwd: Path, tasks: int = 2) -> tuple[subprocess.CompletedProcess, str]:
    """`sbatch --wait --ntasks=<tasks>` of a bash script run in `cwd`: (sbatch's result, the job's output)."""
    (cwd / "job.sh").write_text("#!/bin/bash\n" + script)
    result = subprocess.run(["sbatch", "--wait", f"--ntasks={tasks}", f"--chdir={cwd}", "--output=job.log", "job.sh"],
                            cwd=cwd, env=subprocess_env() | cluster.env, capture_output=True, text=True, timeout=300)
    return result, (cwd / "job.log").read_text()


def test_otr_train_in_a_batch_script_without_srun_fails_at_once_with_the_srun_command(slurm, tiny_model_dir,
                                                                                      tmp_path):
    # Before: the batch shell (SLURM_PROCID=0, SLURM_NTASKS=2) became rank 0 of 2 and waited for a peer.
    command = [sys.executable, "-m", "otr_cli.cli", "train",
               *tiny_overrides(tiny_model_dir, tmp_path / "run", "launcher.dist_timeout_min=1")]
    # Timed inside the job: `sbatch --wait` itself polls at growing intervals.
    script = " ".join(command) + '\nstatus=$?\necho "otr exited after $SECONDS s"\nexit $status\n'
    result, log = sbatch(script, slurm, tmp_path)
    assert result.returncode == 2, log[-3000:]
    message = " ".join(log.split())
    assert "error: otr was not started by srun but runs in the shell of SLURM job" in message, log[-3000:]
    assert "which has 2 tasks" in message and "`srun otr train ...`" in message and "Traceback" not in log
    elapsed = int(re.search(r"otr exited after (\d+) s", log).group(1))
    assert elapsed < 60, f"{elapsed} s: it waited for a rendezvous"


STEP_PROBE = """\
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from otr_cli.train.distributed import populate_env_from_launcher
populate_env_from_launcher()
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
time.sleep(3)  # the steps hold their rendezvous at the same time
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)
print(f"step={os.environ['SLURM_STEP_ID']} rank={dist.get_rank()} world={dist.get_world_size()} "
      f"port={os.environ['MASTER_PORT']} sum={int(total)}", flush=True)
"""


def test_concurrent_steps_of_one_job_each_meet_among_their_own_tasks(slurm, tmp_path):
    # Before: both 2-task steps took the port of the job id; one failed with EADDRINUSE, the other timed out.
    (tmp_path / "probe.py").write_text(STEP_PROBE)
    probe = f"srun --overlap --ntasks={{}} {sys.executable} probe.py &\n"
    result, log = sbatch(probe.format(2) + probe.format(2) + probe.format(1) + "wait\n", slurm, tmp_path)
    assert result.returncode == 0, log[-5000:]
    steps: dict[str, list[dict]] = {}
    for line in log.splitlines():
        if line.startswith("step="):
            fields = dict(item.split("=") for item in line.split())
            steps.setdefault(fields["step"], []).append(fields)
    # Step ids follow the order in which the background sruns reached the controller.
    shapes = sorted((len(tasks), sorted(f["rank"] for f in tasks), {(f["world"], f["sum"], f["port"]) for f in tasks})
                    for tasks in steps.values())
    assert [(count, ranks, len(agreed)) for count, ranks, agreed in shapes] == [
        (1, ["0"], 1), (2, ["0", "1"], 1), (2, ["0", "1"], 1)], log
    assert [next(iter(agreed))[:2] for _, _, agreed in shapes] == [("1", "1"), ("2", "3"), ("2", "3")], log
    assert shapes[1][2] != shapes[2][2], f"two steps on one port:\n{log}"
