"""A first tokenization shared by every rank, in short rounds, with its finished chunks kept on disk.

A data set that is not in the tokenized-data cache yet is cut into chunks of ``CHUNK_RECORDS``
records (in the shuffled order). In each round every rank encodes one chunk, stores it in the
entry's progress directory (``<cache>/.<key>.partial/``), and the ranks exchange how many examples
each chunk kept: a small collective every few seconds, never a wait as long as the whole job. The
rounds stop once the chunks hold ``data.max_examples`` kept examples (or the records run out); every
rank takes that decision from the same exchanged counts. A run killed half-way (a time limit, a
requeue) finds the stored chunks and encodes only the rest; a chunk that cannot be read is encoded
again.

On W ranks the first tokenization takes about 1/W of one process's time. Merging the chunks into
the cache entry is then one rank's work (data/pipeline.py), which the others wait for in a process
group whose timeout is ``launcher.data_timeout_min``, not the training collectives' timeout.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from otr_cli.atomic import write_atomic
from otr_cli.data.errors import DataError
from otr_cli.data.tokenized import ARRAY_DTYPES, TokenizedSplit

log = logging.getLogger(__name__)

CHUNK_RECORDS = 2048  # about 4 s of rendering and tokenizing at 2 ms a record: the longest wait between rounds
_FAILED = -1  # a rank's kept count that says its chunk failed


@dataclass(frozen=True)
class DataRanks:
    """The ranks that build the data together, and the collectives they use for it.

    group: a torch.distributed process group (gloo, so it runs on CPU tensors beside NCCL) whose
    timeout covers one rank's longest solo work on the data (reading and hashing the records,
    merging the chunks); None with one process.
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a JSON-able object)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]

    def gather_int(self, value: int) -> list[int]:
        """Every rank's `value`, by rank."""
        if self.world_size == 1:
            return [value]
        import torch
        import torch.distributed as dist

        values = torch.zeros(self.world_size, dtype=torch.int64)
        values[self.rank] = value
        dist.all_reduce(values, group=self.group)
        return values.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


ONE_PROCESS = DataRanks()


def data_ranks(timeout_min: float) -> DataRanks:
    """The DataRanks of the initialised default process group, with a gloo group of `timeout_min`
    (collective: every rank calls it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ONE_PROCESS
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_min))
    return DataRanks(dist.get_rank(), dist.get_world_size(), group)


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks encoded for one split: their record indices (in the encoding order) and kept counts."""

    chunks: list[list[int]]
    kept: list[int]


# encode_chunk(record indices, limit) -> (the examples as a TokenizedSplit, JSON-able counts)
EncodeChunk = Callable[[list[int], Optional[int]], tuple[TokenizedSplit, dict]]


def chunk_path(progress_dir: Path, name: str, index: int) -> Path:
    return progress_dir / f"{name}.{CHUNK_RECORDS}.{index:07d}.npz"


def save_chunk(path: Path, split: TokenizedSplit, counts: dict) -> None:
    """The chunk as one .npz, written under a temporary name and renamed: a reader sees all of it or nothing."""
    counts_bytes = np.frombuffer(json.dumps(counts, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    write_atomic(path, lambda handle: np.savez(handle, counts_json=counts_bytes, **split.arrays()))


def load_chunk(path: Path) -> tuple[TokenizedSplit, dict]:
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in ARRAY_DTYPES if name in stored.files}
        counts = json.loads(stored["counts_json"].tobytes().decode("utf-8"))
    return TokenizedSplit(**arrays), counts


def _stored_chunk(path: Path) -> Optional[tuple[TokenizedSplit, dict]]:
    """A chunk an earlier (killed) start stored, or None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        return load_chunk(path)
    except Exception as exc:  # truncated by a crash: encode it again
        log.warning("data: stored chunk %s is unreadable (%s: %s); encoding it again", path, type(exc).__name__, exc)
        return None


def encode_in_rounds(name: str, order: list[int], limit: Optional[int], encode_chunk: EncodeChunk,
                     ranks: DataRanks, progress_dir: Optional[Path],
                     memory: dict[int, tuple[TokenizedSplit, dict]]) -> ChunkPlan:
    """Encode `order` chunk by chunk, rank r taking chunk k*W + r in round k, until `limit` examples are kept.

    progress_dir: where chunks are stored (None: kept in `memory`, a dict the caller owns; one process only).
    memory: chunk index -> (split, counts), used only without a progress directory.
    Every rank returns the same plan. A chunk that fails on any rank raises on every rank: the failing one
    its own error (which names the record), the others a DataError naming that rank.
    """
    chunks = [order[start:start + CHUNK_RECORDS] for start in range(0, len(order), CHUNK_RECORDS)]
    kept: list[int] = []
    reused = 0
    started = time.perf_counter()
    for round_start in range(0, len(chunks), ranks.world_size):
        mine = round_start + ranks.rank
        count, failure = 0, None
        if mine < len(chunks):
            try:
                path = chunk_path(progress_dir, name, mine) if progress_dir is not None else None
                stored = _stored_chunk(path) if path is not None else None
                if stored is None:
                    split, counts = encode_chunk(chunks[mine], None)
                    if path is not None:
                        save_chunk(path, split, counts)
                    else:
                        memory[mine] = (split, counts)
                else:
                    reused += 1
                    split = stored[0]
                count = len(split)
            except Exception as exc:
                failure, count = exc, _FAILED
        counts_by_rank = ranks.gather_int(count)
        if _FAILED in counts_by_rank:
            if failure is not None:
                raise failure
            raise DataError(f"rank {counts_by_rank.index(_FAILED)} could not tokenize its share of the {name} "
                            f"records; its log names the record")
        kept += counts_by_rank[:max(0, min(ranks.world_size, len(chunks) - round_start))]
        if limit is not None and sum(kept) >= limit:
            break
        if ranks.is_main and (round_start // ranks.world_size) % 50 == 49:
            log.info("data: %s: %d of %d records tokenized (%.0f s)", name,
                     min(len(kept) * CHUNK_RECORDS, len(order)), len(order), time.perf_counter() - started)
    if reused and ranks.is_main:
        log.info("data: %s: reused chunks that an earlier start stored in %s", name, progress_dir)
    return ChunkPlan(chunks[:len(kept)], kept)


def read_chunk(progress_dir: Optional[Path], memory: dict, name: str, index: int,
               wait_s: float = 120.0) -> tuple[TokenizedSplit, dict]:
    """Chunk `index` of `name`, waiting up to `wait_s` for a file another rank wrote to appear (a shared file
    system may show it late)."""
    if progress_dir is None:
        return memory[index]
    path = chunk_path(progress_dir, name, index)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return load_chunk(path)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise DataError(f"{path} was stored by another rank but is not visible here after {wait_s:.0f} s; "
                                f"is data.cache_dir on a file system every node shares?") from None
            time.sleep(1.0)
