"""Checkpoint saves: how long each takes, the warning against launcher.signal_delay_s, and the dry run's size estimate."""

from __future__ import annotations

import json

import pytest

from helpers import read_jsonl, tiny_overrides
from otr_cli.cli import main
from otr_cli.config import TrainConfig
from otr_cli.train.checkpoint_size import (ModelSize, describe_estimate, directory_bytes, estimate_checkpoint,
                                           estimate_for_run)
from otr_cli.train import save_timing
from otr_cli.train.save_timing import slow_save_warning


def test_a_save_over_half_the_signal_delay_is_warned_about():
    assert slow_save_warning(59.9, signal_delay_s=120) is None
    warning = slow_save_warning(75.2, signal_delay_s=120)
    assert "took 75.2 s, more than half of launcher.signal_delay_s=120" in warning
    assert "at least 151" in warning


def test_an_8b_zero3_checkpoint_is_estimated_at_about_115_gb():
    # Qwen3-8B: 8.19e9 parameters; bf16 export 2 bytes each, fp32 master + Adam moments 12 bytes each.
    estimate = estimate_checkpoint(ModelSize(8_190_735_360), dtype_bytes=2, zero_stage=3, world_size=8,
                                   mixed_precision=True)
    assert estimate.total_bytes == pytest.approx(8_190_735_360 * 14, rel=1e-6)
    assert estimate.other_rank_bytes == pytest.approx(8_190_735_360 * 12 / 8, rel=1e-6)
    assert estimate.rank0_bytes == estimate.other_rank_bytes + 8_190_735_360 * 2
    lines = describe_estimate(estimate, save_total_limit=2)
    assert "one checkpoint: 115 GB in total over 8 rank(s)" in lines
    assert "per rank: rank 0 writes 28.7 GB, each other rank 12.3 GB" in lines


def test_checkpoints_without_an_export_are_estimated_without_the_model_safetensors():
    # trainer.export_every_save=false: Qwen3-8B under ZeRO-3 on 8 ranks, rank 0 writes what the others do.
    estimate = estimate_checkpoint(ModelSize(8_190_735_360), dtype_bytes=2, zero_stage=3, world_size=8,
                                   mixed_precision=True, hf_export=False)
    assert estimate.total_bytes == pytest.approx(8_190_735_360 * 12, rel=1e-6)
    assert estimate.rank0_bytes == estimate.other_rank_bytes
    assert not any("Hugging Face" in what for what, _, _ in estimate.parts)


def test_lora_checkpoints_hold_the_adapter_optimizer_state_only():
    full = estimate_checkpoint(ModelSize(1_000_000), dtype_bytes=4, zero_stage=2, world_size=2, mixed_precision=False)
    lora = estimate_checkpoint(ModelSize(1_000_000, lora_parameters=10_000), dtype_bytes=4, zero_stage=2,
                               world_size=2, mixed_precision=False)
    optimizer = {what: size for what, size, _ in lora.parts}["optimizer (fp32 master + Adam moments)"]
    assert optimizer == 10_000 * 12
    assert lora.total_bytes < full.total_bytes


def tiny_config(tiny_model_dir, *changes) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.name_or_path = str(tiny_model_dir)
    for change in changes:
        change(cfg)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zero0", "zero3"])
def test_each_save_is_timed_and_the_estimate_matches_the_real_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                                         preset):
    out = tmp_path / preset
    logged = []  # otr's logging set-up replaces the root handlers, caplog's included
    monkeypatch.setattr(save_timing.log, "info", lambda message, *args: logged.append(message % args))
    # signal_delay_s=0: every save takes more than half of it, so every save warns.
    main(["train", *tiny_overrides(tiny_model_dir, out, f"deepspeed={preset}", "trainer.max_steps=2",
                                   "trainer.save_steps=1", "launcher.signal_delay_s=0")])
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "otr_state.json").read_text())
    assert state["step"] == 2 and state["save_time_s"] > 0
    # Measured before these two fields were added to otr_state.json.
    assert state["checkpoint_bytes"] == pytest.approx(directory_bytes(out / "checkpoints" / "checkpoint-2"), abs=100)
    assert [line.split(" saved in ")[0] for line in logged if " saved in " in line] == ["checkpoint-1",
                                                                                         "checkpoint-2"]
    # Sized by rank 0's background thread, which the end of the run waits for.
    assert [line.split(":")[0] for line in logged if "as seen from rank 0" in line] == ["checkpoint-1",
                                                                                       "checkpoint-2"]
    warnings = [r for r in read_jsonl(out / "metrics.jsonl") if "warning" in r]
    assert [r["step"] for r in warnings] == [1, 2]
    assert "more than half of launcher.signal_delay_s=0" in warnings[0]["warning"]

    stage = int(preset[-1])
    estimate = estimate_for_run(tiny_config(tiny_model_dir, lambda c: setattr(c.deepspeed, "zero_stage", stage)),
                                on_gpu=False, world_size=1)
    print(f"{preset}: estimated {estimate.total_bytes} bytes, saved {state['checkpoint_bytes']}")
    assert estimate.total_bytes == pytest.approx(state["checkpoint_bytes"], rel=0.2)


def test_the_dry_run_prints_the_checkpoint_size_per_rank_and_in_total(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # left behind by an in-process training
    main(["train", "recipe=smollm2_demo", f"model.name_or_path={tiny_model_dir}", "deepspeed=zero3", "launcher.nodes=2",
          "launcher.tasks_per_node=4", "launcher.name=slurm", "dry_run=true"])
    out = " ".join(capsys.readouterr().out.split())
    assert "checkpoint size (world size 8, ZeRO-3, CPU)" in out
    assert "per rank: rank 0 writes" in out and "each other rank" in out
    assert "in total over 8 rank(s)" in out
    assert "dry run: nothing was loaded or written." in out


def test_the_longest_evaluation_stretch_counts_against_the_signal_notice():
    # Issue #25 item 10: a signal during an evaluation waits for the current batch before the save starts.
    assert slow_save_warning(30.0, signal_delay_s=120, evaluation_s=29.0) is None
    warning = slow_save_warning(30.0, signal_delay_s=120, evaluation_s=45.0)
    assert "took 30.0 s and an evaluation can go 45.0 s" in warning and "75.0 s together" in warning
    assert "at least 150" in warning and "eval.batch_size" in warning


@pytest.mark.slow
def test_a_save_after_an_evaluation_is_warned_about_with_the_evaluations_stretch(tiny_model_dir, tmp_path):
    from helpers import SHARED_DATA

    out = tmp_path / "evaluating"
    # signal_delay_s=0: every save warns. The save at step 2 comes before that step's evaluation, the one at
    # step 4 after it, so only the second counts an evaluation's stretch.
    main(["train", *tiny_overrides(tiny_model_dir, out, "trainer.max_steps=4", "trainer.save_steps=2",
                                   "launcher.signal_delay_s=0", "eval=quick", "eval.benchmarks=[gsm8k]",
                                   f"eval.data_dir={SHARED_DATA}", "eval.batch_size=2", "eval.max_new_tokens=4",
                                   "eval.every_steps=2", "eval.every_steps_limit=2")])
    warnings = {r["step"]: r["warning"] for r in read_jsonl(out / "metrics.jsonl") if "warning" in r}
    assert sorted(warnings) == [2, 4]
    assert "an evaluation can go" not in warnings[2]
    assert "an evaluation can go" in warnings[4] and "s together" in warnings[4]
