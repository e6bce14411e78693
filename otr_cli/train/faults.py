"""An error on one rank stops every rank, with that rank's message, instead of a hang.

The rank that fails logs its error with its rank, records it in run_state.json and leaves at
once with ``os._exit``: a normal interpreter exit can block on background threads, and the
other ranks would wait for it in their next collective until the process-group timeout.
Once the process is gone, the other ranks' collectives fail (gloo) or time out
(launcher.dist_timeout_min), and the launcher stops the rest: torchrun stops all workers when
one exits with an error, srun does under SLURM_KILL_BAD_EXIT=1 (set by launcher=slurm).
A single process keeps Python's usual behaviour (the traceback, the exit status).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator, Optional

from otr_cli.atomic import write_json_atomic
from otr_cli.train.checkpoints import RunExistsError

log = logging.getLogger("otr.faults")

FAILED_EXIT = 1


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def record_failure(run_state: Path, rank: int, message: str) -> None:
    """Mark the run failed, naming the rank; the first failing rank's message is kept.

    A finished run stays finished: whatever failed afterwards (say a second command pointed at the
    same directory) did not undo it.
    """
    try:
        if not run_state.parent.is_dir():
            return
        if run_state.is_file() and json.loads(run_state.read_text()).get("status") in ("failed", "finished"):
            return
        write_json_atomic(run_state, {"status": "failed", "rank": rank, "error": message})
    except (OSError, ValueError):
        pass  # reporting the failure must not hide it


@contextlib.contextmanager
def stop_all_ranks_on_error(run_state: Optional[Path], user_errors: tuple[type[BaseException], ...] = ()
                            ) -> Iterator[None]:
    """Around a run: any exception on any rank ends this process now, with the rank in the message.

    `user_errors` are reported as their message alone (no traceback), like a single process does.
    """
    try:
        yield
    except Exception as err:
        rank, world = _world()
        message = f"{type(err).__name__}: {err}"
        # RunExistsError: the directory belongs to another run, which this one must not mark.
        if run_state is not None and not isinstance(err, RunExistsError):
            record_failure(run_state, rank, message)
        if world == 1:
            raise
        # The log format names the rank ("[rank 1] ..."); see otr_cli.app.configure_logging.
        log.error("failed; stopping all %d ranks: %s", world, message)
        if not isinstance(err, user_errors):
            # Straight to stderr, every line tagged: the ranks' output is interleaved in one log.
            lines = traceback.format_exc().rstrip("\n").splitlines()
            sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in lines))
        for stream in (sys.stdout, sys.stderr):  # the hard exit below skips Python's own flushing
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(2 if isinstance(err, user_errors) else FAILED_EXIT)
