"""A checkpoint damaged after it was published (a truncated shard, a deleted file): found by its manifest
before resuming from it; resume=auto falls back to the previous one, an explicit resume is refused."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from test_checkpoints import single_process_run
from helpers import read_jsonl, run_cli, tiny_overrides
from otr_cli.train.checkpoints import CheckpointError, verified_resume
from otr_cli.train.manifest import MANIFEST, chunks_of, list_files, share_chunks, verify_checkpoint

HF_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def verify(checkpoint: Path) -> list[str] | None:
    return verify_checkpoint(checkpoint, 0, 1, lambda decide: decide(), lambda value: [value])


def write_checkpoint(step: int):
    def write(directory: Path) -> None:
        (directory / "ds").mkdir()
        (directory / "ds" / "optimizer.pt").write_bytes(bytes(range(256)) * 40)
        for name in HF_FILES:
            (directory / name).write_text(f"{name} of step {step}")
        (directory / "trainer_state.json").write_text(json.dumps({"step": step}))
    return write


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_the_chunks_are_shared_over_the_ranks_each_read_once_and_the_work_balanced():
    mib = 1 << 20
    sizes = {"model.safetensors": 1000 * mib, "ds/rank0.pt": 300 * mib, "ds/rank1.pt": 300 * mib, "config.json": 700,
             "empty": 0, "trainer_state.json": 500, "otr_state.json": 400}
    shares = share_chunks(sizes, 4, chunk_bytes=256 * mib)
    assert sorted(c for share in shares for c in share) == sorted(chunks_of(sizes, 256 * mib))
    for rewritten in ("trainer_state.json", "otr_state.json"):  # rewritten after the save: checked as JSON
        assert (rewritten, 0) not in chunks_of(sizes, 256 * mib)
    loads = [sum(min(256 * mib, sizes[name] - i * 256 * mib) for name, i in share) for share in shares]
    assert max(loads) - min(loads) <= 256 * mib, loads
    assert share_chunks(sizes, 4, chunk_bytes=256 * mib) == shares  # the same on every rank


def test_a_saved_checkpoint_and_final_have_manifests_that_match_their_files(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    checkpoint = run_dir.save_checkpoint(2, write_checkpoint(2), limit=None)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(list_files(checkpoint))
    assert manifest["files"]["trainer_state.json"] == {"check": "json"}
    assert verify(checkpoint) == []
    run_dir.publish_final(checkpoint)
    final_manifest = json.loads((run_dir.final / MANIFEST).read_text())
    assert sorted(final_manifest["files"]) == sorted(HF_FILES)  # final/ links the export alone
    assert all(final_manifest["files"][name] == manifest["files"][name] for name in HF_FILES)
    assert verify(run_dir.final) == []


def test_verification_names_a_truncated_a_deleted_and_a_changed_file(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    checkpoint = run_dir.save_checkpoint(2, write_checkpoint(2), limit=None)
    truncate(checkpoint / "ds" / "optimizer.pt")
    (checkpoint / "config.json").unlink()
    (checkpoint / "tokenizer.json").write_text("tokenizer.json of step 9")  # same size, other bytes
    (checkpoint / "trainer_state.json").write_text('{"step": ')
    problems = verify(checkpoint)
    assert problems[0] == "config.json: missing"
    assert problems[1] == "ds/optimizer.pt: 5120 bytes, expected 10240"
    assert problems[2].startswith("tokenizer.json: xxh3_64 of bytes 0-24 is ") and ", expected " in problems[2]
    assert problems[3].startswith("trainer_state.json: not readable JSON")
    assert len(problems) == 4


def test_a_checkpoint_saved_before_manifests_verifies_as_unknown(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    checkpoint = run_dir.save_checkpoint(2, write_checkpoint(2), limit=None)
    (checkpoint / MANIFEST).unlink()
    assert verify(checkpoint) is None


@pytest.mark.faults
def test_resume_auto_sets_a_damaged_checkpoint_aside_and_takes_the_previous_one(tmp_path, caplog):
    run_dir = single_process_run(tmp_path / "run")
    for step in (2, 4):
        run_dir.save_checkpoint(step, write_checkpoint(step), limit=None)
    truncate(run_dir.checkpoint_path(4) / "ds" / "optimizer.pt")
    with caplog.at_level(logging.WARNING, logger="otr.train"):
        assert verified_resume(run_dir, "auto") == run_dir.checkpoint_path(2)
    assert ("checkpoint-4 is damaged since it was saved (ds/optimizer.pt: 5120 bytes, expected 10240): moved to "
            f"{run_dir.checkpoints / 'damaged-checkpoint-4'}, not deleted") in caplog.text
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == ["checkpoint-2", "damaged-checkpoint-4"]
    assert [step for step, _ in run_dir.complete_checkpoints()] == [2]  # pruning and listings no longer see it


@pytest.mark.faults
def test_an_explicit_resume_to_a_damaged_checkpoint_is_refused_naming_the_damage(tmp_path):
    run_dir = single_process_run(tmp_path / "run")
    checkpoint = run_dir.save_checkpoint(2, write_checkpoint(2), limit=None)
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"the checkpoint is damaged since it was saved \(tokenizer.json: "
                                              r"missing\)\. Resume from another checkpoint"):
        verified_resume(run_dir, str(checkpoint))
    assert checkpoint.is_dir()  # an explicit choice is the user's: left where it is


# -- end to end: a run of the tiny model with checkpoints at steps 2 and 4 ---------------------------------------

RUN = ["loss=sft", "trainer.max_steps=4", "trainer.save_steps=2", "trainer.micro_batch_size=2"]


@pytest.fixture(scope="module")
def run_with_two_checkpoints(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-checkpoints") / "run"
    run_cli(["train", *tiny_overrides(tiny_model_dir, out, *RUN)])
    return out


def crashed_copy(run: Path, target: Path) -> Path:
    """A copy of `run` as a node crash after the step-4 save leaves it: its status still running."""
    shutil.copytree(run, target)
    (target / "run_state.json").write_text(json.dumps({"status": "running", "step": 4, "total_steps": 4}))
    return target


def flat(text: str) -> str:
    return "".join(text.split())  # rich wraps a long line anywhere, even inside a path


def said(fragment: str, log: str) -> bool:
    """Whether `fragment` is in `log` (flattened), whatever the wrapping."""
    return flat(fragment) in log


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("damage, named", [
    (lambda c: truncate(c / "ds" / "mp_rank_00_model_states.pt"), "ds/mp_rank_00_model_states.pt: "),
    (lambda c: (c / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda c: truncate(c / "tokenizer.json"), "tokenizer.json: "),
], ids=["truncated-shard", "deleted-export", "truncated-tokenizer"])
def test_resume_auto_falls_back_from_a_damaged_checkpoint_and_the_run_finishes(
        tiny_model_dir, run_with_two_checkpoints, tmp_path, damage, named):
    out = crashed_copy(run_with_two_checkpoints, tmp_path / "run")
    damage(out / "checkpoints" / "checkpoint-4")
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, out, *RUN)])
    log = flat(result.stdout + result.stderr)
    assert said("checkpoint-4 is damaged since it was saved (" + named, log), log[-3000:]
    assert said(f"Resumed from {out / 'checkpoints' / 'checkpoint-2'} at step 2", log)
    assert (out / "checkpoints" / "damaged-checkpoint-4").is_dir()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    assert verify(out / "checkpoints" / "checkpoint-4") == [] and verify(out / "final") == []


@pytest.mark.slow
@pytest.mark.faults
def test_an_explicit_resume_to_a_damaged_checkpoint_stops_with_the_damage_named(
        tiny_model_dir, run_with_two_checkpoints, tmp_path):
    out = crashed_copy(run_with_two_checkpoints, tmp_path / "run")
    step_4 = out / "checkpoints" / "checkpoint-4"
    truncate(step_4 / "tokenizer.json")
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, out, *RUN, f"trainer.resume={step_4}")], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert said("the checkpoint is damaged since it was saved (tokenizer.json: ", flat(result.stderr)), result.stderr[-3000:]
    assert step_4.is_dir()


@pytest.mark.slow
@pytest.mark.faults
def test_a_checkpoint_saved_before_manifests_still_resumes(tiny_model_dir, run_with_two_checkpoints, tmp_path):
    out = crashed_copy(run_with_two_checkpoints, tmp_path / "run")
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
        (checkpoint / MANIFEST).unlink()
    result = run_cli(["train", *tiny_overrides(tiny_model_dir, out, *RUN, "trainer.max_steps=6")])
    log = flat(result.stdout + result.stderr)
    assert said(f"{out / 'checkpoints' / 'checkpoint-4'} has no manifest.json (saved before otr wrote one)", log), log[-3000:]
    assert said(f"Resumed from {out / 'checkpoints' / 'checkpoint-4'} at step 4", log)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.faults
def test_two_ranks_fall_back_alike_from_a_truncated_optimizer_shard(tiny_model_dir, tmp_path):
    from ranks import start_ranks, wait_all

    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *RUN, "deepspeed=zero2", "launcher.dist_timeout_min=2")]

    def two_ranks(logs: Path) -> list:
        logs.mkdir()
        processes = start_ranks(args, logs)
        try:
            return wait_all(processes, timeout=400)
        finally:
            for process in processes:
                process.kill()

    assert two_ranks(tmp_path / "first") == [0, 0], (tmp_path / "first" / "rank0.log").read_text()[-3000:]
    (out / "run_state.json").write_text(json.dumps({"status": "running", "step": 4, "total_steps": 4}))
    truncate(out / "checkpoints" / "checkpoint-4" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    codes = two_ranks(tmp_path / "resumed")
    logs = [flat((tmp_path / "resumed" / f"rank{rank}.log").read_text()) for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:]
    assert said("checkpoint-4 is damaged since it was saved (ds/zero_pp_rank_1_mp_rank_00_optim_states.pt: ", logs[0])
    # Rank 1 logs warnings only; it resumed with rank 0, or their collectives would not have matched.
    assert said(f"Resumed from {out / 'checkpoints' / 'checkpoint-2'} at step 2", logs[0]), logs[0][-3000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.faults
def test_resume_auto_with_no_intact_checkpoint_left_is_an_error_that_a_rerun_meets_again(tmp_path):
    """Starting from step 0 would silently throw the run away: the oldest damaged checkpoint stays in place
    and the error names the ways out; the newer damaged one is set aside as usual."""
    run_dir = single_process_run(tmp_path / "run")
    older = run_dir.save_checkpoint(2, write_checkpoint(2), limit=None)
    newer = run_dir.save_checkpoint(4, write_checkpoint(4), limit=None)
    (older / "config.json").unlink()
    (newer / "config.json").unlink()
    for _ in range(2):  # the same command again meets the same error
        with pytest.raises(CheckpointError, match=r"no intact checkpoint.*trainer.overwrite=true"):
            verified_resume(run_dir, "auto")
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == ["checkpoint-2", "damaged-checkpoint-4"]
