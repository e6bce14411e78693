"""The run directory and resume: one `otr train` per directory (train/run_lock.py), a resume on changed data
(train/data_identity.py) and an explicit resume from an older checkpoint of the run (train/abandoned.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, read_jsonl, run_cli, subprocess_env, tiny_overrides, wait_for

from otr_cli.train.run_lock import LOCK_FILE, RunDirectoryInUse, RunLock, read_holder

INJECT = str(REPO / "tests" / "fault_injection.py")


def start_paused(args: list[str], log: Path, step: int, ready: Path, fault: str = "hang",
                 go: Path | None = None) -> subprocess.Popen:
    """`otr ARGS` in one process that stops before optimizer step `step` (creating `ready` once there): for
    good ("hang"), or until `go` exists ("wait")."""
    env = subprocess_env() | {"OTR_FAULT": fault, "OTR_FAULT_RANK": "0", "OTR_FAULT_STEP": str(step),
                              "OTR_FAULT_READY": str(ready), "OTR_FAULT_GO": str(go or "")}
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, INJECT, *args], cwd=REPO, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)



def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def one_line(stderr: str) -> str:
    """The error as one line (the terminal's width wraps it)."""
    return " ".join(stderr[stderr.rfind("error:"):].split())


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: (size, mtime_ns), to tell that nothing was written."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def plant_lock(output_dir: Path, host: str, age_s: float = 0.0, pid: int = 4242, job: str | None = None) -> Path:
    """A lock file as another `otr train` would have left it, refreshed `age_s` seconds ago."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "slurm_job_id": job, "started": "2026-01-01T00:00:00Z",
                                "process_start": None, "boot_id": None, "token": f"planted-{host}-{pid}"}))
    refreshed = time.time() - age_s
    os.utime(path, (refreshed, refreshed))
    return path


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# -- the lock itself (fast: real files, no training) ----------------------------------------------
@pytest.mark.faults
def test_a_fresh_lock_from_another_host_is_not_taken_over(tmp_path):
    plant_lock(tmp_path, host="node-elsewhere", pid=77, job="123")
    with pytest.raises(RunDirectoryInUse) as refused:
        RunLock(tmp_path, stale_after_s=600).acquire()
    message = str(refused.value)
    assert "host node-elsewhere (pid 77, SLURM job 123, started 2026-01-01T00:00:00Z)" in message
    assert f"delete {tmp_path / LOCK_FILE}" in message and "run.lock_stale_min" in message
    assert read_holder(tmp_path / LOCK_FILE).host == "node-elsewhere"  # left as it was


@pytest.mark.faults
def test_a_lock_whose_heartbeat_stopped_is_taken_over(tmp_path):
    plant_lock(tmp_path, host="node-elsewhere", age_s=700)
    lock = RunLock(tmp_path, stale_after_s=600)
    lock.acquire()
    try:
        assert read_holder(tmp_path / LOCK_FILE).token == lock.holder.token
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.faults
def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    plant_lock(tmp_path, host=socket.gethostname(), pid=dead_pid())
    lock = RunLock(tmp_path, stale_after_s=600)
    lock.acquire()
    lock.release()


@pytest.mark.faults
def test_a_slurm_requeue_takes_over_its_own_jobs_lock(tmp_path, monkeypatch):
    plant_lock(tmp_path, host="node-elsewhere", job="4711")
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    lock = RunLock(tmp_path, stale_after_s=600)
    lock.acquire()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "4712")  # another job: the fresh lock holds
    plant_lock(tmp_path, host="node-elsewhere", job="4711")
    with pytest.raises(RunDirectoryInUse):
        RunLock(tmp_path, stale_after_s=600).acquire()


@pytest.mark.faults
def test_the_holder_refreshes_its_lock(tmp_path):
    lock = RunLock(tmp_path, stale_after_s=0.4)  # refreshed every 0.1 s
    lock.acquire()
    try:
        os.utime(tmp_path / LOCK_FILE, (0, 0))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 0.4
        with pytest.raises(RunDirectoryInUse):  # alive on this host: held, whatever its age
            RunLock(tmp_path, stale_after_s=0.4).acquire()
    finally:
        lock.release()


def test_run_lock_stale_min_must_be_positive():
    from otr_cli.config import TrainConfig, validate
    from otr_cli.errors import UserError

    cfg = TrainConfig()
    cfg.run.lock_stale_min = 0
    with pytest.raises(UserError, match=r"run\.lock_stale_min"):
        validate(cfg)


# -- `otr train` ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.faults
def test_a_second_otr_train_on_a_directory_in_use_is_refused_and_the_first_finishes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, "trainer.max_steps=4", "trainer.save_steps=1")]
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = start_paused(args, tmp_path / "first.log", step=2, ready=ready, fault="wait", go=go)
    try:
        wait_for(ready, first, tmp_path / "first.log")  # step 1 trained and saved, holding the directory
        before = snapshot(out)
        second = run_cli(args, check=False)
        assert second.returncode == 2, second.stdout + second.stderr
        error = one_line(second.stderr)
        assert f"is in use by `otr train` on host {socket.gethostname()} (pid {first.pid}, started " in error
        assert snapshot(out) == before  # the second wrote nothing
        go.touch()
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            kill_9(first)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    assert not (out / LOCK_FILE).exists()  # released at the end


@pytest.mark.slow
@pytest.mark.faults
def test_a_fresh_lock_from_another_host_refuses_otr_train_before_it_writes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    plant_lock(out, host="node-elsewhere")
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, out)], check=False)
    assert result.returncode == 2 and "in use by `otr train` on host node-elsewhere" in one_line(result.stderr)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no config.yaml, no checkpoints/, no run_state


def write_records(path: Path, count: int = 48, edited: int | None = None) -> None:
    lines = []
    for i in range(count):
        answer = f"{i + 7}" if i != edited else f"{i + 7} (edited)"
        lines.append(json.dumps({"question": f"What is {i} + 7?", "answer": answer}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.faults
def test_a_resume_on_edited_training_data_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    """Also: the killed run's lock (its pid dead, on this host) does not block the resume."""
    data = tmp_path / "train.jsonl"
    write_records(data)
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, f"data.source={data}", "data.synthetic.num_validation=0",
                                     "trainer.max_steps=4", "trainer.save_steps=1")]
    ready = tmp_path / "ready"
    first = start_paused(args, tmp_path / "first.log", step=3, ready=ready)
    try:
        wait_for(ready, first, tmp_path / "first.log")
    finally:
        kill_9(first)
    assert read_holder(out / LOCK_FILE).pid == first.pid  # left behind by kill -9
    write_records(data, edited=5)
    before = snapshot(out)
    refused = run_cli(args, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    error = one_line(refused.stderr)
    assert "training data differ" in error and str(data) in error and "resume_with_changed_data=true" in error
    # The run's files as they were; run_state.json says why the resume failed, as for any refused resume.
    unchanged = {LOCK_FILE, "run_state.json"}
    assert {k: v for k, v in snapshot(out).items() if k not in unchanged} == {
        k: v for k, v in before.items() if k not in unchanged}
    assert "training data differ" in json.loads((out / "run_state.json").read_text())["error"]

    run_cli([*args, "trainer.resume_with_changed_data=true"])
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    recorded = [r for r in records if r.get("resumed_with_changed_data")]
    assert len(recorded) == 1 and recorded[0]["step"] == 2 and str(data) in recorded[0]["warning"]
    saved = json.loads((out / "checkpoints" / "checkpoint-4" / "otr_state.json").read_text())["data_fingerprint"]
    assert saved["source"] == str(data) and saved["examples"] == 48
    assert "warnings" in json.loads((out / "summary.json").read_text())


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.faults
def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, "trainer.max_steps=6", "trainer.save_steps=1",
                                     "trainer.save_total_limit=10")]
    checkpoints = out / "checkpoints"
    first = start_paused(args, tmp_path / "first.log", step=5, ready=tmp_path / "ready1")
    try:
        wait_for(tmp_path / "ready1", first, tmp_path / "first.log")  # step-4 saved, hung in step 5
    finally:
        kill_9(first)
    old = {step: file_digest(checkpoints / f"checkpoint-{step}" / "model.safetensors") for step in (3, 4)}

    # The new branch from step 2 with another objective (say the old one diverged), killed in its step 4
    # (after its step-3 was saved).
    branch = [*args, "loss=dft"]
    second = start_paused([*branch, f"trainer.resume={checkpoints / 'checkpoint-2'}"], tmp_path / "second.log", step=4,
                          ready=tmp_path / "ready2")
    try:
        wait_for(tmp_path / "ready2", second, tmp_path / "second.log")
    finally:
        kill_9(second)
    abandoned = list(checkpoints.glob("abandoned-*"))
    assert len(abandoned) == 1, sorted(p.name for p in checkpoints.iterdir())
    assert {p.name for p in abandoned[0].iterdir()} == {"checkpoint-3", "checkpoint-4"}
    assert {step: file_digest(abandoned[0] / f"checkpoint-{step}" / "model.safetensors") for step in (3, 4)} == old
    assert "moved checkpoints/checkpoint-3, checkpoints/checkpoint-4 to" in " ".join((tmp_path / "second.log").read_text().split())
    new_3 = file_digest(checkpoints / "checkpoint-3" / "model.safetensors")
    assert new_3 != old[3] and not (checkpoints / "checkpoint-4").exists()

    # resume=auto after that kill continues the new branch (step-3), not the abandoned one's step-4.
    resumed = run_cli(branch)
    output = resumed.stdout + resumed.stderr
    assert "at step 3" in " ".join(output[output.index("Resumed from"):].split())[:400]
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in range(1, 7)]
    assert file_digest(checkpoints / "checkpoint-3" / "model.safetensors") == new_3  # kept, not replaced
    assert file_digest(checkpoints / "checkpoint-4" / "model.safetensors") != old[4]
    assert file_digest(out / "final" / "model.safetensors") == file_digest(checkpoints / "checkpoint-6" / "model.safetensors")
    trained = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    assert [r["objective"] for r in trained] == ["otr"] * 2 + ["dft"] * 4  # the default objective, then the branch's
    assert {p.name for p in abandoned[0].iterdir()} == {"checkpoint-3", "checkpoint-4"}  # never deleted


@pytest.mark.slow
@pytest.mark.faults
def test_every_rank_of_a_refused_run_exits_with_rank_0s_verdict(tiny_model_dir, tmp_path):
    """Rank 0 alone looks at the lock; the other ranks hear its verdict and exit with it, none waits."""
    from ranks import start_ranks, wait_all

    out = tmp_path / "run"
    plant_lock(out, host="node-elsewhere")
    processes = start_ranks(["train", *tiny_overrides(tiny_model_dir, out)], tmp_path)
    codes = wait_all(processes, 300)
    for process in processes:
        if process.poll() is None:
            kill_9(process)
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [2, 2], logs
    assert all("in use by `otr train` on host node-elsewhere" in " ".join(log.split()) for log in logs)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
