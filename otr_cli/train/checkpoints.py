"""Checkpoint layout, atomic writes, rotation and resume discovery.

    <output_dir>/checkpoints/step-N/   ds/ (DeepSpeed shards: model, optimizer, scheduler)
                                       model.safetensors, config.json, tokenizer files
                                       adapter/ (LoRA runs: the adapter alone, for peft)
                                       trainer_state.json
    <output_dir>/final/                the last model, Hugging Face format (hard links to the last
                                       checkpoint's export when it has one, else exported there)
    <output_dir>/run_state.json        {"status": "running" | "finished", ...}

Every checkpoint is written into a hidden ``.tmp-step-N`` directory and renamed into place
only when all ranks are done, so ``step-N`` existing means it is complete. A failure while
writing leaves the earlier checkpoints untouched. Pruned checkpoints are renamed into hidden
``.trash-*`` directories and deleted by a background thread of rank 0 (background_files.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from otr_cli.atomic import fsync_directory, write_json_atomic
from otr_cli.errors import UserError
from otr_cli.train.background_files import BackgroundFiles, trash_in
from otr_cli.train.distributed import DistInfo, barrier

STEP_DIR = re.compile(r"^step-(\d+)$")
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

    # -- discovery ---------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            match = STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / "trainer_state.json").is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint of `step` is published: the same path on every rank, from the step alone.

        A rank acting on a checkpoint this run wrote uses this, never its own listing of checkpoints/
        (NFS can show one rank an older listing: under ZeRO-3 it would then enter a collective alone).
        """
        return self.checkpoints / f"step-{step}"

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
            stale = [*self.checkpoints.glob(".tmp-step-*"), *trash_in(self.checkpoints), *trash_in(self.root)]
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

    def save_checkpoint(self, step: int, write_contents: Callable[[Path], None], limit: Optional[int],
                        wait: Callable[[], None] = barrier) -> Path:
        """Write a checkpoint atomically.

        `write_contents(tmp_dir)` is called on every rank (DeepSpeed shards are per rank);
        rank 0 then renames the directory into place and prunes old checkpoints. `wait` is the
        barrier (save_timing.WaitClock.barrier times it).
        """
        final_dir = self.checkpoint_path(step)
        tmp_dir = self.checkpoints / f".tmp-step-{step}"
        if self.dist.is_main:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
        wait()
        try:
            write_contents(tmp_dir)
        except BaseException:
            if self.dist.is_main:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        wait()
        if self.dist.is_main:
            if final_dir.exists():
                # Same step saved again (e.g. the end of training right after a periodic save).
                self.background.discard(final_dir)
            os.replace(tmp_dir, final_dir)
            fsync_directory(self.checkpoints)
            self._prune(limit, keep=final_dir)
        wait()
        return final_dir

    def _prune(self, limit: Optional[int], keep: Path) -> None:
        """Move the checkpoints beyond `limit` out of sight now; the background thread deletes them."""
        if limit is None:
            return
        complete = self.complete_checkpoints()
        for _, path in complete[:-limit]:
            if path != keep:
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
            # trainer_state.json, which is renamed away while the tree is linked.
            shutil.copytree(source_checkpoint, tmp, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns(DS_TAG, "trainer_state.json", "latest", "zero_to_fp32.py",
                                                          "zero_to_torch.py", ".*.tmp"))
        if self.dist.is_main:
            if self.final.exists():
                self.background.discard(self.final)
            os.replace(tmp, self.final)
            fsync_directory(self.root)
        wait()


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


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def topology_record(world_size: int, zero_stage: int) -> dict[str, int]:
    """trainer_state.json's "topology": how the DeepSpeed state under ds/ is split (read by train/reshard.py)."""
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
