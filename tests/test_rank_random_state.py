"""Each rank's global random generators: their own dropout masks, their own states saved and resumed."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from helpers import read_jsonl, tiny_overrides
from otr_cli.train.random_state import (read_rank_states, restore_rank_states, rng_states, save_rank_states,
                                        seed_everything, seed_for_rank)
from test_train_distributed import torchrun


def _dropout_mask(shape=(64, 32)) -> torch.Tensor:
    return torch.nn.functional.dropout(torch.ones(shape), p=0.5) != 0


def test_seed_for_rank_gives_each_rank_its_own_dropout_masks_and_the_same_ones_again():
    seed_for_rank(7, rank=0)
    rank0 = _dropout_mask()
    seed_for_rank(7, rank=1)
    rank1 = _dropout_mask()
    seed_for_rank(7, rank=0)
    assert torch.equal(_dropout_mask(), rank0)
    assert not torch.equal(rank0, rank1)
    seed_for_rank(7, rank=0, step=5)  # a run resumed without its states does not replay step 0's masks
    assert not torch.equal(_dropout_mask(), rank0)


def test_a_ranks_saved_states_are_restored_by_that_rank_alone(tmp_path, caplog):
    seed_everything(3)
    torch.rand(5)
    saved = rng_states()["torch"].clone()
    save_rank_states(tmp_path, rank=1, world_size=2)
    expected_next = torch.rand(4)
    seed_everything(99)
    assert restore_rank_states(tmp_path, rank=1, world_size=2, seed=3, step=2)
    assert torch.equal(rng_states()["torch"], saved)
    assert torch.equal(torch.rand(4), expected_next)
    assert read_rank_states(tmp_path, rank=0, world_size=2) is None  # rank 0 wrote nothing here
    with caplog.at_level(logging.INFO, logger="otr.train"):
        # Resumed on 4 ranks: rank 1 of 4 is not rank 1 of 2; seeded per (seed, rank, step) instead.
        assert not restore_rank_states(tmp_path, rank=1, world_size=4, seed=3, step=2)
    assert "seeding them from (seed, rank, step 2)" in caplog.text
    fallback = torch.rand(4)
    seed_for_rank(3, rank=1, step=2)
    assert torch.equal(torch.rand(4), fallback)


@pytest.mark.slow
def test_two_rank_zero2_lora_dropout_run_resumes_each_rank_with_its_own_random_states(tiny_model_dir, tmp_path):
    """LoRA dropout draws from the global generator: ranks draw different masks, and after a ZeRO-2 resume
    (whose DeepSpeed client state comes from rank 0 alone) each rank goes on with its own stream, so the
    resumed run logs the losses of the uninterrupted one."""
    common = ["loss=sft", "deepspeed=zero2", "model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.3",
              "trainer.micro_batch_size=2", "trainer.save_steps=2", "trainer.max_steps=4"]
    torchrun(["train", *tiny_overrides(tiny_model_dir, tmp_path / "full", *common)])
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    (cut / "run_state.json").write_text('{"status": "running"}')
    torchrun(["train", *tiny_overrides(tiny_model_dir, cut, *common)])

    full = [r for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    resumed = [r for r in read_jsonl(cut / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for left, right in zip(full, resumed, strict=True):
        assert right["loss"] == pytest.approx(left["loss"], rel=1e-5), f"step {left['step']}"
    saved = [read_rank_states(cut / "checkpoints" / "checkpoint-2" / "ds", rank, world_size=2) for rank in (0, 1)]
    assert None not in saved, "each rank's states are in the checkpoint"
    assert not torch.equal(saved[0]["torch"], saved[1]["torch"]), "the ranks draw from streams of their own"
