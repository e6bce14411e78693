"""The deal of an evaluation's batches over the ranks (eval/sharding.py): pure functions, no model."""

from __future__ import annotations

import random

from otr_cli.eval.sharding import EvalShard, deal_batches, plan_batches


def qwen8b_math_final_plan():
    """recipe=qwen8b_math's final evaluation: GSM8K (1319 problems) and MATH-500, batches of 32, 1024 new
    tokens; prompt lengths drawn at random (the deal depends on them only through the batches' costs)."""
    draw = random.Random(0)
    lengths = {"gsm8k": [draw.randint(80, 400) for _ in range(1319)],
               "math500": [draw.randint(40, 900) for _ in range(500)]}
    return plan_batches(lengths, batch_size=32, max_new_tokens=1024, num_samples=1)


def test_the_final_evaluation_at_64_ranks_gives_no_rank_two_batches_while_another_has_none():
    plan = qwen8b_math_final_plan()
    assert len(plan) == 42 + 16
    counts = [len(batches) for batches in deal_batches(plan, 64)]
    # Dealt per benchmark from rank 0, ranks 0-15 got two batches and ranks 42-63 none.
    assert max(counts) == 1 and sum(counts) == 58


def test_the_deal_balances_expected_tokens_within_one_batch():
    plan = qwen8b_math_final_plan()
    for world in (3, 8, 24):
        loads = [sum(batch.tokens for batch in batches) for batches in deal_batches(plan, world)]
        heaviest_batch = max(batch.tokens for batch in plan)
        assert max(loads) - sum(loads) / world <= heaviest_batch, world
        assert min(loads) > 0
    # Rank 0 takes the heaviest batch: its longest stretch between stop checks is the evaluation's.
    heaviest = max(plan, key=lambda batch: batch.tokens)
    assert heaviest in deal_batches(plan, 8)[0]


def test_the_ranks_together_generate_one_processs_batches_each_once():
    plan = qwen8b_math_final_plan()
    dealt = [batch for rank in range(8) for batch in EvalShard(rank, 8).owned(plan)]
    assert sorted(dealt, key=plan.index) == plan
    assert EvalShard(0, 1).owned(plan) == plan


def test_a_batch_costs_its_rows_times_samples_times_longest_prompt_plus_new_tokens():
    plan = plan_batches({"a": [5, 3, 9, 4], "b": [7]}, batch_size=2, max_new_tokens=10, num_samples=3)
    assert [(batch.benchmark, batch.indices, batch.tokens) for batch in plan] == [
        ("a", (1, 3), 2 * 3 * (4 + 10)), ("a", (0, 2), 2 * 3 * (9 + 10)), ("b", (0,), 1 * 3 * (7 + 10))]
