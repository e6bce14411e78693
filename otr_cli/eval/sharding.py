"""An evaluation split over the ranks of a distributed run: who generates what, and how rank 0 collects it.

Every rank renders all prompts of every benchmark and cuts each benchmark into the length-sorted
batches one process would generate (`plan_batches`); the batches of all benchmarks together are then
dealt over the ranks, heaviest first, each to the rank with the fewest expected tokens so far
(`deal_batches`). The deal is a pure function of the prompts' token lengths and the settings, so
every rank computes the same one without a collective. Each rank generates and grades its own
batches with its own copy of the model, so no rank waits in a collective while another generates,
and writes its graded rows to a shard file per benchmark; after one barrier rank 0 merges the shards
in problem order and writes the result files. Because the batches are those of one process, a greedy
evaluation on W ranks writes exactly what one process writes.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from otr_cli.atomic import write_jsonl_atomic

SHARD_DIR = "shards"
CACHE_PREFIX = "generation_cache"


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class EvalShard:
    """This process's part of an evaluation: its rank, the number of ranks, and a barrier over them."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned(self, batches: list["EvalBatch"]) -> list["EvalBatch"]:
        """The batches of the whole plan (`plan_batches`) this rank generates, in plan order."""
        return deal_batches(batches, self.world_size)[self.rank]

    def cache_file(self, out_dir: Path) -> Path:
        """The generation cache this rank appends to (rank 0 keeps the single-process name)."""
        suffix = "" if self.rank == 0 else f".rank{self.rank}"
        return out_dir / f"{CACHE_PREFIX}{suffix}.jsonl"

    def shard_file(self, out_dir: Path, benchmark: str) -> Path:
        return out_dir / SHARD_DIR / f"{benchmark}.rank{self.rank}-of-{self.world_size}.jsonl"


@dataclass(frozen=True)
class EvalBatch:
    """One batch of an evaluation, as one process would generate it.

    benchmark: its name; indices: positions of its prompts in that benchmark's problem list, shortest
    prompt first; tokens: the positions it computes, rows x samples x (longest prompt + max_new_tokens)
    in tokens (left padding makes every row as long as the longest), the cost the deal balances.
    """

    benchmark: str
    indices: tuple[int, ...]
    tokens: int


def plan_batches(lengths_of: dict[str, list[int]], batch_size: int, max_new_tokens: int,
                 num_samples: int) -> list[EvalBatch]:
    """Every benchmark's length-sorted batches of `batch_size` prompts, benchmarks in the given order.

    lengths_of: {benchmark: token length of each rendered prompt, in problem order}. The batches do not
    depend on the number of ranks, so a sharded or resumed evaluation generates one process's batches.
    """
    from otr_cli.eval.generation import length_sorted_batches

    plan = []
    for name, lengths in lengths_of.items():
        for indices in length_sorted_batches(lengths, batch_size):
            longest = max(lengths[i] for i in indices)
            plan.append(EvalBatch(name, tuple(indices), len(indices) * num_samples * (longest + max_new_tokens)))
    return plan


def deal_batches(plan: list[EvalBatch], world_size: int) -> list[list[EvalBatch]]:
    """The batches of each rank: heaviest batch first, each to the rank with the fewest tokens so far
    (ties: the lower rank). Each rank's list keeps plan order.

    Every rank gets a batch when there are at least `world_size` of them, and no rank's total exceeds
    the mean by more than one batch's tokens. Integer costs and fixed tie-breaks keep the deal the same
    on every rank.
    """
    heaviest_first = sorted(range(len(plan)), key=lambda b: (-plan[b].tokens, b))
    loads = [(0, rank) for rank in range(world_size)]  # a heap of (tokens dealt, rank)
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for b in heaviest_first:
        tokens, rank = heapq.heappop(loads)
        owned[rank].append(b)
        heapq.heappush(loads, (tokens + plan[b].tokens, rank))
    return [[plan[b] for b in sorted(batches)] for batches in owned]


def shard_from_environment(timeout_min: float = 30.0) -> EvalShard:
    """`otr eval` started by torchrun or the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK set): join the
    ranks into a process group (NCCL on GPU, gloo on CPU) used for one barrier. One process otherwise."""
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return EvalShard()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        from otr_cli.placement import bind_cuda_device

        bind_cuda_device()  # the GPU `otr train` would drive: LOCAL_RANK, or the only one the task sees
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=timeout_min))
    return EvalShard(dist.get_rank(), dist.get_world_size(), dist.barrier)


def cache_files(out_dir: Path) -> list[Path]:
    """Every rank's generation cache in `out_dir`: a resumed evaluation reuses completions whatever the
    number of ranks that made them."""
    return sorted(out_dir.glob(f"{CACHE_PREFIX}*.jsonl"))


def write_shard(shard: EvalShard, out_dir: Path, benchmark: str, rows: list[dict]) -> None:
    """This rank's graded rows, each with its problem `index`, written atomically (even when empty)."""
    write_jsonl_atomic(shard.shard_file(out_dir, benchmark), rows)


def merge_shards(out_dir: Path, benchmark: str, world_size: int, num_problems: int) -> list[dict]:
    """All ranks' rows of `benchmark` in problem order, without their `index` (rank 0, after the barrier)."""
    by_index: dict[int, dict] = {}
    for rank in range(world_size):
        path = EvalShard(rank, world_size).shard_file(out_dir, benchmark)
        if not path.is_file():
            raise RuntimeError(f"evaluation shard {path} is missing: rank {rank} did not finish {benchmark}; "
                               f"its log says why")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line:
                row = json.loads(line)
                by_index[row.pop("index")] = row
    if sorted(by_index) != list(range(num_problems)):
        raise RuntimeError(f"evaluation shards of {benchmark} in {out_dir / SHARD_DIR} hold {len(by_index)} of "
                           f"{num_problems} problems")
    return [by_index[i] for i in range(num_problems)]
