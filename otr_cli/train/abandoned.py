"""An explicit ``trainer.resume=<an older checkpoint of this run>``: the newer checkpoints are another branch.

Resuming this run from checkpoint-2 while checkpoint-3 and checkpoint-4 exist starts a new branch of the run at step 2. Left in
checkpoints/, the old branch's newer checkpoints would stay the newest by step: a later ``trainer.resume=auto``
(after a kill or a preemption) would jump back to them, and pruning (trainer.save_total_limit) would keep them
and delete the new branch's. They are moved, never deleted, to ``checkpoints/abandoned-<UTC time>/checkpoint-N``
(with the periodic evaluations of those steps, ``eval/step-N``, under its ``eval/``) before the run writes
anything, so the user can still look at or start from them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from otr_cli.atomic import fsync_directory
from otr_cli.train.checkpoints import LEGACY_STEP_DIR, RunDirectory, checkpoint_step

log = logging.getLogger("otr.train")

ABANDONED_PREFIX = "abandoned-"


def newer_branch(run_dir: RunDirectory, checkpoint: Path, resumed_step: int) -> list[Path]:
    """The checkpoint-N folders of this run (checkpoints/; also an old run's step-N) and the eval/step-N folders
    of its periodic evaluations, with N past
    `resumed_step`, when `checkpoint` is one of this run's own checkpoints; [] otherwise (a resume from another
    run's checkpoint into this directory abandons nothing here)."""
    if Path(checkpoint).resolve().parent != run_dir.checkpoints.resolve():
        return []
    found = []
    evaluations = run_dir.root / "eval"
    for folder, step_of in ((run_dir.checkpoints, checkpoint_step), (evaluations, evaluation_step)):
        if folder.is_dir():
            for child in folder.iterdir():
                step = step_of(child.name)
                if step is not None and step > resumed_step:
                    found.append(child)
    return sorted(found)


def move_newer_branch_aside(run_dir: RunDirectory, checkpoint: Path, resumed_step: int) -> Optional[Path]:
    """Move newer_branch(...) under checkpoints/abandoned-<UTC time>/ (eval folders under its eval/), on the
    caller's rank (rank 0: the caller decides once for all ranks); returns that folder, None when nothing moved."""
    newer = newer_branch(run_dir, checkpoint, resumed_step)
    if not newer:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir.checkpoints / f"{ABANDONED_PREFIX}{stamp}"
    suffix = 1
    while target.exists():  # two explicit resumes within one second
        suffix += 1
        target = run_dir.checkpoints / f"{ABANDONED_PREFIX}{stamp}-{suffix}"
    for path in newer:
        destination = target / path.name if path.parent == run_dir.checkpoints else target / "eval" / path.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)  # a rename on one file system: instant whatever the checkpoint's size
    fsync_directory(run_dir.checkpoints)
    log.warning("trainer.resume=%s (step %d): this run's later steps are another branch; moved %s to %s "
                "(nothing deleted)", checkpoint, resumed_step, ", ".join(
                    str(p.relative_to(run_dir.root)) for p in newer), target)
    return target


def evaluation_step(name: str) -> Optional[int]:
    """The step of a periodic evaluation's folder under eval/ (step-N); None for any other name."""
    match = LEGACY_STEP_DIR.match(name)
    return int(match.group(1)) if match else None
