"""Checkpoints in the Hugging Face layout (checkpoint-N, HF's trainer_state.json fields), old-layout runs that
still resume, and the best checkpoint by trainer.metric_for_best (kept, in final/, early stopping)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import read_jsonl, tiny_overrides

from otr_cli.cli import main
from otr_cli.train.best_checkpoint import BestTracker


def train(tiny_model_dir, out, *extra):
    main(["train", *tiny_overrides(tiny_model_dir, out, "loss=sft", *extra)])
    return read_jsonl(out / "metrics.jsonl")


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def as_interrupted(out: Path) -> None:
    """The run directory as a run stopped after its last checkpoint leaves it (not finished, no final/)."""
    shutil.rmtree(out / "final")
    (out / "run_state.json").write_text(json.dumps({"status": "preempted"}))


@pytest.mark.slow
def test_an_hf_tool_finds_the_last_checkpoint_of_an_otr_run_and_reads_hf_trainer_state(tiny_model_dir, tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "run"
    records = train(tiny_model_dir, out, "trainer.max_steps=4", "trainer.save_steps=2", "trainer.eval_steps=2")
    assert get_last_checkpoint(str(out / "checkpoints")) == str(out / "checkpoints" / "checkpoint-4")
    state = state_of(out / "checkpoints" / "checkpoint-4")
    assert state["global_step"] == 4 and state["max_steps"] == 4 and state["save_steps"] == 2
    assert state["logging_steps"] == 1 and state["train_batch_size"] == 4 and state["epoch"] > 0
    assert state["best_metric"] is None and state["best_model_checkpoint"] is None
    history = state["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    assert all("learning_rate" in entry for entry in history if "loss" in entry)
    assert [entry["eval_loss"] for entry in history if "eval_loss" in entry] == [
        r["val_ce"] for r in records if "val_ce" in r and r["step"] <= 4][:2]
    # otr's own fields stay beside Hugging Face's.
    assert state["step"] == 4 and "data_order" in state and "topology" in state
    assert [e["step"] for e in state_of(out / "checkpoints" / "checkpoint-2")["log_history"] if "loss" in e] == [1, 2]


@pytest.mark.slow
def test_a_run_in_the_old_step_n_layout_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "old"
    train(tiny_model_dir, out, "trainer.max_steps=2", "trainer.save_steps=2")
    as_interrupted(out)
    old = out / "checkpoints" / "step-2"
    (out / "checkpoints" / "checkpoint-2").rename(old)
    state = state_of(old)  # as otr wrote it then: its own fields only
    (old / "trainer_state.json").write_text(json.dumps({k: state[k] for k in (
        "step", "epoch", "total_steps", "global_batch", "seed", "max_tokens_per_batch", "data_order", "topology",
        "data_fingerprint")}))
    records = train(tiny_model_dir, out, "trainer.max_steps=4", "trainer.save_steps=2")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # steps 3-4 trained after the resume
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "step-2"]
    assert state_of(out / "checkpoints" / "checkpoint-4")["global_step"] == 4


BEST_RUN = ("trainer.max_steps=8", "trainer.eval_steps=1", "trainer.save_steps=1", "trainer.save_total_limit=1",
            "trainer.metric_for_best=val_ce")


@pytest.fixture(scope="module")
def worst_is_best_run(tiny_model_dir, tmp_path_factory):
    """A run whose validation CE falls at every step, with greater_is_better=true: the best checkpoint is the
    first, never the last; final_model=best, patience 2 (a stop at step 3)."""
    out = tmp_path_factory.mktemp("best") / "run"
    records = train(tiny_model_dir, out, *BEST_RUN, "trainer.greater_is_better=true", "trainer.final_model=best",
                    "trainer.early_stopping_patience=2")
    return out, records


@pytest.mark.slow
def test_save_total_limit_keeps_the_best_checkpoint_when_it_is_not_the_last(worst_is_best_run):
    out, records = worst_is_best_run
    val = {r["step"]: r["val_ce"] for r in records if "val_ce" in r}
    assert val[1] > val[2] > val[3], val  # so step 1 is the best by greater_is_better=true
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-3"]
    state = state_of(out / "checkpoints" / "checkpoint-3")
    assert state["best_model_checkpoint"] == str(out / "checkpoints" / "checkpoint-1")
    assert state["best_metric"] == val[1] and state["best_global_step"] == 1


@pytest.mark.slow
def test_final_model_best_puts_the_best_checkpoint_in_final(worst_is_best_run):
    out, _ = worst_is_best_run
    best = (out / "checkpoints" / "checkpoint-1" / "model.safetensors").read_bytes()
    assert (out / "final" / "model.safetensors").read_bytes() == best
    assert (out / "checkpoints" / "checkpoint-3" / "model.safetensors").read_bytes() != best


@pytest.mark.slow
def test_early_stopping_patience_stops_the_run_with_a_clean_finish(worst_is_best_run):
    out, records = worst_is_best_run
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # of trainer.max_steps=8
    assert any("early_stopping" in r and r["step"] == 3 for r in records)
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    assert json.loads((out / "summary.json").read_text())["stopped_early_at_step"] == 3
    assert (out / "final" / "manifest.json").is_file()


@pytest.mark.slow
def test_resume_keeps_the_best_record(tiny_model_dir, tmp_path):
    out = tmp_path / "resumed"
    train(tiny_model_dir, out, *BEST_RUN[1:], "trainer.max_steps=2", "trainer.greater_is_better=true")
    as_interrupted(out)
    assert state_of(out / "checkpoints" / "checkpoint-2")["best"]["step"] == 1
    train(tiny_model_dir, out, *BEST_RUN[1:], "trainer.max_steps=4", "trainer.greater_is_better=true")
    # The best (step 1, recorded in checkpoint-2) outlived the resume and every later prune.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-4"]
    assert state_of(out / "checkpoints" / "checkpoint-4")["best_model_checkpoint"] == str(
        out / "checkpoints" / "checkpoint-1")


@pytest.mark.parametrize("greater, values, best_step, stop_after", [
    (False, [3.0, 2.0, 2.5, 2.4], 2, 4),
    (True, [0.1, 0.3, 0.2, 0.3], 2, 4),
])
def test_best_tracker_follows_the_metrics_direction_and_counts_evaluations_without_improvement(
        greater, values, best_step, stop_after):
    tracker = BestTracker("m", greater, patience=2)
    for step, value in enumerate(values, start=1):
        tracker.observe(step, value, Path(f"checkpoint-{step}"))
        assert tracker.should_stop() == (step >= stop_after)
    assert tracker.step == best_step and tracker.checkpoint == f"checkpoint-{best_step}"


def test_a_new_best_within_the_early_stopping_threshold_counts_as_no_improvement():
    tracker = BestTracker("val_ce", False, patience=1, threshold=0.5)
    tracker.observe(1, 3.0, Path("a"))
    tracker.observe(2, 2.8, Path("b"))  # better, so the best, but by less than the threshold
    assert tracker.step == 2 and tracker.should_stop()


@pytest.mark.slow
def test_two_ranks_take_the_same_best_and_early_stopping_decisions(tiny_model_dir, tmp_path):
    from ranks import start_ranks, wait_all

    out = tmp_path / "two"
    args = ["train", *tiny_overrides(tiny_model_dir, out, "loss=sft", "deepspeed=zero2", "trainer.micro_batch_size=2",
                                     *BEST_RUN, "trainer.greater_is_better=true", "trainer.final_model=best",
                                     "trainer.early_stopping_patience=2")]
    processes = start_ranks(args, tmp_path)
    codes = wait_all(processes, timeout=600)
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert json.loads((out / "summary.json").read_text())["stopped_early_at_step"] == 3
    assert (out / "final" / "model.safetensors").read_bytes() == (
        out / "checkpoints" / "checkpoint-1" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_benchmark_score_as_metric_for_best_keeps_and_records_the_best(tiny_model_dir, tmp_path):
    out = tmp_path / "scored"
    overrides = [o for o in tiny_overrides(tiny_model_dir, out, "loss=sft") if o != "eval=none"]
    main(["train", *overrides, "eval=synthetic_arith", "eval.limit=2", "eval.batch_size=2", "eval.max_new_tokens=4",
          "eval.before_training=false", "eval.after_warmup=false", "eval.every_steps=1", "eval.every_steps_limit=2",
          "trainer.max_steps=6", "trainer.save_steps=1", "trainer.save_total_limit=1",
          "trainer.metric_for_best=eval/synthetic_arith", "trainer.early_stopping_patience=2"])
    scores = {r["step"]: r["eval/synthetic_arith"] for r in read_jsonl(out / "metrics.jsonl")
              if "eval/synthetic_arith" in r}
    # A random tiny model scores the same at every step: no evaluation improves on the first.
    assert scores == {1: scores[1], 2: scores[1], 3: scores[1]}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert json.loads((out / "summary.json").read_text())["stopped_early_at_step"] == 3
    # The score of a step comes after its save: the checkpoint's trainer_state.json is rewritten with it.
    assert state_of(out / "checkpoints" / "checkpoint-1")["best_global_step"] == 1
    assert state_of(out / "checkpoints" / "checkpoint-3")["best_model_checkpoint"] == str(
        out / "checkpoints" / "checkpoint-1")
    assert state_of(out / "checkpoints" / "checkpoint-3")["best"]["evaluations_without_improvement"] == 2
