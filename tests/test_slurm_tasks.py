"""Which processes under SLURM become ranks: only tasks srun started, ranked within their job step.

The variables are set by hand here, as srun and sbatch set them (SLURM 22.05, checked on the test
cluster: a batch script's shell has SLURM_PROCID=0 and SLURM_NTASKS of the job but no SLURM_STEP_ID);
tests/test_slurm.py runs the same cases on a real cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import DIST_VARS, REPO, subprocess_env, tiny_overrides
from otr_cli.errors import UserError
from otr_cli.train.distributed import populate_env_from_launcher, slurm_rendezvous_port, world_size_from_env

BATCH_STEP_ID, EXTERN_STEP_ID = 0xFFFFFFFB, 0xFFFFFFFC  # slurm.h: SLURM_BATCH_SCRIPT, SLURM_EXTERN_CONT


@pytest.fixture
def slurm_env(monkeypatch):
    """A clean slate: no rendezvous or SLURM variables; returns a setter for the ones a case needs."""
    monkeypatch.setattr(shutil, "which", lambda name: None)  # host lists parsed (scontrol: test_slurm_hostlist)
    for name in [*DIST_VARS, *(n for n in os.environ if n.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)

    def set_vars(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_vars


def rendezvous() -> tuple[str, ...]:
    return tuple(os.environ[name] for name in DIST_VARS)


def test_a_task_of_a_step_on_some_nodes_is_ranked_in_the_step_and_meets_at_its_first_host(slurm_env):
    # A 4-task step on the last two nodes of a 16-task job of four nodes (srun -N2 -n4 -r2).
    slurm_env(SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="gpu[01-04]", SLURM_STEP_ID=3, SLURM_STEP_NUM_TASKS=4,
              SLURM_STEP_NODELIST="gpu[03-04]", SLURM_NTASKS=4, SLURM_PROCID=2, SLURM_LOCALID=0)
    populate_env_from_launcher()
    assert rendezvous() == ("2", "4", "0", "gpu03", str(slurm_rendezvous_port(4242, 3)))


def test_steps_of_one_job_and_neighbouring_jobs_meet_on_different_ports():
    ports = {slurm_rendezvous_port(job, step) for job in range(1000, 1100) for step in range(16)}
    assert len(ports) == 100 * 16
    assert all(20000 <= port < 40000 for port in ports)


@pytest.mark.parametrize("step", [None, BATCH_STEP_ID, EXTERN_STEP_ID], ids=["batch-shell", "batch-step", "extern"])
def test_a_shell_of_a_job_of_several_tasks_is_refused_with_the_srun_command(slurm_env, step):
    slurm_env(SLURM_JOB_ID=77, SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NTASKS=16, SLURM_PROCID=0, SLURM_LOCALID=0,
              **({} if step is None else {"SLURM_STEP_ID": step}))
    with pytest.raises(UserError, match=r"not started by srun .* SLURM job 77, which has 16 tasks.*`srun otr train"):
        populate_env_from_launcher()
    assert "RANK" not in os.environ


def test_an_salloc_shell_of_several_tasks_is_refused(slurm_env):
    slurm_env(SLURM_JOB_ID=78, SLURM_NTASKS=2)  # what salloc -n2 sets in its shell
    with pytest.raises(UserError, match="srun otr train"):
        populate_env_from_launcher()


def test_a_batch_shell_of_one_task_trains_as_one_process(slurm_env):
    slurm_env(SLURM_JOB_ID=79, SLURM_JOB_NODELIST="gpu01", SLURM_NTASKS=1, SLURM_PROCID=0)
    populate_env_from_launcher()
    assert rendezvous()[:4] == ("0", "1", "0", "127.0.0.1")


def test_a_one_task_step_of_a_job_of_several_tasks_trains_as_one_process(slurm_env):
    # srun --ntasks=1 in a batch script of 8 tasks: srun sets SLURM_NTASKS to the step's count too.
    slurm_env(SLURM_JOB_ID=80, SLURM_STEP_ID=0, SLURM_STEP_NUM_TASKS=1, SLURM_NTASKS=1, SLURM_PROCID=0)
    populate_env_from_launcher()
    assert rendezvous()[:4] == ("0", "1", "0", "127.0.0.1")


def test_torchrun_inside_a_batch_shell_keeps_its_own_ranks(slurm_env):
    slurm_env(SLURM_JOB_ID=81, SLURM_NTASKS=8, SLURM_PROCID=0, RANK=3, WORLD_SIZE=8, LOCAL_RANK=3,
              MASTER_ADDR="gpu01", MASTER_PORT=29500)
    populate_env_from_launcher()
    assert rendezvous() == ("3", "8", "3", "gpu01", "29500")


def test_a_dry_run_counts_the_steps_tasks_or_what_srun_would_start(slurm_env):
    slurm_env(SLURM_JOB_ID=82, SLURM_NTASKS=16, SLURM_PROCID=0)
    assert world_size_from_env() == 16  # a batch shell: `srun otr train` would start 16
    slurm_env(SLURM_STEP_ID=1, SLURM_STEP_NUM_TASKS=4, SLURM_NTASKS=4)
    assert world_size_from_env() == 4


def test_otr_train_in_a_batch_shell_without_srun_fails_at_once_with_the_command(tiny_model_dir, tmp_path):
    # Before: rank 0 of 2 waited launcher.dist_timeout_min for a peer, then a DistStoreError traceback.
    shell = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    shell |= {"SLURM_JOB_ID": "83", "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "otr_cli.cli", "train",
                             *tiny_overrides(tiny_model_dir, tmp_path / "run", "launcher.dist_timeout_min=1")],
                            cwd=REPO, env=shell, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    message = " ".join(result.stderr.split())  # rich wraps at 80 columns off a terminal
    assert message.startswith("error: otr was not started by srun") and "`srun otr train ...`" in message, message
    assert elapsed < 60, f"{elapsed:.0f} s: it waited for a rendezvous"
    assert not (tmp_path / "run" / "checkpoints").exists()
