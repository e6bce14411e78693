"""Batch order with a token budget (trainer.max_tokens_per_batch) and with data.group_by_length:
still a pure function of (seed, step), the same global batches on any number of ranks."""

from __future__ import annotations

import random
import statistics

import pytest

from otr_cli.train.batches import StepPlan

_draw = random.Random(0)
LENGTHS = tuple(_draw.randint(40, 300) for _ in range(203))


def budget_plan(world_size: int = 1, grad_accum: int = 2, budget: int = 1000, seed: int = 5) -> StepPlan:
    return StepPlan(len(LENGTHS), micro_batch_size=4, grad_accum=grad_accum, world_size=world_size, seed=seed,
                    lengths=LENGTHS, max_tokens_per_batch=budget)


def test_token_budget_fills_micro_batches_up_to_the_budget():
    plan = budget_plan()
    for step in range(10):
        micro_batches = plan.rank_micro_batches(step, 0)
        assert len(micro_batches) == 2  # grad_accum forward passes, whatever the lengths
        for micro in micro_batches:
            tokens = sum(LENGTHS[i] for i in micro)
            assert tokens <= 1000
    # Greedy in order: a micro-batch ends only where the next example would not fit, or at the epoch's end.
    table = plan._epoch_micro_batches(0)
    for micro, following in zip(table, table[1:]):
        assert sum(LENGTHS[i] for i in micro) + LENGTHS[following[0]] > 1000


def test_token_budget_order_is_a_pure_function_of_seed_and_step_across_epochs():
    plan = budget_plan()
    steps = plan.steps_for_epochs(3)
    assert steps == budget_plan().steps_for_epochs(3)
    # A fresh plan (a resumed run) asked for a late step first gives what the first plan gives.
    fresh = budget_plan()
    for step in (steps - 1, 0, steps // 2):
        assert fresh.rank_micro_batches(step, 0) == plan.rank_micro_batches(step, 0)
    assert budget_plan(seed=6).rank_micro_batches(0, 0) != plan.rank_micro_batches(0, 0)
    # Each epoch uses every example once.
    seen = [i for step in range(plan.steps_for_epochs(1)) for i in plan.global_indices(step)]
    epoch_0 = sum(len(micro) for micro in plan._epoch_micro_batches(0))
    assert sorted(seen[:epoch_0]) == list(range(len(LENGTHS)))
    assert plan.epoch_at(plan.steps_for_epochs(1)) == pytest.approx(1.0, abs=2 / len(plan._epoch_micro_batches(0)))


def test_token_budget_gives_two_ranks_the_global_batches_of_one_rank():
    one = budget_plan(world_size=1, grad_accum=4)
    two = budget_plan(world_size=2, grad_accum=2)
    for step in range(6):
        rank_0, rank_1 = two.rank_micro_batches(step, 0), two.rank_micro_batches(step, 1)
        assert len(rank_0) == len(rank_1) == 2
        assert sorted(i for micro in rank_0 + rank_1 for i in micro) == sorted(one.global_indices(step))


def _spread(plan: StepPlan, steps: int) -> float:
    """Mean over micro-batches of (longest - shortest) tokens: the padding a micro-batch carries."""
    spreads = [max(LENGTHS[i] for i in micro) - min(LENGTHS[i] for i in micro)
               for step in range(steps) for micro in plan.rank_micro_batches(step, 0)]
    return statistics.mean(spreads)


def test_group_by_length_batches_examples_of_similar_length_in_a_seeded_order():
    def plan(group: bool, seed: int = 5, world_size: int = 1, grad_accum: int = 2) -> StepPlan:
        return StepPlan(len(LENGTHS), micro_batch_size=4, grad_accum=grad_accum, world_size=world_size, seed=seed,
                        lengths=LENGTHS, group_by_length=group)

    grouped, plain = plan(True), plan(False)
    assert sorted(grouped._permutation(0)) == list(range(len(LENGTHS)))
    assert _spread(grouped, 20) < _spread(plain, 20) / 4
    assert grouped.rank_micro_batches(7, 0) == plan(True).rank_micro_batches(7, 0)
    assert grouped._permutation(0) != plan(True, seed=6)._permutation(0)
    assert grouped._permutation(0) != grouped._permutation(1)  # a new order every epoch
    # The long micro-batches are not all first: the chunk order inside a mega-batch is shuffled.
    firsts = [max(LENGTHS[i] for i in grouped.rank_micro_batches(step, 0)[0]) for step in range(20)]
    assert firsts != sorted(firsts, reverse=True)
    two = plan(True, world_size=2, grad_accum=1)
    for step in range(5):
        assert two.rank_micro_batches(step, 0) + two.rank_micro_batches(step, 1) == grouped.rank_micro_batches(step, 0)


def test_plan_without_lengths_refuses_length_options():
    with pytest.raises(ValueError, match="length of every example"):
        StepPlan(10, 2, 1, 1, seed=0, group_by_length=True)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_tokens_per_batch=2048"], "trainer.max_tokens_per_batch=2048 fills micro-batches with packed rows: "
                                            "set data.packing=true"),
    (["data.packing=true", "trainer.max_tokens_per_batch=100", "data.max_length=512"],
     "trainer.max_tokens_per_batch=100 is below data.max_length=512"),
    (["data.packing=true", "data.pack_length=256", "data.max_length=512"],
     "data.pack_length=256 is below data.max_length=512"),
    (["trainer.max_tokens_per_batch=-1"], "trainer.max_tokens_per_batch=-1 must be >= 0"),
])
def test_packing_settings_that_cannot_work_are_start_up_errors_naming_the_key(overrides, message):
    from omegaconf import OmegaConf

    from otr_cli.config import ConfigError, TrainConfig, validate

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(overrides))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_packing_refuses_an_attention_kernel_it_cannot_mask(tiny_model_dir):
    import torch

    from otr_cli.config import ConfigError
    from otr_cli.models import load_model
    from otr_cli.train.packed_attention import packed_attention_implementation

    lm = load_model(str(tiny_model_dir), dtype=torch.float32)
    assert packed_attention_implementation(lm) == "sdpa"
    lm.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="model.attn_implementation=sdpa or data.packing=false"):
        packed_attention_implementation(lm)


def test_dry_run_prints_the_token_budget_arithmetic(capsys):
    from otr_cli.cli import main

    main(["train", "recipe=smollm2_demo", "dry_run=true", "data.packing=true", "trainer.max_tokens_per_batch=4096", "trainer.grad_accum=2"])
    out = " ".join(capsys.readouterr().out.split())
    assert "micro-batches of up to 4096 tokens x grad accumulation 2 x world size 1 = up to 8192 tokens per step" in out


@pytest.mark.faults
def test_resume_check_allows_other_ranks_with_the_same_global_batches_and_names_what_changed(tmp_path):
    import json

    from otr_cli.train.checkpoints import CheckpointError, check_same_data_order

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    saved = budget_plan(world_size=1, grad_accum=2)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "data_order": saved.order_settings()}))
    check_same_data_order(checkpoint, budget_plan(world_size=2, grad_accum=1).order_settings())  # same batches
    unpacked = StepPlan(len(LENGTHS), micro_batch_size=4, grad_accum=2, world_size=1, seed=5)
    assert unpacked.order_settings() == StepPlan(len(LENGTHS), micro_batch_size=2, grad_accum=2, world_size=2,
                                                 seed=5).order_settings()
    with pytest.raises(CheckpointError, match=r"trainer.grad_accum x ranks: 2 -> 4.*model.name_or_path="):
        check_same_data_order(checkpoint, budget_plan(world_size=2, grad_accum=2).order_settings())
    with pytest.raises(CheckpointError, match=r"seed: 5 -> 6"):
        check_same_data_order(checkpoint, budget_plan(seed=6).order_settings())
    grouped = StepPlan(len(LENGTHS), micro_batch_size=4, grad_accum=2, world_size=1, seed=5, lengths=LENGTHS,
                       group_by_length=True)
    with pytest.raises(CheckpointError, match=r"data.group_by_length: False -> True"):
        check_same_data_order(checkpoint, grouped.order_settings())
    # Checkpoints written before otr recorded the order are resumed unchecked.
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2}))
    check_same_data_order(checkpoint, grouped.order_settings())
