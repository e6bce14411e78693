"""The disk fills during a checkpoint save: one line saying so, every rank stops alike, earlier checkpoints intact.

The runs write into a small tmpfs mounted by the test (root only; skipped elsewhere): the first
checkpoint fits, the second does not.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import read_jsonl, run_cli, tiny_overrides
from otr_cli.train.checkpoints import RunDirectory
from otr_cli.train.distributed import DistInfo
from otr_cli.train.manifest import verify_checkpoint
from otr_cli.train.save_failure import DiskFullError

# The tiny model's checkpoint is ~29 MB: one fits in 45 MB, two do not.
DISK = "45m"
ROOMY = "200m"
RUN = ["loss=sft", "trainer.max_steps=4", "trainer.save_steps=2", "trainer.micro_batch_size=2"]


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps the error line at the terminal's width


@pytest.fixture
def small_disk(tmp_path):
    """A `DISK`-sized tmpfs at tmp_path/disk; `small_disk.resize(size)` frees space as a user would."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    class Disk:
        path = disk

        @staticmethod
        def resize(size: str) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield Disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def intact(checkpoint: Path) -> list[str] | None:
    """What verification finds wrong with `checkpoint` (in this process, as one rank)."""
    return verify_checkpoint(checkpoint, 0, 1, lambda decide: decide(), lambda value: [value])


def squeezed(text: str) -> str:
    return "".join(text.split())  # rich wraps a long line anywhere, even inside a path


def assert_disk_full_message(text: str, out: Path) -> None:
    for fragment in (f"checkpoint-4 was not saved: the file system of {out / 'checkpoints'} is full",
                     "One checkpoint needs about", "(the size of checkpoint-2) and", "was free when the save began",
                     "it resumes from checkpoint-2, which is intact"):
        assert squeezed(fragment) in squeezed(text), (fragment, flat(text)[-2000:])


def assert_only_step_2_is_left(out: Path) -> None:
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # .tmp-checkpoint-4 removed
    assert intact(out / "checkpoints" / "checkpoint-2") == []  # every byte as its manifest recorded at the save


@pytest.mark.slow
@pytest.mark.faults
def test_a_full_disk_during_a_save_stops_with_one_line_and_the_run_resumes_once_space_is_freed(
        tiny_model_dir, small_disk):
    out = small_disk.path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *RUN)]
    result = run_cli(args, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and flat(result.stderr).count("error:") == 1, result.stderr[-3000:]
    assert_disk_full_message(result.stderr, out)
    assert_only_step_2_is_left(out)
    assert json.loads((out / "run_state.json").read_text())["status"] == "failed"

    small_disk.resize(ROOMY)
    resumed = run_cli(args)
    assert "Resumed from" in resumed.stderr + resumed.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"


@pytest.mark.slow
@pytest.mark.faults
def test_a_full_disk_during_a_save_on_two_ranks_stops_both_alike_instead_of_hanging(tiny_model_dir, small_disk):
    """Before, the rank whose write failed went to the clean-up while the other waited in the barrier after
    the writes: a hang until launcher.dist_timeout_min."""
    from ranks import start_ranks, wait_all

    out = small_disk.path / "run"
    # ZeRO-2: both ranks write optimizer shards, so either may be the one the disk refuses.
    args = ["train", *tiny_overrides(tiny_model_dir, out, *RUN, "deepspeed=zero2", "launcher.dist_timeout_min=2")]
    logs = out.parent.parent / "logs"
    logs.mkdir()
    processes = start_ranks(args, logs)
    try:
        codes = wait_all(processes, timeout=400)
    finally:
        for process in processes:
            process.kill()
    texts = [(logs / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [2, 2], (codes, [t[-3000:] for t in texts])
    for text in texts:
        assert "DiskFullError" in text
        assert_disk_full_message(text, out)
    assert_only_step_2_is_left(out)

    small_disk.resize(ROOMY)
    (logs / "resumed").mkdir()
    processes = start_ranks(args, logs / "resumed")
    try:
        codes = wait_all(processes, timeout=400)
    finally:
        for process in processes:
            process.kill()
    assert codes == [0, 0], (logs / "resumed" / "rank0.log").read_text()[-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.faults
def test_a_write_refused_for_lack_of_space_removes_the_partial_checkpoint_and_names_the_need(tmp_path):
    """ENOSPC from any write of a save (here the export stage): one DiskFullError, the earlier checkpoint as it was."""
    run_dir = RunDirectory(tmp_path / "run", DistInfo(rank=0, world_size=1, local_rank=0))
    run_dir.prepare(overwrite=False)

    def write(step: int):
        def write_state(directory: Path) -> None:
            (directory / "ds").mkdir()
            (directory / "ds" / "optimizer.pt").write_bytes(b"o" * 5000)
            (directory / "trainer_state.json").write_text(json.dumps({"step": step}))
        return write_state

    def full(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"m" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "model.safetensors"))

    run_dir.save_checkpoint(2, write(2), limit=None)
    before = {p: p.read_bytes() for p in (run_dir.checkpoints / "checkpoint-2").rglob("*") if p.is_file()}
    with pytest.raises(DiskFullError) as raised:
        run_dir.save_checkpoint(4, [write(4), full], limit=1)
    message = str(raised.value)
    assert "\n" not in message
    assert "checkpoint-4 was not saved: the file system of" in message and "No space left on device" in message
    assert "One checkpoint needs about 5" in message and "(the size of checkpoint-2)" in message, message
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == ["checkpoint-2"]
    assert {p: p.read_bytes() for p in (run_dir.checkpoints / "checkpoint-2").rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.faults
def test_a_write_refused_on_one_rank_only_stops_both_ranks_with_the_same_one_line_error(tiny_model_dir, tmp_path):
    """Only rank 1's writes are refused (a quota, a full node-local disk): before, rank 1 raised torch's error
    while rank 0 waited in DeepSpeed's barrier, and rank 0 died of the lost connection (gloo) or hung (NCCL)."""
    from helpers import REPO
    from ranks import start_ranks, wait_all

    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *RUN, "deepspeed=zero2", "launcher.dist_timeout_min=2")]
    processes = start_ranks(args, tmp_path, extra_env={"OTR_FAULT_RANK": "1", "OTR_FAULT_STEP": "4"},
                            script=str(REPO / "tests" / "disk_full_injection.py"))
    try:
        codes = wait_all(processes, timeout=400)
    finally:
        for process in processes:
            process.kill()
    texts = [(tmp_path / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [2, 2], (codes, [t[-3000:] for t in texts])
    for text in texts:
        assert_disk_full_message(text, out)
        assert squeezed("is full (rank 1: OSError: [Errno 28] No space left on device") in squeezed(text)
    assert_only_step_2_is_left(out)


@pytest.mark.faults
def test_a_write_failing_for_another_reason_removes_the_partial_checkpoint_and_names_the_rank(tmp_path):
    from otr_cli.train.save_failure import CheckpointWriteError

    run_dir = RunDirectory(tmp_path / "run", DistInfo(rank=0, world_size=1, local_rank=0))
    run_dir.prepare(overwrite=False)

    def refused(directory: Path) -> None:
        (directory / "ds").mkdir()
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory / "ds" / "optimizer.pt"))

    with pytest.raises(CheckpointWriteError, match=r"checkpoint-2 was not saved: writing it failed on rank\(s\) 0 "
                                                   r"\(rank 0: PermissionError: \[Errno 13\] Permission denied"):
        run_dir.save_checkpoint(2, refused, limit=None)
    assert list(run_dir.checkpoints.iterdir()) == []


@pytest.mark.slow
@pytest.mark.faults
def test_a_full_disk_during_the_export_of_a_save_is_reported_alike(tiny_model_dir, small_disk):
    """Room for the second checkpoint's DeepSpeed files (~19 MB) but not for its export (model.safetensors,
    ~6 MB, written by rank 0 after them)."""
    small_disk.resize("51m")
    out = small_disk.path / "run"
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, out, *RUN)], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_disk_full_message(result.stderr, out)
    assert squeezed("(rank 0: SafetensorError: Error while serializing: I/O error: No space left on device") in squeezed(
        result.stderr), result.stderr[-3000:]
    assert_only_step_2_is_left(out)
