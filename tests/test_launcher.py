"""launcher=slurm: the user-facing keys reach Hydra's submitit launcher; mistakes stop before sbatch."""

from __future__ import annotations

import os

import pytest

from otr_cli.cli import main
from otr_cli.config import ConfigError, LauncherConfig, validate_launcher
from otr_cli.sweep.slurm_request import parse_sinfo_cpus, request_rows, resolve_request


def flat(text: str) -> str:
    return " ".join(text.split())


def test_launcher_keys_are_passed_to_the_submitit_launcher(capsys):
    main(["train", "--cfg", "all", "--resolve", "launcher=slurm", "launcher.partition=gpu", "launcher.nodes=2",
          "launcher.gpus_per_node=8", "launcher.tasks_per_node=8", "launcher.timeout_min=720",
          "launcher.cpus_per_task=12", "launcher.account=proj42", "recipe=smollm2_demo"])
    out = capsys.readouterr().out
    launcher = out[out.index("\n  launcher:"):out.index("\n  sweeper:")]  # the hydra.launcher node
    for line in ("SlurmLauncher", "partition: gpu", "nodes: 2", "gpus_per_node: 8", "tasks_per_node: 8",
                 "timeout_min: 720", "cpus_per_task: 12", "account: proj42", "signal: USR1@120",
                 "export: ALL,SLURM_KILL_BAD_EXIT=1"):
        assert line in launcher, line


def test_gpus_without_as_many_tasks_is_refused_before_anything_is_submitted(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "-m", "recipe=smollm2_demo", "launcher=slurm", "launcher.gpus_per_node=8", "loss.beta=0,-0.1",
              f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert exit_info.value.code == 2
    assert "otr trains with one process per GPU, so set launcher.tasks_per_node=8" in flat(capsys.readouterr().err)
    assert not (tmp_path / "sweep" / ".submitit").exists()


def test_without_sbatch_the_error_says_where_to_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM client tools here
    with pytest.raises(SystemExit):
        main(["train", "-m", "recipe=smollm2_demo", "launcher=slurm", "loss.beta=0,-0.1", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
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
    main(["--local_rank=0", "train", "recipe=smollm2_demo", "dry_run=true"])
    assert "dry run: nothing was loaded or written" in capsys.readouterr().out
    assert os.environ["LOCAL_RANK"] == "0"


def fake_slurm(tmp_path, sinfo_output: str):
    """sinfo printing `sinfo_output`; sbatch keeping the script it was given and refusing it (nothing runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\nprintf '{sinfo_output}'\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\nfor last; do :; done\ncp \"$last\" {tmp_path}/submitted.sh\n"
                                    "echo 'sbatch: error: a test cluster submits nothing' >&2\nexit 1\n")
    for tool in ("sinfo", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def submit(tmp_path, monkeypatch, capsys, *launcher_keys: str) -> tuple[str, str]:
    """`otr train -m ... launcher=slurm` against fake SLURM tools: (what it printed, the sbatch script)."""
    bin_dir = fake_slurm(tmp_path, "cpu 8\\ngpu* 96+\\n")  # printf's escapes: two partitions, gpu the default
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(BaseException):  # sbatch refused the job
        main(["train", "-m", "recipe=smollm2_demo", "launcher=slurm", *launcher_keys, "loss.beta=0,-0.1",
              f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    return capsys.readouterr().out, (tmp_path / "submitted.sh").read_text()


def test_a_gpu_sweep_asks_for_all_node_memory_and_a_share_of_the_cpus(tmp_path, monkeypatch, capsys):
    out, script = submit(tmp_path, monkeypatch, capsys, "launcher.gpus_per_node=8", "launcher.tasks_per_node=8",
                         "launcher.nodes=2", "launcher.timeout_min=720")
    assert "#SBATCH --mem=0GB" in script  # SLURM: 0 = all of the node's memory
    assert "#SBATCH --cpus-per-task=12" in script  # 96 CPUs (the default partition's smallest node) / 8 tasks
    assert "#SBATCH --gpus-per-node=8" in script
    printed = flat(out)
    for text in ("SLURM request of each sweep point", "nodes │ 2", "8 per node, 16 in all", "12 per task, 96 per node",
                 "all of each node's (--mem=0)", "12:00:00 (720 min)", "the cluster's default"):
        assert text in printed, text
    assert printed.index("SLURM request") < printed.index("sweep directory")


def test_explicit_memory_and_cpus_are_kept(tmp_path, monkeypatch, capsys):
    out, script = submit(tmp_path, monkeypatch, capsys, "launcher.gpus_per_node=4", "launcher.tasks_per_node=4",
                         "launcher.mem_gb=400", "launcher.cpus_per_task=6", "launcher.partition=cpu")
    assert "#SBATCH --mem=400GB" in script and "#SBATCH --cpus-per-task=6" in script
    assert "400 GB per node" in flat(out) and "partition │ cpu" in flat(out)


def test_a_cpu_only_sweep_keeps_slurms_memory_and_cpu_defaults(tmp_path, monkeypatch, capsys):
    out, script = submit(tmp_path, monkeypatch, capsys, "launcher.tasks_per_node=2")
    assert "--mem" not in script and "--cpus-per-task" not in script
    assert "GPUs │ none" in flat(out) and "memory │ SLURM's default" in flat(out)


@pytest.mark.parametrize("text, partition, cpus", [
    ("debug* 2\n", None, 2),
    ("cpu 8\ngpu* 96+\n", None, 96),  # the default partition; '+': some nodes have more
    ("cpu 8\ngpu* 96\ngpu* 64\n", "gpu", 64),  # nodes differ: the smallest, so every task fits
    ("a 8\nb 16\nc* 4\n", "a,b", 8),
    ("cpu 8\n", "gpu", None),
    ("", None, None),
])
def test_cpus_per_node_are_read_from_sinfo(text, partition, cpus):
    assert parse_sinfo_cpus(text, partition) == cpus


def test_without_sinfo_a_gpu_point_says_cpus_are_slurms_default():
    request = resolve_request({"gpus_per_node": 8, "tasks_per_node": 8, "timeout_min": 60}, node_cpus=lambda _: None)
    assert request.cpus_per_task is None and request.mem_gb == 0
    assert "set launcher.cpus_per_task" in dict(request_rows(request))["CPUs"]


def test_memory_per_cpu_or_gpu_set_through_hydra_launcher_is_not_overridden():
    request = resolve_request({"gpus_per_node": 8, "tasks_per_node": 8, "timeout_min": 60, "mem_per_gpu": "80G",
                               "cpus_per_gpu": 10}, node_cpus=lambda _: 96)
    assert request.mem_gb is None and request.cpus_per_task is None
