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
from typing import Callable, Optional

from otr_cli.atomic import write_json_atomic
from otr_cli.train.checkpoint_size import directory_bytes, format_bytes

log = logging.getLogger("otr.train")


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


def record_save(checkpoint: Path, seconds: float) -> int:
    """Add the save's duration and size to the checkpoint's trainer_state.json; returns the size in bytes.

    Rank 0 only, after the checkpoint is in place: the file is replaced atomically, so a reader sees
    the old or the new metadata and the checkpoint stays complete either way.
    """
    import json

    size = directory_bytes(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.update({"save_time_s": round(seconds, 3), "checkpoint_bytes": size})
    write_json_atomic(state_file, state)
    return size


def timed_save(save: Callable[[], Path], *, step: int, signal_delay_s: float, is_main: bool,
               write_metrics: Callable[[dict], None], evaluation_s: float = 0.0) -> Path:
    """Run `save()` (collective: every rank calls it) and report how long it took on rank 0.

    The time is logged and kept in the checkpoint's trainer_state.json; a save that, after
    `evaluation_s` (see slow_save_warning), takes more than half of `signal_delay_s` also writes a
    warning line ({"step", "warning"}) to metrics.jsonl.
    """
    started = time.perf_counter()
    checkpoint = save()
    seconds = time.perf_counter() - started
    if is_main:
        size = record_save(checkpoint, seconds)
        log.info("checkpoint %s saved in %.1f s (%s as seen from rank 0)", checkpoint.name, seconds,
                 format_bytes(size))
        warning = slow_save_warning(seconds, signal_delay_s, evaluation_s)
        if warning:
            log.warning(warning)
            write_metrics({"step": step, "warning": warning})
    return checkpoint
