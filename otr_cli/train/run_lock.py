"""One `otr train` per output directory: a lock file that rank 0 takes before anything is written.

Two runs writing one directory (a job submitted twice, a requeue racing a manual rerun) write the same
temporary checkpoints and delete each other's files. The lock is ``<output_dir>/.otr-lock``, a JSON record
of its holder (host, pid, SLURM job id, start time); its mtime is the holder's heartbeat, refreshed by a
daemon thread every ``heartbeat_interval_s(stale_after_s)`` seconds.

A lock is taken over (the holder is gone) when:

- it was written on this host and its pid is gone (or is a zombie, or is another process that reused the
  pid: the start time in /proc differs);
- it names this process's SLURM job id: a requeue of that job, whose earlier run is dead;
- its heartbeat is older than ``stale_after_s`` (``run.lock_stale_min``): its host stopped refreshing it.

Acquisition is atomic on local and NFS (v3 and later) file systems: the record is written to a file of its
own and hard-linked to the lock's name (``link`` fails when the name exists, and on NFS a link whose reply
was lost is recognised by the link count); where hard links are refused, ``O_CREAT | O_EXCL``. A stale
lock is renamed away before a new one is made, so of two processes taking over one stale lock, one wins.
The heartbeat compares the lock's mtime (set by the file server on NFS) with this host's clock: hosts whose
clocks differ by more than a few seconds should use a ``run.lock_stale_min`` well above the difference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from otr_cli.train.checkpoints import RunExistsError

log = logging.getLogger("otr.train")

LOCK_FILE = ".otr-lock"


class RunDirectoryInUse(RunExistsError):
    """Another live `otr train` holds the output directory (never marks that run failed: faults.py)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory: enough for a person to find the process, and for otr to tell it is gone."""

    host: str
    pid: int
    slurm_job_id: Optional[str]
    started: str  # UTC, ISO 8601, for people
    process_start: Optional[str]  # /proc/<pid>/stat field 22 (clock ticks after boot): tells a reused pid
    boot_id: Optional[str]  # this host's boot, so a pid of an earlier boot is not taken for a live one
    token: str  # unique per acquisition: releasing removes only our own lock

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host} (pid {self.pid}{job}, started {self.started})"


def _read_text(path: str) -> Optional[str]:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks after boot (Linux); None where /proc has no answer."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _boot_id() -> Optional[str]:
    text = _read_text("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def this_process() -> LockHolder:
    pid = os.getpid()
    return LockHolder(host=socket.gethostname(), pid=pid, slurm_job_id=os.environ.get("SLURM_JOB_ID") or None,
                      started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), process_start=_process_start(pid),
                      boot_id=_boot_id(), token=uuid.uuid4().hex)


def _alive_here(holder: LockHolder) -> bool:
    """Whether the holder's process (recorded on this host) still runs."""
    if holder.boot_id and _boot_id() and holder.boot_id != _boot_id():
        return False  # the host was rebooted since
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    stat = _read_text(f"/proc/{holder.pid}/stat")
    if stat is not None:
        state = stat[stat.rfind(")") + 2:].split()[:1]
        if state == ["Z"]:
            return False  # killed, not yet reaped by its parent
        if holder.process_start and _process_start(holder.pid) != holder.process_start:
            return False  # the pid was reused by another process
    return True


def heartbeat_interval_s(stale_after_s: float) -> float:
    """How often the holder refreshes the lock: several times per staleness period, at most once a minute."""
    return max(0.05, min(60.0, stale_after_s / 4))


def read_holder(path: Path) -> Optional[LockHolder]:
    """The holder recorded in a lock file; None when it cannot be read or is not a lock record."""
    try:
        record = json.loads(path.read_text())
        return LockHolder(**record)
    except (OSError, ValueError, TypeError):
        return None


def stale_reason(path: Path, holder: Optional[LockHolder], stale_after_s: float) -> Optional[str]:
    """Why the lock at `path` (holding `holder`) belongs to a process that is gone; None when it may be alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    me = this_process()
    if holder is not None and holder.host == me.host:
        # On this host the process table answers; a live holder holds, whatever its heartbeat.
        return None if _alive_here(holder) else f"its process {holder.pid} on this host has ended"
    if holder is not None and holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return f"it belongs to an earlier run of this SLURM job ({holder.slurm_job_id}): requeued"
    if age > stale_after_s:
        return f"it was last refreshed {age / 60:.1f} minutes ago (run.lock_stale_min={stale_after_s / 60:g})"
    return None


class RunLock:
    """The lock of one output directory, held by this process from ``acquire`` to ``release``."""

    def __init__(self, output_dir: Path, stale_after_s: float):
        self.path = Path(output_dir) / LOCK_FILE
        self.stale_after_s = stale_after_s
        self.holder = this_process()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- taking it ---------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock (creating the output directory), or raise RunDirectoryInUse naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a stale lock is moved away, then the creation is tried again
            if self._create():
                self._start_heartbeat()
                return
            holder = read_holder(self.path)
            if holder is None and self._young_unreadable():
                time.sleep(0.2)  # a holder between creating the file and writing it: read it again
                continue
            reason = stale_reason(self.path, holder, self.stale_after_s)
            if reason is None:
                raise self._in_use(holder)
            if self._move_stale_away(holder):
                log.warning("%s: took over the lock of %s: %s", self.path.parent,
                            holder.describe() if holder else "an unreadable holder", reason)
        holder = read_holder(self.path)
        raise self._in_use(holder)

    def _young_unreadable(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < 5.0
        except FileNotFoundError:
            return False

    def _create(self) -> bool:
        """Create the lock with our record, atomically; False when it exists."""
        record = json.dumps(asdict(self.holder), indent=1)
        private = self.path.with_name(f"{LOCK_FILE}.{self.holder.host}.{self.holder.pid}.{self.holder.token[:8]}")
        private.write_text(record)
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            # On NFS a link whose reply was lost reports an error although it was made: two names, ours.
            return private.stat().st_nlink == 2
        except OSError:
            return self._create_exclusive(record)
        finally:
            with contextlib.suppress(OSError):
                private.unlink()

    def _create_exclusive(self, record: str) -> bool:
        """Where hard links are refused: O_CREAT | O_EXCL (atomic on NFS v3 and later)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(record)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _move_stale_away(self, holder: Optional[LockHolder]) -> bool:
        """Rename the stale lock to a name of our own (one contender's rename wins); True if we moved the one
        we judged stale. A lock someone else made in between is put back."""
        moved = self.path.with_name(f"{LOCK_FILE}.stale.{self.holder.token}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False  # another contender moved it first
        taken = read_holder(moved)
        if holder is not None and (taken is None or taken.token != holder.token):
            with contextlib.suppress(OSError):
                os.link(moved, self.path)  # fails if yet another lock appeared: that one stands
            with contextlib.suppress(OSError):
                moved.unlink()
            return False
        with contextlib.suppress(OSError):
            moved.unlink()
        return True

    def _in_use(self, holder: Optional[LockHolder]) -> RunDirectoryInUse:
        try:
            age = f"; its lock was refreshed {time.time() - self.path.stat().st_mtime:.0f} s ago"
        except FileNotFoundError:
            age = ""
        who = holder.describe() if holder else "another process (its lock file cannot be read)"
        return RunDirectoryInUse(
            f"{self.path.parent} is in use by `otr train` on {who}{age}. Two runs writing one directory overwrite "
            f"each other's checkpoints: wait for that run to end, or choose another run.output_dir. If that "
            f"process is gone (its node died), delete {self.path} to take over now; otr takes over by itself "
            f"once the lock goes {self.stale_after_s / 60:g} minutes without a refresh (run.lock_stale_min).")

    # -- holding it --------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        interval = heartbeat_interval_s(self.stale_after_s)

        def beat() -> None:
            warned = False
            while not self._stop.wait(interval):
                current = read_holder(self.path)
                if current is None or current.token != self.holder.token:
                    if not warned:
                        log.error("%s: this run's lock was taken over by %s; two runs may now write this directory",
                                  self.path.parent, current.describe() if current else "nobody")
                        warned = True
                    continue
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="otr-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@contextlib.contextmanager
def holding_run_directory(output_dir: Path, stale_after_s: float, is_main: bool):
    """Around a whole run: rank 0 takes the lock (the verdict reaches every rank through `decide_on_main`, so
    all ranks of a refused run exit together) and releases it at the end, on an error or on preemption."""
    from otr_cli.train.distributed import decide_on_main

    lock = RunLock(output_dir, stale_after_s) if is_main else None
    decide_on_main(lambda: lock.acquire() if lock is not None else None)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
