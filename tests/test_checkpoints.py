"""RunDirectory's file work at each save: pruning off the critical path, final/ without a copy (issue 25)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from otr_cli.train.checkpoints import RunDirectory
from otr_cli.train.distributed import DistInfo

HF_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def single_process_run(root: Path) -> RunDirectory:
    run_dir = RunDirectory(root, DistInfo(rank=0, world_size=1, local_rank=0))
    run_dir.prepare(overwrite=False)
    return run_dir


def write_checkpoint(step: int):
    """A checkpoint's contents as save_checkpoint's write_contents: DeepSpeed's folder, an export, the state."""
    def write(directory: Path) -> None:
        (directory / "ds").mkdir()
        (directory / "ds" / "optimizer.pt").write_bytes(b"o" * 1000)
        for name in HF_FILES:
            (directory / name).write_text(f"{name} of step {step}")
        (directory / "trainer_state.json").write_text(json.dumps({"step": step}))
    return write


def blocked_background(run_dir: RunDirectory) -> threading.Event:
    """Hold the background thread in a job until the returned event is set (a slow NFS deletion)."""
    release = threading.Event()
    run_dir.background.submit(lambda: release.wait(timeout=60))
    return release


def test_a_pruned_checkpoint_disappears_at_once_and_is_deleted_in_the_background(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    for step in (1, 2):
        run_dir.save_checkpoint(step, write_checkpoint(step), limit=1)
    release = blocked_background(run_dir)
    run_dir.save_checkpoint(3, write_checkpoint(3), limit=1)
    # The save returned while the deletion waits: the pruned checkpoint is already out of sight.
    assert [step for step, _ in run_dir.complete_checkpoints()] == [3]
    assert sorted(p.name for p in run_dir.checkpoints.iterdir() if not p.name.startswith(".trash-")) == ["checkpoint-3"]
    assert len(list(run_dir.checkpoints.glob(".trash-checkpoint-2-*"))) == 1
    release.set()
    run_dir.background.wait()
    assert [p.name for p in run_dir.checkpoints.iterdir()] == ["checkpoint-3"]


@pytest.mark.faults
def test_a_run_killed_while_deleting_leaves_trash_that_the_next_run_removes(tmp_path):
    root = tmp_path / "run"
    run_dir = single_process_run(root)
    run_dir.save_checkpoint(1, write_checkpoint(1), limit=None)
    # What a kill in the middle of a deletion leaves: a renamed, half-deleted directory.
    half_deleted = run_dir.checkpoints / ".trash-checkpoint-0-123"
    (half_deleted / "ds").mkdir(parents=True)
    (half_deleted / "trainer_state.json").write_text(json.dumps({"step": 0}))
    assert [step for step, _ in run_dir.complete_checkpoints()] == [1]
    assert run_dir.latest_checkpoint() == run_dir.checkpoint_path(1)

    resumed = single_process_run(root)
    resumed.background.wait()
    assert [p.name for p in resumed.checkpoints.iterdir()] == ["checkpoint-1"]


def test_final_is_hard_links_to_the_last_checkpoints_export_and_outlives_it(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    checkpoint = run_dir.save_checkpoint(2, write_checkpoint(2), limit=None)
    run_dir.publish_final(checkpoint)
    assert sorted(p.name for p in run_dir.final.iterdir()) == sorted(HF_FILES + ("manifest.json",))
    for name in HF_FILES:
        assert (run_dir.final / name).stat().st_ino == (checkpoint / name).stat().st_ino, name
    # Published again (a resumed, finished run): the old final/ is replaced whole.
    run_dir.publish_final(checkpoint)
    shutil.rmtree(run_dir.checkpoints)  # a user freeing the space of the optimizer states

    assert (run_dir.final / "model.safetensors").read_text() == "model.safetensors of step 2"


def test_final_is_exported_afresh_when_the_checkpoint_holds_no_export(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    checkpoint = run_dir.save_checkpoint(2, lambda d: (d / "trainer_state.json").write_text("{}"), limit=None)

    def export(target: Path) -> None:  # what export_hf_model writes on rank 0
        target.mkdir()
        for name in HF_FILES:
            (target / name).write_text(f"{name} exported")

    run_dir.publish_final(checkpoint, export=export)
    assert sorted(p.name for p in run_dir.final.iterdir()) == sorted(HF_FILES + ("manifest.json",))
    assert (run_dir.final / "model.safetensors").read_text() == "model.safetensors exported"
    assert not (tmp_path / "run" / ".tmp-final").exists()


@pytest.mark.slow
def test_a_rank_whose_listing_shows_no_checkpoint_resumes_from_rank_0s_choice(tiny_model_dir, tmp_path):
    """resume=auto is decided from rank 0's listing for every rank: before, a rank whose (NFS) listing of
    checkpoints/ was stale started from step 0 while rank 0 resumed, and the two ran different collectives."""
    import signal
    import time

    from helpers import REPO, read_jsonl, tiny_overrides
    from ranks import start_ranks, wait_all

    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, "trainer.max_steps=60", "trainer.save_steps=2",
                                     "launcher.dist_timeout_min=0.5")]
    (tmp_path / "first").mkdir()
    processes = start_ranks(args, tmp_path / "first")
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
            assert all(p.poll() is None for p in processes) and time.time() < deadline
            time.sleep(0.05)
    finally:
        for process in processes:
            process.send_signal(signal.SIGKILL)
            process.wait()
    saved = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))

    (tmp_path / "resumed").mkdir()
    processes = start_ranks([a if not a.startswith("trainer.max_steps") else f"trainer.max_steps={saved + 1}"
                             for a in args],
                            tmp_path / "resumed", extra_env={"OTR_STALE_RANK": "1", "OTR_STALE_EMPTY": "1"},
                            script=str(REPO / "tests" / "stale_listing.py"))
    codes = wait_all(processes, 300)
    for process in processes:
        if process.poll() is None:
            process.kill()
    logs = "\n".join((tmp_path / "resumed" / f"rank{r}.log").read_text()[-2000:] for r in (0, 1))
    assert codes == [0, 0], logs
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps[-1] == saved + 1 and steps.count(saved + 1) == 1, steps


def test_final_leaves_out_an_atomic_writers_temporary_file(tmp_path):
    """The background sizing rewrites trainer_state.json through a `.trainer_state.json.<random>.tmp` file that it
    renames away; publish_final linking the checkpoint at that moment failed with "No such file" (seen in CI)."""
    run_dir = single_process_run(tmp_path / "run")
    checkpoint = run_dir.save_checkpoint(2, write_checkpoint(2), None)
    (checkpoint / ".trainer_state.json.zwbl12pd.tmp").write_text("{}")
    run_dir.publish_final(checkpoint)
    assert not list(run_dir.final.glob(".*.tmp")) and (run_dir.final / "config.json").is_file()


def test_pruning_keeps_the_best_checkpoint_beside_the_newest(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    run_dir.save_checkpoint(1, write_checkpoint(1), limit=1)
    run_dir.best_checkpoint = run_dir.checkpoint_path(1)
    for step in (2, 3):
        run_dir.save_checkpoint(step, write_checkpoint(step), limit=1)
    run_dir.background.wait()
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_old_step_n_checkpoints_are_listed_with_the_new_checkpoint_n_ones(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    for name, step in (("step-1", 1), ("step-2", 2), ("checkpoint-3", 3)):
        (run_dir.checkpoints / name).mkdir()
        (run_dir.checkpoints / name / "trainer_state.json").write_text(json.dumps({"step": step}))
    (run_dir.checkpoints / "damaged-checkpoint-4").mkdir()
    assert [(step, path.name) for step, path in run_dir.complete_checkpoints()] == [
        (1, "step-1"), (2, "step-2"), (3, "checkpoint-3")]
    assert run_dir.latest_checkpoint() == run_dir.checkpoints / "checkpoint-3"
