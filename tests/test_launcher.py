"""launcher=slurm: the user-facing keys reach Hydra's submitit launcher; mistakes stop before sbatch."""

from __future__ import annotations

import os

import pytest

from otr_cli.cli import main
from otr_cli.config import ConfigError, LauncherConfig, validate_launcher


def flat(text: str) -> str:
    return " ".join(text.split())


def test_launcher_keys_are_passed_to_the_submitit_launcher(capsys):
    main(["train", "--cfg", "all", "--resolve", "launcher=slurm", "launcher.partition=gpu", "launcher.nodes=2",
          "launcher.gpus_per_node=8", "launcher.tasks_per_node=8", "launcher.timeout_min=720",
          "launcher.cpus_per_task=12", "launcher.account=proj42"])
    out = capsys.readouterr().out
    launcher = out[out.index("\n  launcher:"):out.index("\n  sweeper:")]  # the hydra.launcher node
    for line in ("SlurmLauncher", "partition: gpu", "nodes: 2", "gpus_per_node: 8", "tasks_per_node: 8",
                 "timeout_min: 720", "cpus_per_task: 12", "account: proj42", "signal: USR1@120",
                 "export: ALL,SLURM_KILL_BAD_EXIT=1"):
        assert line in launcher, line


def test_gpus_without_as_many_tasks_is_refused_before_anything_is_submitted(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "-m", "launcher=slurm", "launcher.gpus_per_node=8", "loss.beta=0,-0.1",
              f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert exit_info.value.code == 2
    assert "otr trains with one process per GPU, so set launcher.tasks_per_node=8" in flat(capsys.readouterr().err)
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_without_sbatch_the_error_says_where_to_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM client tools here
    with pytest.raises(SystemExit):
        main(["train", "-m", "launcher=slurm", "loss.beta=0,-0.1", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    err = flat(capsys.readouterr().err)
    assert "`sbatch`, which is not on PATH" in err and "launcher=local" in err


@pytest.mark.parametrize("changes, message", [
    ({"signal": "HUP"}, "launcher.signal='HUP' is not one of USR1, USR2, TERM"),
    ({"timeout_min": 2, "signal_delay_s": 120}, "must be shorter than the time limit"),
    ({"name": "pbs"}, "launcher.name='pbs' is not one of local, slurm"),
    ({"nodes": 0}, "launcher.nodes=0 must be > 0"),
    ({"max_requeues": -1}, "launcher.max_requeues=-1 must be >= 0"),
])
def test_bad_launcher_values_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate_launcher(LauncherConfig(**changes))


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(capsys, monkeypatch):
    # `deepspeed --module otr_cli.cli train ...` runs `otr --local_rank=N train ...` in every process.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    main(["--local_rank=0", "train", "dry_run=true"])
    assert "dry run: nothing was loaded or written" in capsys.readouterr().out
    assert os.environ["LOCAL_RANK"] == "0"
