"""Resume a checkpoint on another number of ranks.

ZeRO 1-3 store the optimizer state (fp32 master weights, Adam moments) split over the ranks that
saved it, and DeepSpeed refuses to load such shards at another world size. Its universal checkpoint
(``deepspeed.checkpoint.ds_to_universal``) stores every parameter's state whole, one folder per
parameter, and an engine built with ``"checkpoint": {"load_universal": true}`` loads it at any world
size. This module decides, before the model loads, whether a resume needs that conversion, refuses
the cases DeepSpeed cannot load, and converts once per checkpoint:

    <output_dir>/checkpoints/checkpoint-N/ds/              the checkpoint as saved (never modified)
    <output_dir>/checkpoints/universal-checkpoint-N/ds/    its universal form, published by a rename

A second requeue finds ``universal-checkpoint-N`` and reuses it; only the newest one is kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from otr_cli.atomic import fsync_directory, write_json_atomic
from otr_cli.train.checkpoints import DS_TAG, CheckpointError, read_trainer_state
from otr_cli.train.distributed import DistInfo

UNIVERSAL_PREFIX = "universal-"
# What the conversion copies from the source checkpoint, to tell a reusable conversion from a stale one.
SOURCE_STATE = "source_trainer_state.json"
# The other ranks wait for rank 0's conversion in a collective of this length, not launcher.dist_timeout_min:
# 6-13 s measured for the tests' tiny model (0.6 s of it converting); for Qwen3-8B ~400 GB of file-system
# traffic (98 GB of fp32 optimizer state read, written as fragments, merged), ~7 min at 1 GB/s, more on a busy one.
CONVERSION_WAIT = timedelta(hours=3)
log = logging.getLogger("otr.train")
# One per data-parallel rank under ZeRO 1-3 (bf16_: DeepSpeed's bf16 optimizer); ZeRO-3 also splits the model.
_OPTIM_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_ZERO3_MODEL_SHARD = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")


@dataclass(frozen=True)
class Topology:
    """How a checkpoint's DeepSpeed state is split. zero_stage: 0-3, or None for "1 or 2" (a checkpoint from
    before otr recorded it); optimizer_shards: the per-rank optimizer files in ds/, 0 when the optimizer state
    is saved whole with the model (ZeRO-0), which then loads at any world size."""

    zero_stage: Optional[int]
    optimizer_shards: int


@dataclass(frozen=True)
class ResumePlan:
    """What DeepSpeed loads on resume: `load_dir`/`tag`, built with load_universal when `universal`;
    `convert` says rank 0 must first write the universal form into `load_dir`."""

    load_dir: Path
    tag: str
    universal: bool
    convert: bool


def saved_topology(checkpoint: Path) -> Topology:
    """The ZeRO stage `checkpoint` was saved under (otr_state.json's "topology", else guessed from the file
    names) and how many ranks' optimizer shards its ds/ holds (what DeepSpeed itself will count)."""
    names = os.listdir(checkpoint / DS_TAG)
    shards = len({m.group(1) for name in names if (m := _OPTIM_SHARD.match(name))})
    recorded = read_trainer_state(checkpoint).get("topology")
    if recorded:
        stage: Optional[int] = int(recorded["zero_stage"])
    elif any(_ZERO3_MODEL_SHARD.match(name) for name in names):
        stage = 3
    else:
        stage = None if shards else 0
    return Topology(stage, shards)


def plan_resume(checkpoint: Path, world_size: int, zero_stage: int) -> ResumePlan:
    """How to load `checkpoint` at `world_size` ranks under `zero_stage`; CheckpointError where DeepSpeed cannot."""
    saved = saved_topology(checkpoint)
    if saved.zero_stage != zero_stage and not (saved.zero_stage is None and zero_stage in (1, 2)):
        was = "ZeRO-1 or 2" if saved.zero_stage is None else f"ZeRO-{saved.zero_stage}"
        back = "deepspeed=zero2" if saved.zero_stage is None else f"deepspeed=zero{saved.zero_stage}"
        raise CheckpointError(
            f"{checkpoint}: saved under {was}, resumed under ZeRO-{zero_stage}; DeepSpeed cannot load the optimizer "
            f"state across stages. Resume with {back}, or start a new run from this checkpoint's weights: "
            f"model.name_or_path={checkpoint} run.output_dir=<a new directory>.")
    if saved.optimizer_shards in (0, world_size):
        return ResumePlan(checkpoint, DS_TAG, universal=False, convert=False)
    universal_dir = universal_dir_for(checkpoint)
    return ResumePlan(universal_dir, DS_TAG, universal=True, convert=not _is_conversion_of(universal_dir, checkpoint))


def universal_dir_for(checkpoint: Path) -> Path:
    """The sibling directory that holds `checkpoint`'s universal form."""
    return checkpoint.parent / f"{UNIVERSAL_PREFIX}{checkpoint.name}"


def _is_conversion_of(universal_dir: Path, checkpoint: Path) -> bool:
    marker = universal_dir / SOURCE_STATE
    return marker.is_file() and json.loads(marker.read_text()) == read_trainer_state(checkpoint)


def convert_to_universal(checkpoint: Path, workers: int = 4) -> float:
    """Write `checkpoint`'s universal form into universal_dir_for(checkpoint), atomically; remove the universal
    forms of other checkpoints. Returns the seconds it took. Runs DeepSpeed's converter in a child process
    (it forks workers and holds whole shards in host memory: neither belongs in a training rank)."""
    started = time.monotonic()
    target = universal_dir_for(checkpoint)
    tmp = checkpoint.parent / f".tmp-{target.name}"
    remove_universal_forms(checkpoint.parent, keep=None)  # other checkpoints' and a conversion killed part-way
    tmp.mkdir()
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(checkpoint / DS_TAG), "--output_folder", str(tmp / DS_TAG), "--inject_missing_state",
               "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise CheckpointError(
            f"{checkpoint}: converting it to DeepSpeed's universal checkpoint (to resume on another number of ranks) "
            f"failed: {last[0]}. Resume on the number of ranks that saved it, or start a new run from its weights: "
            f"model.name_or_path={checkpoint} run.output_dir=<a new directory>.")
    (tmp / DS_TAG / "latest_universal").write_text(DS_TAG)
    write_json_atomic(tmp / SOURCE_STATE, read_trainer_state(checkpoint))
    os.replace(tmp, target)
    fsync_directory(checkpoint.parent)
    return time.monotonic() - started


def remove_universal_forms(checkpoints_dir: Path, keep: Optional[Path]) -> None:
    """Delete the universal forms in `checkpoints_dir` but `keep`: each is as big as the optimizer state."""
    # checkpoint-* and an old run's step-*; also conversions killed part-way (.tmp-).
    for stale in [*checkpoints_dir.glob(f"{UNIVERSAL_PREFIX}*"), *checkpoints_dir.glob(f".tmp-{UNIVERSAL_PREFIX}*")]:
        if keep is None or stale.resolve() != keep.resolve():
            shutil.rmtree(stale, ignore_errors=True)


def prepare_resume(checkpoint: Path, world_size: int, zero_stage: int, dist_info: DistInfo) -> ResumePlan:
    """plan_resume decided on rank 0, which also converts when the plan says so, while the others wait for it
    (CONVERSION_WAIT at most, not the training collectives' timeout); every rank raises rank 0's error.
    Call before the model loads: a refused resume costs nothing."""
    outcome: dict[str, Any] = {}
    failure: Optional[BaseException] = None
    if dist_info.is_main:
        try:
            plan = plan_resume(checkpoint, world_size, zero_stage)
            outcome["plan"] = plan
            remove_universal_forms(checkpoint.parent, keep=plan.load_dir if plan.universal else None)
            if plan.convert:
                log.info("%s was saved by another number of ranks: converting it to DeepSpeed's universal checkpoint "
                         "in %s", checkpoint, plan.load_dir)
                seconds = convert_to_universal(checkpoint, workers=_conversion_workers())
                log.info("converted %s in %.1f s", checkpoint, seconds)
        except Exception as exc:  # sent to the others, which would otherwise wait CONVERSION_WAIT for nothing
            failure, outcome["error"] = exc, str(exc)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        # A group of its own so that the wait gets the conversion's timeout; gloo so that it needs no GPU.
        waiting = dist.new_group(backend="gloo", timeout=CONVERSION_WAIT)
        shared = [outcome]
        dist.broadcast_object_list(shared, src=0, group=waiting)
        outcome = shared[0]
        dist.destroy_process_group(waiting)
    if failure is not None:
        raise failure
    if "error" in outcome:
        raise CheckpointError(outcome["error"])
    return outcome["plan"]


def _conversion_workers() -> int:
    # The node's other ranks are idle while rank 0 converts: its CPUs are free, but each worker holds shards.
    return max(1, min(8, (os.cpu_count() or 1) // 2))
