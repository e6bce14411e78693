"""File work that no rank should wait for: deleting pruned checkpoints, sizing saved ones.

Rank 0 hands such jobs to one worker thread, which runs them in the order given while training
goes on (deleting 130 GB of optimizer states on NFS takes minutes; the other ranks would wait in
their next collective). A directory to delete is first renamed into a hidden ``.trash-*`` sibling
(atomic, instant), so a half-deleted directory never looks like a checkpoint; a process killed
while deleting leaves only ``.trash-*`` directories, which the next run in the same directory
removes (RunDirectory.prepare).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("otr.train")

TRASH_PREFIX = ".trash-"


class BackgroundFiles:
    """A worker thread running file jobs in the order given; it runs while there are jobs and is
    started again by the next one.

    The thread is not a daemon: a run that ends normally (finished, preempted) finishes its
    deletions before the interpreter exits, and an idle thread never holds the exit up. A job that
    fails is logged and skipped (what it works on is expendable).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._lock = threading.Lock()  # a job is never left behind by a thread deciding to stop
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="otr-background-files", daemon=False)
                self._thread.start()

    def wait(self) -> None:
        """Block until every job submitted so far has run."""
        self._jobs.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._jobs.empty():
                    self._thread = None
                    return
                job = self._jobs.get_nowait()
            try:
                job()
            except Exception as err:  # noqa: BLE001 - a failed clean-up must not stop training
                log.warning("background file job failed: %s: %s", type(err).__name__, err)
            finally:
                self._jobs.task_done()

    def discard(self, path: Path) -> None:
        """Rename `path` (a directory) into a hidden trash sibling now, and delete it in the background."""
        trash = move_to_trash(path)
        self.submit(lambda: shutil.rmtree(trash, ignore_errors=True))


def move_to_trash(path: Path) -> Path:
    """Rename `path` to a unique ``.trash-<name>-<ns>`` in the same directory (atomic); returns the new path."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{time.time_ns()}"
    os.replace(path, trash)
    return trash


def trash_in(directory: Path) -> list[Path]:
    """The trash directories left in `directory` (by a process killed while deleting)."""
    if not directory.is_dir():
        return []
    return [child for child in directory.iterdir() if child.name.startswith(TRASH_PREFIX)]
