"""Which examples each rank takes: the training plan and the padded validation shards."""

from __future__ import annotations

import pytest

from otr_cli.train.batches import StepPlan, padded_shard_starts


@pytest.mark.parametrize("num_examples,batch_size,world", [(5, 2, 2), (1, 4, 8), (64, 4, 8), (17, 3, 4), (3, 1, 2)])
def test_validation_shards_give_every_rank_the_same_number_of_forward_passes(num_examples, batch_size, world):
    shards = [padded_shard_starts(num_examples, batch_size, rank, world) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1
    starts = sorted(start for shard in shards for start in shard if start is not None)
    assert starts == list(range(0, num_examples, batch_size))  # each batch exactly once


def test_validation_shards_put_fillers_only_in_the_last_round():
    assert padded_shard_starts(5, 2, 0, 2) == [0, 4]
    assert padded_shard_starts(5, 2, 1, 2) == [2, None]


def test_every_rank_gets_grad_accum_micro_batches_of_a_full_global_batch():
    plan = StepPlan(num_examples=10, micro_batch_size=2, grad_accum=2, world_size=3, seed=0)
    for step in range(4):  # wraps into the next epoch
        per_rank = [plan.rank_micro_batches(step, rank) for rank in range(3)]
        assert all(len(micro) == 2 and all(len(batch) == 2 for batch in micro) for micro in per_rank)
        assert sorted(i for micro in per_rank for batch in micro for i in batch) == sorted(plan.global_indices(step))
