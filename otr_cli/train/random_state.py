"""The global random generators (Python, NumPy, torch CPU and CUDA): seeding, and their per-rank checkpoint files.

What draws from them during training is what should differ between ranks: dropout (LoRA's, the
model's). Everything that must be one function of the seed draws from a generator of its own
instead: the data order (train/batches.py, seeded by (seed, epoch)) and OTR's rollouts
(token_loss_model.sampling_generator, seeded by (seed, step, micro-step, rank)). So:

- ``seed_everything(seed)`` seeds every rank alike, for what is built before training (the model's
  and LoRA's initial weights, which all ranks must share);
- ``seed_for_rank(seed, rank, step)`` then gives each rank a stream of its own, so that two ranks
  with micro-batches of the same shape do not apply the same dropout masks;
- a checkpoint holds each rank's own states (``save_rank_states``), restored by that rank on
  resume (``restore_rank_states``). DeepSpeed's client state is no place for them: under ZeRO 0-2 it
  is written by rank 0 alone, and every rank would resume with rank 0's states.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from otr_cli.atomic import write_atomic

log = logging.getLogger("otr.train")


def seed_everything(seed: int) -> None:
    """The same seed on every generator (and every rank): for what all ranks must build alike."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # CPU and every CUDA device


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed derived from (seed, rank, step), unrelated for neighbouring values of each."""
    digest = hashlib.blake2b(f"global-rng:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_for_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed every generator from (seed, rank, step): each rank's dropout draws its own masks.

    step: the optimizer step training continues from (0 for a fresh run), so that a run resumed
    without its saved states does not replay the draws of its first steps.
    """
    seed_everything(rank_seed(seed, rank, step))


def rng_states() -> dict[str, Any]:
    """This process's generator states (the CUDA entry on CUDA builds with a device only)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def rank_states_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rng_states_rank{rank}.pt"


def save_rank_states(directory: Path, rank: int, world_size: int) -> Path:
    """Write this rank's generator states to `directory` (inside a checkpoint's temporary directory),
    atomically: a file that exists is whole. Returns its path."""
    path = rank_states_path(directory, rank)
    write_atomic(path, lambda handle: torch.save({"rank": rank, "world_size": world_size, "states": rng_states()},
                                                 handle))
    return path


def read_rank_states(directory: Path, rank: int, world_size: int) -> Optional[dict[str, Any]]:
    """This rank's saved states, or None when the checkpoint has none for it or was written by another
    number of ranks (rank r of a different world is a different stream of micro-batches)."""
    path = rank_states_path(directory, rank)
    if not path.exists():
        return None
    # The run's own file (NumPy's state is an array, which weights_only refuses).
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("world_size") != world_size or saved.get("rank") != rank:
        return None
    return saved["states"]


def restore_rank_states(directory: Path, rank: int, world_size: int, seed: int, step: int,
                        single_process_states: Optional[dict[str, Any]] = None) -> bool:
    """Put back this rank's generator states from a checkpoint; True if they were found.

    Otherwise (the rank count changed, or the checkpoint predates per-rank states) the generators are
    seeded from (seed, rank, step), with a log line: training goes on with fresh dropout draws.
    single_process_states: the states older checkpoints kept in DeepSpeed's client state, right
    for a one-process run only.
    """
    states = read_rank_states(directory, rank, world_size)
    if states is None and world_size == 1 and single_process_states is not None:
        states = single_process_states
    if states is not None:
        restore_rng_states(states)
        return True
    log.info("The checkpoint holds no random-generator states for rank %d of %d ranks (written by another number "
             "of ranks, or before they were saved per rank): seeding them from (seed, rank, step %d); dropout "
             "draws differ from an uninterrupted run's", rank, world_size, step)
    seed_for_rank(seed, rank, step)
    return False
