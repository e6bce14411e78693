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
    """Hugging Face's trainer_state.json and otr's otr_state.json of a checkpoint, merged."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    otr_file = checkpoint / "otr_state.json"
    return {**state, **(json.loads(otr_file.read_text()) if otr_file.is_file() else {})}


def as_interrupted(out: Path) -> None:
    """The run directory as a run stopped after its last checkpoint leaves it (not finished, no final/)."""
    shutil.rmtree(out / "final")
    (out / "run_state.json").write_text(json.dumps({"status": "preempted"}))


@pytest.mark.slow
def test_an_hf_tool_finds_the_last_checkpoint_of_an_otr_run_and_reads_hf_trainer_state(tiny_model_dir, tmp_path):
    from transformers import TrainerState
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
    # transformers reads the file as its own TrainerState (it refuses a key it does not know) ...
    loaded = TrainerState.load_from_json(str(out / "checkpoints" / "checkpoint-4" / "trainer_state.json"))
    assert loaded.global_step == 4 and loaded.log_history == history
    # ... and otr's own fields sit beside it, in otr_state.json.
    otr_state = json.loads((out / "checkpoints" / "checkpoint-4" / "otr_state.json").read_text())
    assert otr_state["step"] == 4 and "data_order" in otr_state and "topology" in otr_state
    assert otr_state["save_time_s"] >= 0 and otr_state["checkpoint_bytes"] > 0  # the background sizing's rewrite
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


@pytest.mark.slow
def test_a_checkpoint_with_otr_fields_inside_trainer_state_json_resumes(tiny_model_dir, tmp_path):
    """Checkpoints written before otr_state.json kept otr's fields in trainer_state.json, beside Hugging Face's."""
    out = tmp_path / "mixed"
    train(tiny_model_dir, out, "trainer.max_steps=2", "trainer.save_steps=2")
    as_interrupted(out)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    merged = state_of(checkpoint)
    (checkpoint / "otr_state.json").unlink()
    (checkpoint / "trainer_state.json").write_text(json.dumps(merged))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["files"]["otr_state.json"]  # as that version's manifest listed the files
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    records = train(tiny_model_dir, out, "trainer.max_steps=4", "trainer.save_steps=2")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
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


def test_a_saves_log_history_comes_from_memory_not_from_rereading_metrics_jsonl(tmp_path):
    """metrics.jsonl grows with every step: each save would otherwise read it whole on rank 0, the others waiting."""
    from otr_cli.train.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n")
    log = MetricsLog(path, enabled=True)
    log.truncate_after(1)  # a resume at step 1
    assert log.records() == [{"step": 1, "loss": 2.0}]
    log.write({"step": 2, "loss": 1.25, "lr": (1e-5)})
    log.write({"step": 2, "val_ce": 1.0})
    assert log.records() == read_metrics(path)
    with path.open("a") as handle:  # a line the log did not write: the kept records do not re-read the file
        handle.write(json.dumps({"step": 99}) + "\n")
    assert [r["step"] for r in log.records()] == [1, 2, 2]
    log.truncate_after(2)  # re-read after a truncation
    assert log.records() == read_metrics(path) and [r["step"] for r in log.records()] == [1, 2, 2]
