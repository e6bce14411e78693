"""Deterministic, resumable batch order: which examples each rank sees at each step.

The training stream is the concatenation of per-epoch permutations seeded by (seed, epoch).
Optimizer step s consumes stream positions [s * G, (s + 1) * G), G the global batch; rank r
takes micro-batches r, r + W, ... of those. The order depends only on (seed, step), so a
resumed run needs nothing but the step counter to continue where it stopped, and one process
and many see the same global batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from otr_cli.data import IGNORE_INDEX


@dataclass(frozen=True)
class StepPlan:
    num_examples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    shuffle: bool = True

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.num_examples / self.global_batch))

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps (fractional)."""
        return step * self.global_batch / self.num_examples

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def global_indices(self, step: int) -> list[int]:
        """Example indices of the whole global batch of optimizer step `step` (0-based)."""
        start = step * self.global_batch
        indices: list[int] = []
        epoch, offset = divmod(start, self.num_examples)
        permutation = self._permutation(epoch)
        while len(indices) < self.global_batch:
            take = permutation[offset: offset + self.global_batch - len(indices)]
            indices.extend(take)
            offset += len(take)
            if offset >= self.num_examples:
                epoch, offset = epoch + 1, 0
                permutation = self._permutation(epoch)
        return indices

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's `grad_accum` micro-batches (lists of example indices) for `step`."""
        indices = self.global_indices(step)
        micro = [indices[i: i + self.micro_batch_size] for i in range(0, len(indices), self.micro_batch_size)]
        return micro[rank:: self.world_size]



def padded_shard_starts(num_examples: int, batch_size: int, rank: int, world_size: int) -> list[Optional[int]]:
    """This rank's batch start offsets over a fixed set of `num_examples`, padded with None to a common length.

    Batches are dealt round-robin (rank r takes batches r, r + W, ...); every rank gets
    ceil(batches / W) entries, None where it has no batch of its own in the last round. Callers
    run a forward pass for every entry (a filler batch for None) so that under ZeRO-3, where each
    forward is a collective, no rank waits for a forward pass another rank never makes.
    """
    num_batches = math.ceil(num_examples / batch_size)
    rounds = math.ceil(num_batches / world_size)
    batch_indices = (rank + k * world_size for k in range(rounds))
    return [index * batch_size if index < num_batches else None for index in batch_indices]

def loss_weights(batch: dict[str, torch.Tensor], reduction: str, global_tokens: int, global_sequences: int,
                 replicas: int) -> torch.Tensor:
    """[B, T] float32 weight of each position's token loss.

    token: 1 / (supervised tokens in the global batch); sequence: 1 / (tokens of that sequence
    x sequences in the global batch), as in the paper. Multiplied by `replicas` (grad accum x
    world size) because DeepSpeed divides the loss by grad accumulation and averages gradients
    over ranks, and we want the gradient of the global-batch mean.

    The data's loss weights (batch["weights"], [B, T] float, optional) multiply each token's
    share; the normalisers stay counts of supervised tokens and sequences (weight-0 tokens are not
    supervised, so they are not counted). A weight is thus an absolute factor, the same in every
    batch, rather than a share renormalised within each batch.
    """
    labels = batch["labels"]
    supervised = torch.zeros_like(labels, dtype=torch.float32)
    supervised[:, 1:] = (labels[:, 1:] != IGNORE_INDEX).float()
    data_weights = batch.get("weights")
    if reduction == "token":
        shares = supervised * (replicas / max(global_tokens, 1))
    else:
        per_sequence = supervised.sum(dim=1, keepdim=True).clamp(min=1)
        shares = supervised / per_sequence * (replicas / max(global_sequences, 1))
    return shares if data_weights is None else shares * data_weights.to(shares.device, torch.float32)

