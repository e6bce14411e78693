"""A checkpoint write that failed on some rank: what every rank reports, and whether the disk was full.

A rank whose write fails must not leave the others waiting for it in a barrier (a hang until the
collective timeout at scale): RunDirectory.save_checkpoint gathers each rank's `WriteFailure` (None:
its writes succeeded) and every rank raises the same error. A full disk is the user's to fix (exit 2)
and is reported with the path, what the save needed and what was free; anything else is a failure
of its own (exit 1) naming the rank and its error.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from otr_cli.errors import UserError
from otr_cli.train.checkpoint_size import format_bytes

# What a full disk (or quota) looks like from Python's writes and from torch.save's C++ writer, which
# reports it without an errno: "[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200",
# "PytorchStreamWriter failed writing file data/0: file write failed".
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
TORCH_WRITER_TEXTS = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
# torch's writer failing while this little is free: the disk filled (its partial file took the rest).
NEARLY_FULL_BYTES = 256 << 20


class DiskFullError(UserError, RuntimeError):
    """A checkpoint could not be written because its file system is full; the earlier ones are intact."""


class CheckpointWriteError(RuntimeError):
    """A rank failed to write its part of a checkpoint for another reason than a full disk."""


@dataclass(frozen=True)
class WriteFailure:
    """One rank's failed write, as the other ranks hear of it (picklable)."""

    rank: int
    error: str  # "TypeName: first line of the message"
    disk_full: bool


def free_bytes(directory: Path) -> Optional[int]:
    """Bytes free to this user on `directory`'s file system (None: not measurable)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def is_disk_full(err: BaseException, directory: Path) -> bool:
    """Whether `err` (or an error it was raised from) is a write refused for lack of space."""
    seen = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        text = str(current)
        if any(marker in text for marker in DISK_FULL_TEXTS):
            return True
        if any(marker in text for marker in TORCH_WRITER_TEXTS):
            free = free_bytes(directory)
            if free is not None and free < NEARLY_FULL_BYTES:
                return True
        current = current.__cause__ or current.__context__
    return False


def drop_tracebacks(err: BaseException) -> None:
    """Forget the frames of `err` and of every error it was raised from (their locals: open files)."""
    seen = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def describe(err: BaseException, rank: int, directory: Path) -> WriteFailure:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return WriteFailure(rank, f"{type(err).__name__}: {first_line}", is_disk_full(err, directory))


def agreed_error(failures: list[WriteFailure], *, checkpoint: str, directory: Path, needed: Optional[tuple[int, str]],
                 free_at_start: Optional[int], previous: Optional[str]) -> Exception:
    """The one error every rank raises for a save that failed on the ranks of `failures` (in rank order).

    needed: (bytes, where that figure comes from) of one checkpoint; free_at_start: bytes free on
    `directory`'s file system when the save began; previous: the newest checkpoint, which stays intact.
    """
    first = failures[0]
    ranks = ", ".join(str(f.rank) for f in failures)
    if any(f.disk_full for f in failures):
        full = next(f for f in failures if f.disk_full)
        need = f"about {format_bytes(needed[0])} ({needed[1]})" if needed else "an unknown amount"
        free = format_bytes(free_at_start) if free_at_start is not None else "an unknown amount"
        resume = (f"it resumes from {previous}, which is intact" if previous
                  else "no earlier checkpoint exists, so it starts from step 0")
        return DiskFullError(
            f"{checkpoint} was not saved: the file system of {directory} is full (rank {full.rank}: "
            f"{full.error}). One checkpoint needs {need} and {free} was free when the save began; the partial "
            f"checkpoint was removed. Free space there (delete old checkpoints, or lower trainer.save_total_limit: "
            f"the next checkpoint is written before the oldest is deleted), or move run.output_dir to a larger disk, "
            f"and run the same command again: {resume}.")
    return CheckpointWriteError(f"{checkpoint} was not saved: writing it failed on rank(s) {ranks} "
                                f"(rank {first.rank}: {first.error}); the partial checkpoint was removed")


def save_deepspeed_state(ds_engine, directory: Path, tag: str) -> None:
    """`ds_engine.save_checkpoint(directory, tag)`, leaving no rank alone in DeepSpeed's last barrier.

    DeepSpeed's save makes its collectives (a barrier, the tag check) before it writes anything and
    ends with a barrier. A rank whose write fails raises before that last barrier while the others wait
    in it: the failing rank joins it before raising, so every rank reaches the agreement that follows.
    """
    import torch.distributed as dist

    try:
        ds_engine.save_checkpoint(str(directory), tag=tag)
    except Exception as err:
        # A failed collective (a rank gone, a timeout) is not a write that failed: no barrier to join.
        if dist.is_initialized() and dist.get_world_size() > 1 and not isinstance(err, dist.DistError):
            dist.barrier()
        raise
