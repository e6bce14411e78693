"""How long each checkpoint save takes, and a warning when it would not fit in SLURM's notice.

On a preemption signal the run saves before it stops (docs/slurm.md). SLURM signals
`launcher.signal_delay_s` seconds before the time limit, and the step in progress must finish
first, so a save that takes more than half of that may be cut off by the kill.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

from otr_cli.atomic import write_json_atomic
from otr_cli.train.checkpoint_size import directory_bytes, format_bytes
from otr_cli.train.distributed import barrier, gather_from_all
from otr_cli.train.trainer_state import otr_state_file

log = logging.getLogger("otr.train")


class WaitClock:
    """The wall-clock seconds (float) this rank spent in barriers: how long it waited for the others."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def barrier(self) -> None:
        started = time.perf_counter()
        barrier()
        self.seconds += time.perf_counter() - started

    def gather(self, value: Any) -> list:
        """distributed.gather_from_all, timed: the save's agreements are where the ranks wait for each other."""
        started = time.perf_counter()
        try:
            return gather_from_all(value)
        finally:
            self.seconds += time.perf_counter() - started


def slow_save_warning(seconds: float, signal_delay_s: float, evaluation_s: float = 0.0) -> Optional[str]:
    """The warning for a save of `seconds`, or None when it fits in half of the signal's notice.

    evaluation_s: the longest an evaluation went without looking for a stop request (seconds); a
    signal that arrives then waits that long before the save starts, so it counts against the notice.
    """
    total = seconds + evaluation_s
    if total <= signal_delay_s / 2:
        return None
    took = f"saving a checkpoint took {seconds:.1f} s,"
    if evaluation_s > 0:
        took = (f"saving a checkpoint took {seconds:.1f} s and an evaluation can go {evaluation_s:.1f} s (an export, "
                f"a model load, one batch or a grading) without seeing a stop signal, {total:.1f} s together,")
    return (f"{took} more than half of launcher.signal_delay_s={signal_delay_s:g}: a save on a preemption signal "
            f"may be killed at the time limit. Raise launcher.signal_delay_s to at least {math.ceil(2 * total)}, or "
            f"make saves faster (a faster file system, LoRA)"
            + (" and evaluation batches shorter (eval.batch_size, eval.max_new_tokens)." if evaluation_s > 0 else "."))


def record_save(checkpoint: Path, seconds: float) -> Optional[int]:
    """Add the save's duration and size to the checkpoint's otr_state.json; returns the size in bytes
    (None: the checkpoint was pruned meanwhile).

    Rank 0 only, after the checkpoint is in place, in the background (walking a checkpoint of
    thousands of files on NFS takes a while): the file is replaced atomically, so a reader sees
    the old or the new metadata and the checkpoint stays complete either way.
    """
    import json

    try:
        size = directory_bytes(checkpoint)
        state_file = otr_state_file(checkpoint)
        state = json.loads(state_file.read_text())
        state.update({"save_time_s": round(seconds, 3), "checkpoint_bytes": size})
        write_json_atomic(state_file, state)
    except FileNotFoundError:
        return None  # pruned by a later save before this ran: nothing left to describe
    log.info("%s: %s as seen from rank 0", checkpoint.name, format_bytes(size))
    return size


def timed_save(save: Callable[[WaitClock], Path], *, step: int, signal_delay_s: float, is_main: bool,
               write_metrics: Callable[[dict], None], sum_over_ranks: Callable[[list[float]], list[float]],
               world_size: int, in_background: Callable[[Callable[[], None]], None],
               evaluation_s: float = 0.0) -> Path:
    """Run `save(wait_clock)` (collective: every rank calls it) and report how long it took on rank 0.

    The time is logged and kept in the checkpoint's otr_state.json; a save that, after
    `evaluation_s` (see slow_save_warning), takes more than half of `signal_delay_s` also writes a
    warning line ({"step", "warning"}) to metrics.jsonl. The log also gives the mean seconds the other ranks waited in the save's barriers (`save` times its barriers
    with the clock), rank 0's work after the save included: GPUs idle while rank 0 works alone.
    Sizing the checkpoint is left to `in_background` (rank 0's background file thread).
    """
    started = time.perf_counter()
    wait_clock = WaitClock()
    checkpoint = save(wait_clock)
    seconds = time.perf_counter() - started
    if is_main:
        in_background(lambda: record_save(checkpoint, seconds))
    wait_clock.barrier()  # counts any work rank 0 did alone above, which the others would wait for anyway
    waited = sum_over_ranks([0.0 if is_main else wait_clock.seconds])[0] / max(world_size - 1, 1)
    if is_main:
        log.info("%s saved in %.1f s; the other ranks waited %.2f s", checkpoint.name, seconds, waited)
        warning = slow_save_warning(seconds, signal_delay_s, evaluation_s)
        if warning:
            log.warning(warning)
            write_metrics({"step": step, "warning": warning})
    return checkpoint
