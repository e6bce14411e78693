"""Checkpoint layout, atomic writes, rotation and resume discovery.

    <output_dir>/checkpoints/checkpoint-N/   ds/ (DeepSpeed shards: model, optimizer, scheduler)
                                       model.safetensors, config.json, tokenizer files
                                       adapter/ (LoRA runs: the adapter alone, for peft)
                                       trainer_state.json (Hugging Face's fields), otr_state.json (otr's): trainer_state.py
                                       manifest.json (size and checksums of every file: manifest.py)
    <output_dir>/checkpoints/damaged-checkpoint-N/   a checkpoint found damaged when resuming, set aside

Checkpoints are named as the Hugging Face Trainer names them (``checkpoint-N``), so that its tools find them
(``transformers.trainer_utils.get_last_checkpoint("<output_dir>/checkpoints")``). Runs written before that
named them ``step-N``: those are still listed, resumed, pruned and set aside (LEGACY_STEP_DIR).
    <output_dir>/final/                the last model, Hugging Face format (hard links to the last
                                       checkpoint's export when it has one, else exported there)
    <output_dir>/run_state.json        {"status": "running" | "finished", ...}

Every checkpoint is written into a hidden ``.tmp-checkpoint-N`` directory and renamed into place
only when all ranks are done, so ``checkpoint-N`` existing means it is complete. A failure while
writing, on any rank, is agreed on by every rank (save_failure.py): the partial directory is removed,
the earlier checkpoints are untouched, and every rank raises the same error. Before the rename the
ranks checksum the files into ``manifest.json``; resuming checks them (``verified_resume``). Pruned checkpoints are renamed into hidden
``.trash-*`` directories and deleted by a background thread of rank 0 (background_files.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from otr_cli.atomic import fsync_directory, write_json_atomic
from otr_cli.errors import UserError
from otr_cli.train.checkpoint_size import directory_bytes
from otr_cli.train.background_files import BackgroundFiles, trash_in
from otr_cli.train.distributed import DistInfo, barrier, decide_on_main, gather_from_all
from otr_cli.train.trainer_state import OTR_STATE, TRAINER_STATE
from otr_cli.train.manifest import (MANIFEST, build_manifest, checksum_share, list_files, read_manifest, share_chunks,
                                   subset, verify_checkpoint, write_manifest_of)
from otr_cli.train.save_failure import WriteFailure, agreed_error, describe, drop_tracebacks, free_bytes

log = logging.getLogger("otr.train")

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# The name of a checkpoint in runs written before otr used Hugging Face's: still resumed.
LEGACY_STEP_DIR = re.compile(r"^step-(\d+)$")
DS_TAG = "ds"


class CheckpointError(UserError, RuntimeError):
    pass


class RunExistsError(UserError, RuntimeError):
    """The output directory holds a run that must not be overwritten silently."""


class RunDirectory:
    """The files of one run; rank-aware so only rank 0 writes shared files."""

    def __init__(self, output_dir: str | Path, dist_info: DistInfo):
        self.root = Path(output_dir)
        self.dist = dist_info
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final"
        self.state_file = self.root / "run_state.json"
        # Rank 0's deletions and sizing, off the ranks' critical path.
        self.background = BackgroundFiles()
        # The best checkpoint by trainer.metric_for_best (set by the trainer): never pruned.
        self.best_checkpoint: Optional[Path] = None

    # -- discovery ---------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        return complete_checkpoints_in(self.checkpoints)

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint of `step` is published: the same path on every rank, from the step alone.

        A rank acting on a checkpoint this run wrote uses this, never its own listing of checkpoints/
        (NFS can show one rank an older listing: under ZeRO-3 it would then enter a collective alone).
        """
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest complete checkpoint in this rank's listing (for resuming; may be stale on NFS)."""
        complete = self.complete_checkpoints()
        return complete[-1][1] if complete else None

    def is_finished(self) -> bool:
        if not self.state_file.is_file():
            return False
        return json.loads(self.state_file.read_text()).get("status") == "finished"

    def has_previous_run(self) -> bool:
        return self.is_finished() or bool(self.complete_checkpoints()) or self.final.exists()

    # -- writing -----------------------------------------------------------------------------
    def prepare(self, overwrite: bool) -> None:
        """Create the directory; with `overwrite`, delete a previous run's model files first."""
        if self.dist.is_main:
            # Leftovers of a checkpoint that was being written, or deleted, when the process died.
            stale = [*self.checkpoints.glob(f".tmp-{CHECKPOINT_PREFIX}*"), *self.checkpoints.glob(".tmp-step-*"),
                     *trash_in(self.checkpoints), *trash_in(self.root)]
            if overwrite:
                for path in (self.checkpoints, self.final, self.state_file, self.root / "metrics.jsonl"):
                    if path.is_dir():
                        self.background.discard(path)
                    elif path.exists():
                        path.unlink()
            self.root.mkdir(parents=True, exist_ok=True)
            self.checkpoints.mkdir(exist_ok=True)
            for leftover in stale:
                if leftover.exists():  # not inside checkpoints/ discarded above
                    self.background.discard(leftover)
        barrier()

    def mark(self, status: str, **info: Any) -> None:
        if self.dist.is_main:
            if status == "finished":
                # A finished run's files are final: deletions done, every checkpoint sized. At the very
                # end, so that no rank waits for this while it could work (the final evaluation).
                self.background.wait()
            write_json_atomic(self.state_file, {"status": status, **info})

    def save_checkpoint(self, step: int, write_contents: Callable[[Path], None] | Sequence[Callable[[Path], None]],
                        limit: Optional[int], gather: Callable[[Any], list] = gather_from_all,
                        expected_bytes: Optional[Callable[[], int]] = None) -> Path:
        """Write a checkpoint atomically, with its manifest; a collective (every rank calls it).

        `write_contents(tmp_dir)` (or each of a sequence of such stages, in order) is called on every
        rank (DeepSpeed shards are per rank). After each, the ranks agree whether every rank's writes
        succeeded: when one failed, rank 0 removes the partial directory and every rank raises the same
        error (save_failure.py), none is left waiting for it. Then the ranks checksum the files, each
        its share (manifest.py), and rank 0 writes manifest.json, renames the directory into place and
        prunes old checkpoints. `gather` is distributed.gather_from_all (save_timing.WaitClock times it);
        `expected_bytes()` is the size one checkpoint should have, for the message of a full disk.
        """
        final_dir = self.checkpoint_path(step)
        tmp_dir = self.checkpoints / f".tmp-{CHECKPOINT_PREFIX}{step}"
        stages = [write_contents] if callable(write_contents) else list(write_contents)
        is_main = self.dist.is_main
        free_at_start = free_bytes(self.checkpoints) if is_main else None

        def agreed(stage: Callable[[], Any]) -> list:
            """stage() on every rank, then every rank's result, or the same error on every rank."""
            own, failure, result = None, None, None
            try:
                result = stage()
            except Exception as err:  # reported to every rank below; raised on all of them
                own, failure = err, describe(err, self.dist.rank, self.checkpoints)
                if failure.disk_full:
                    # The frames of torch's failed writer hold its file open, and a deleted file's space is
                    # freed only once it is closed: without this, the clean-up frees nothing on a full disk.
                    drop_tracebacks(err)
            outcomes = gather((failure, result))
            failures = [failed for failed, _ in outcomes if failed is not None]
            if failures:
                try:
                    decide_on_main(lambda: self._abandon(tmp_dir, step, failures, free_at_start, expected_bytes))
                except Exception as agreed_error:
                    raise agreed_error from own
            return [result for _, result in outcomes]

        def create() -> None:
            if is_main:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                tmp_dir.mkdir(parents=True)

        try:
            agreed(create)
            for stage in stages:
                agreed(lambda: stage(tmp_dir))
            sizes = agreed(lambda: list_files(tmp_dir) if is_main else None)[0]  # rank 0's listing, for every rank
            share = share_chunks(sizes, self.dist.world_size)[self.dist.rank]
            checksums = [c for found in agreed(lambda: checksum_share(tmp_dir, share)) for c in found]
        except (KeyboardInterrupt, SystemExit):
            # A second Ctrl-C stops at once, without the agreement (every rank got it): rank 0 still removes
            # the half-written directory, so that no one mistakes it for a checkpoint in the meantime.
            if is_main:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise

        def publish() -> None:
            if not is_main:
                return
            write_manifest_of(tmp_dir, build_manifest(sizes, checksums))
            if final_dir.exists():
                # Same step saved again (e.g. the end of training right after a periodic save).
                self.background.discard(final_dir)
            os.replace(tmp_dir, final_dir)
            fsync_directory(self.checkpoints)
            self._prune(limit, keep=final_dir)

        agreed(publish)
        return final_dir

    def _abandon(self, tmp_dir: Path, step: int, failures: list[WriteFailure], free_at_start: Optional[int],
                 expected_bytes: Optional[Callable[[], int]]) -> NoReturn:
        """Rank 0, after a failed write: remove the partial checkpoint and raise the error every rank raises."""
        shutil.rmtree(tmp_dir, ignore_errors=True)
        previous = self.latest_checkpoint()
        raise agreed_error(failures, checkpoint=f"{CHECKPOINT_PREFIX}{step}", directory=self.checkpoints,
                           needed=checkpoint_need(previous, expected_bytes), free_at_start=free_at_start,
                           previous=previous.name if previous else None)

    def _prune(self, limit: Optional[int], keep: Path) -> None:
        """Move the checkpoints beyond `limit` out of sight now; the background thread deletes them."""
        if limit is None:
            return
        complete = self.complete_checkpoints()
        best = self.best_checkpoint.resolve() if self.best_checkpoint is not None else None
        for _, path in complete[:-limit]:
            if path != keep and path.resolve() != best:  # the best is kept beside the newest `limit`
                self.background.discard(path)

    def publish_final(self, source_checkpoint: Path, export: Optional[Callable[[Path], None]] = None,
                      wait: Callable[[], None] = barrier) -> None:
        """Publish final/ atomically: hard links to the Hugging Face files of `source_checkpoint`, or,
        with `export` (a collective every rank calls: the checkpoint has no export), a new export.

        Hard links cost no time and no space, and final/ stays whole when the checkpoint is pruned
        or deleted; where the file system refuses them the files are copied.
        """
        tmp = self.root / ".tmp-final"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if export is not None:
            wait()
            export(tmp)
        elif self.dist.is_main:
            # ".*.tmp": an atomic writer's temporary file, such as the background sizing's rewrite of
            # otr_state.json, which is renamed away while the tree is linked.
            shutil.copytree(source_checkpoint, tmp, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns(DS_TAG, TRAINER_STATE, OTR_STATE, "latest", "zero_to_fp32.py",
                                                          "zero_to_torch.py", ".*.tmp", MANIFEST))
        if self.dist.is_main:
            write_manifest_of(tmp, final_manifest(tmp, None if export is not None else source_checkpoint))
            if self.final.exists():
                self.background.discard(self.final)
            os.replace(tmp, self.final)
            fsync_directory(self.root)
        wait()


def final_manifest(final_dir: Path, linked_from: Optional[Path]) -> dict[str, Any]:
    """The manifest of final/: the entries of `linked_from`'s manifest for the files final/ links (the same
    bytes), else (an export of its own, or a checkpoint saved before manifests) checksummed here, on rank 0."""
    sizes = list_files(final_dir)
    try:
        source = read_manifest(linked_from) if linked_from is not None else None
    except ValueError:  # a damaged manifest: final/'s own files are checksummed instead
        source = None
    if source is not None and all(source["files"].get(name, {}).get("size") == size for name, size in sizes.items()):
        return subset(source, list(sizes))
    return build_manifest(sizes, checksum_share(final_dir, [c for share in share_chunks(sizes, 1) for c in share]))


def checkpoint_need(previous: Optional[Path], expected_bytes: Optional[Callable[[], int]]
                    ) -> Optional[tuple[int, str]]:
    """(bytes, where the figure comes from) one checkpoint takes: the size of `previous`, else the estimate."""
    try:
        if previous is not None:
            recorded = read_trainer_state(previous).get("checkpoint_bytes")
            return (int(recorded) if recorded else directory_bytes(previous)), f"the size of {previous.name}"
        if expected_bytes is not None:
            return expected_bytes(), "as dry_run=true estimates it"
    except Exception:  # noqa: BLE001 - a figure for the message; the error it goes into matters more
        pass
    return None


def link_or_copy(source: str, target: str) -> None:
    """A hard link to `source` at `target`; a copy where the file system has none (or across devices)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def resolve_resume(run_dir: RunDirectory, resume: str) -> Optional[Path]:
    """The checkpoint to resume from, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        return run_dir.latest_checkpoint()
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() or not (path / DS_TAG).is_dir():
        raise CheckpointError(
            f"trainer.resume={resume!r}: not a complete otr checkpoint (expected {path}/trainer_state.json "
            f"and {path}/{DS_TAG}/). Use trainer.resume=auto to pick the newest in run.output_dir.")
    return path


DAMAGED_PREFIX = "damaged-"
# Problems named in one message; the rest are counted.
SHOWN_PROBLEMS = 5


def verified_resume(run_dir: RunDirectory, resume: str) -> Optional[Path]:
    """The checkpoint to resume from (resolve_resume), checked against its manifest; None to start fresh.

    A collective: every rank calls it, reads its share of the files (manifest.verify_checkpoint) and
    gets the same answer. With trainer.resume=auto a damaged checkpoint is moved aside, to
    checkpoints/damaged-checkpoint-N (never deleted), with a warning naming what is wrong, and the previous
    one is tried; when none is left, or for an explicit trainer.resume=PATH, a damaged checkpoint is a
    CheckpointError (left in place).
    A checkpoint saved before otr wrote manifests is resumed unchecked (logged).
    """
    while True:
        # Rank 0's listing decides for every rank: NFS can show another rank an older checkpoints/.
        checkpoint = decide_on_main(lambda: resolve_resume(run_dir, resume))
        if checkpoint is None:
            return None
        problems = verify_checkpoint(checkpoint, run_dir.dist.rank, run_dir.dist.world_size, decide_on_main,
                                     gather_from_all)
        if problems is None:
            if run_dir.dist.is_main:
                log.info("%s has no %s (saved before otr wrote one): resuming without checking its files",
                         checkpoint, MANIFEST)
            return checkpoint
        if not problems:
            return checkpoint
        what = "; ".join(problems[:SHOWN_PROBLEMS]) + (
            f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else "")
        if resume != "auto":
            raise CheckpointError(
                f"trainer.resume={resume!r}: the checkpoint is damaged since it was saved ({what}). Resume from "
                f"another checkpoint (trainer.resume=auto takes the newest intact one in run.output_dir).")
        if not decide_on_main(lambda: len(run_dir.complete_checkpoints()) > 1):
            # Left in place: starting from step 0 would silently throw away the run (and its metrics), and
            # a rerun of the same command must meet the same error, not a fresh start.
            raise CheckpointError(
                f"{checkpoint} is damaged since it was saved ({what}), and run.output_dir has no intact checkpoint "
                f"to fall back on. Resume from a checkpoint you trust (trainer.resume=PATH), or start the run again "
                f"with trainer.overwrite=true (deletes its checkpoints) or in a new run.output_dir.")
        moved = decide_on_main(lambda: set_aside(checkpoint))
        if run_dir.dist.is_main:
            log.warning("%s is damaged since it was saved (%s): moved to %s, not deleted; resuming from "
                        "the previous checkpoint instead", checkpoint.name, what, moved)


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged `checkpoint` to damaged-<name> beside it (with a suffix if taken): out of the listings
    that resume, prune and publish read, and kept for the user to inspect."""
    target = checkpoint.parent / f"{DAMAGED_PREFIX}{checkpoint.name}"
    if target.exists():
        target = checkpoint.parent / f"{DAMAGED_PREFIX}{checkpoint.name}-{time.time_ns()}"
    os.replace(checkpoint, target)
    fsync_directory(checkpoint.parent)
    return target


def complete_checkpoints_in(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in a run's `checkpoints` folder, oldest first, in this
    process's listing (a checkpoint is complete once its trainer_state.json is there)."""
    if not checkpoints.is_dir():
        return []
    found = []
    for child in checkpoints.iterdir():
        step = checkpoint_step(child.name)
        if step is not None and child.is_dir() and (child / "trainer_state.json").is_file():
            # An old-layout step-N and a checkpoint-N of the same step: the new one sorts last (newest).
            found.append((step, child.name.startswith(CHECKPOINT_PREFIX), child))
    return [(step, path) for step, _, path in sorted(found)]


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint folder's name, checkpoint-N (or an old run's step-N); None for any other name."""
    match = CHECKPOINT_DIR.match(name) or LEGACY_STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json and otr_state.json merged (otr's keys win): everything a resume reads.
    A checkpoint saved before otr_state.json has otr's keys inside trainer_state.json."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    own = checkpoint / OTR_STATE
    return {**state, **json.loads(own.read_text())} if own.is_file() else state


def topology_record(world_size: int, zero_stage: int) -> dict[str, int]:
    """otr_state.json's "topology": how the DeepSpeed state under ds/ is split (read by train/reshard.py)."""
    return {"world_size": world_size, "zero_stage": zero_stage}


# StepPlan.order_settings keys, as the user sets them.
ORDER_SETTING_KEYS = {
    "seed": "seed",
    "shuffle": "data.shuffle",
    "num_examples": "the number of training examples (data.source, data.max_examples, data.validation_*)",
    "group_by_length": "data.group_by_length",
    "max_tokens_per_batch": "trainer.max_tokens_per_batch",
    "micro_batches_per_step": "trainer.grad_accum x ranks",
    "global_batch": "trainer.micro_batch_size x trainer.grad_accum x ranks",
    "micro_batch_size": "trainer.micro_batch_size",
}


def check_same_data_order(checkpoint: Path, order_settings: dict[str, Any]) -> None:
    """CheckpointError if resuming from `checkpoint` would train the remaining steps on other examples
    than the run that wrote it (train/batches.StepPlan.order_settings); checkpoints from before otr
    recorded the order pass unchecked."""
    saved = read_trainer_state(checkpoint).get("data_order")
    if saved is None:
        return
    changed = [f"{ORDER_SETTING_KEYS.get(key, key)}: {saved.get(key)} -> {order_settings.get(key)}"
               for key in sorted(saved.keys() | order_settings.keys()) if saved.get(key) != order_settings.get(key)]
    if changed:
        raise CheckpointError(
            f"{checkpoint}: resuming with these settings would train the remaining steps on other batches than "
            f"the run that wrote it ({'; '.join(changed)}). Set them back to resume exactly, or start a new run "
            f"from this checkpoint's weights: model.name_or_path={checkpoint} run.output_dir=<a new directory>.")


def check_same_training_data(checkpoint: Path, fingerprint: dict[str, Any], allow_changed: bool) -> Optional[str]:
    """Refuse (CheckpointError) to resume from `checkpoint` on other training data than it was trained on
    (train/data_identity.py train_data_fingerprint). With `allow_changed` (trainer.resume_with_changed_data)
    return what changed instead, for the run to record; None when nothing did, or when the checkpoint predates
    the fingerprint (it resumes unchecked, as before)."""
    saved = read_trainer_state(checkpoint).get("data_fingerprint")
    if saved is None or saved.get("train_tokens") == fingerprint.get("train_tokens"):
        return None
    sources = sorted({str(saved.get("source")), str(fingerprint.get("source"))})
    change = (f"the training data differ from those {checkpoint} was trained on ({' and '.join(sources)}: "
              f"{saved.get('examples')} -> {fingerprint.get('examples')} examples, tokens "
              f"{str(saved.get('train_tokens'))[:12]} -> {str(fingerprint.get('train_tokens'))[:12]})")
    if allow_changed:
        return change
    raise CheckpointError(
        f"{change}: the remaining steps would train on other batches than the interrupted run. Put the data back "
        f"as they were, start a new run from this checkpoint's weights (model.name_or_path={checkpoint} "
        f"run.output_dir=<a new directory>), or resume anyway with trainer.resume_with_changed_data=true "
        f"(recorded in metrics.jsonl).")
