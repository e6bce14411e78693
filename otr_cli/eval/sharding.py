"""An evaluation split over the ranks of a distributed run: who generates what, and how rank 0 collects it.

Every rank renders all prompts and cuts them into the same length-sorted batches; rank r owns batches
r, r + W, ... (round-robin, so every rank gets short and long prompts alike). Each rank generates and
grades its own batches with its own copy of the model, so no rank waits in a collective while another
generates, and writes its graded rows to a shard file; after one barrier rank 0 merges the shards in
problem order and writes the result files. Because the batches are those of one process, a greedy
evaluation on W ranks writes exactly what one process writes.
"""

from __future__ import annotations

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

    def owned(self, batches: list[list[int]]) -> list[list[int]]:
        """The batches this rank generates."""
        return batches[self.rank::self.world_size]

    def cache_file(self, out_dir: Path) -> Path:
        """The generation cache this rank appends to (rank 0 keeps the single-process name)."""
        suffix = "" if self.rank == 0 else f".rank{self.rank}"
        return out_dir / f"{CACHE_PREFIX}{suffix}.jsonl"

    def shard_file(self, out_dir: Path, benchmark: str) -> Path:
        return out_dir / SHARD_DIR / f"{benchmark}.rank{self.rank}-of-{self.world_size}.jsonl"


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
