"""Deterministic, resumable batch order: which examples each rank sees at each step.

The training stream is the concatenation of per-epoch permutations seeded by (seed, epoch).
Optimizer step s consumes stream positions [s * G, (s + 1) * G), G the global batch; rank r
takes micro-batches r, r + W, ... of those. The order depends only on (seed, step), so a
resumed run needs nothing but the step counter to continue where it stopped, and one process
and many see the same global batches.

Two options change what a micro-batch is, never that purity:
- ``group_by_length``: each epoch's permutation is cut into mega-batches of GROUP_MEGA_BATCHES
  global batches, each sorted by length and cut into micro-batches, whose order within the
  mega-batch is shuffled again; a micro-batch then holds examples of similar length.
- ``max_tokens_per_batch`` (packed runs): each epoch's permutation is cut into micro-batches of
  as many examples as fit in that many tokens; step s takes micro-batches [s * M, (s + 1) * M)
  of the concatenated epochs, M = grad_accum x world size, so every rank still makes grad_accum
  forward passes per step (one collective pattern under ZeRO-3) while the examples per step vary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from otr_cli.data import IGNORE_INDEX

# Global batches per group_by_length mega-batch: large enough that lengths repeat within one,
# small enough that the epoch order stays random at the scale of a few hundred steps.
GROUP_MEGA_BATCHES = 50


@dataclass(frozen=True)
class StepPlan:
    num_examples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    shuffle: bool = True
    # Tokens of each example: needed by group_by_length and max_tokens_per_batch.
    lengths: Optional[tuple[int, ...]] = None
    group_by_length: bool = False
    max_tokens_per_batch: int = 0
    # Token-budget mode: each epoch's micro-batches, computed once (not part of the plan's identity).
    _epoch_tables: dict = field(default_factory=dict, compare=False, repr=False)
    # The grouped order of the epochs in use: sorting a large epoch at every step would cost seconds.
    _grouped_orders: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if (self.group_by_length or self.max_tokens_per_batch) and (
                self.lengths is None or len(self.lengths) != self.num_examples):
            raise ValueError("group_by_length and max_tokens_per_batch need the length of every example")

    @property
    def micro_batches_per_step(self) -> int:
        return self.grad_accum * self.world_size

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step; with a token budget, the nominal micro_batch_size x grad_accum x ranks."""
        return self.micro_batch_size * self.grad_accum * self.world_size

    def order_settings(self) -> dict:
        """What decides which examples each step trains on (recorded in checkpoints, compared on resume).

        Ranks may change on resume when the global batch does not: the global batches stay the same.
        """
        settings = {"seed": self.seed, "shuffle": self.shuffle, "num_examples": self.num_examples,
                    "group_by_length": self.group_by_length, "max_tokens_per_batch": self.max_tokens_per_batch}
        if self.max_tokens_per_batch:
            settings["micro_batches_per_step"] = self.micro_batches_per_step
        else:
            settings["global_batch"] = self.global_batch
        if self.group_by_length:
            settings["micro_batch_size"] = self.micro_batch_size  # grouping cuts sorted runs into micro-batches
        return settings

    def steps_for_epochs(self, epochs: float) -> int:
        if self.max_tokens_per_batch:
            whole = int(epochs)
            micro = sum(len(self._epoch_micro_batches(e)) for e in range(whole))
            micro += (epochs - whole) * len(self._epoch_micro_batches(whole))
            return max(1, math.ceil(micro / self.micro_batches_per_step - 1e-9))
        return max(1, math.ceil(epochs * self.num_examples / self.global_batch))

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps (fractional)."""
        if self.max_tokens_per_batch:
            epoch, offset = self._locate(step * self.micro_batches_per_step)
            return epoch + offset / len(self._epoch_micro_batches(epoch))
        return step * self.global_batch / self.num_examples

    def _permutation(self, epoch: int) -> list[int]:
        if self.group_by_length and epoch in self._grouped_orders:
            return self._grouped_orders[epoch]
        if not self.shuffle:
            order = list(range(self.num_examples))
        else:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        if not self.group_by_length:
            return order
        if len(self._grouped_orders) >= 2:  # a step spans two epochs at most, unless the data is tiny
            self._grouped_orders.pop(min(self._grouped_orders))
        self._grouped_orders[epoch] = self._grouped_by_length(order, epoch)
        return self._grouped_orders[epoch]

    def _grouped_by_length(self, order: list[int], epoch: int) -> list[int]:
        """`order` with each mega-batch sorted by length (longest first) and its micro-batch-sized
        chunks put in a random order of their own, seeded by (seed, epoch)."""
        mega = self.global_batch * GROUP_MEGA_BATCHES
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7_919)
        grouped: list[int] = []
        for start in range(0, len(order), mega):
            by_length = sorted(order[start: start + mega], key=lambda i: (-self.lengths[i], i))
            chunks = [by_length[i: i + self.micro_batch_size] for i in range(0, len(by_length), self.micro_batch_size)]
            for chunk in torch.randperm(len(chunks), generator=generator).tolist():
                grouped.extend(chunks[chunk])
        return grouped

    def global_indices(self, step: int) -> list[int]:
        """Example indices of the whole global batch of optimizer step `step` (0-based)."""
        if self.max_tokens_per_batch:
            return [index for micro in self._step_micro_batches(step) for index in micro]
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
        if self.max_tokens_per_batch:
            micro = self._step_micro_batches(step)
        else:
            indices = self.global_indices(step)
            micro = [indices[i: i + self.micro_batch_size] for i in range(0, len(indices), self.micro_batch_size)]
        return micro[rank:: self.world_size]

    # -- token budget ----------------------------------------------------------------------------
    def _epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s permutation cut, in order, into micro-batches of at most max_tokens_per_batch tokens."""
        if epoch not in self._epoch_tables:
            micro: list[list[int]] = []
            tokens = 0
            for index in self._permutation(epoch):
                if micro and tokens + self.lengths[index] <= self.max_tokens_per_batch:
                    micro[-1].append(index)
                    tokens += self.lengths[index]
                else:
                    micro.append([index])
                    tokens = self.lengths[index]
            self._epoch_tables[epoch] = micro
        return self._epoch_tables[epoch]

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, index within that epoch's micro-batches) of micro-batch `position` of the stream."""
        epoch = 0
        while position >= len(self._epoch_micro_batches(epoch)):
            position -= len(self._epoch_micro_batches(epoch))
            epoch += 1
        return epoch, position

    def _step_micro_batches(self, step: int) -> list[list[int]]:
        """The M = grad_accum x world size micro-batches of `step`, continuing into the next epoch when one ends."""
        epoch, offset = self._locate(step * self.micro_batches_per_step)
        micro: list[list[int]] = []
        while len(micro) < self.micro_batches_per_step:
            table = self._epoch_micro_batches(epoch)
            micro.extend(table[offset: offset + self.micro_batches_per_step - len(micro)])
            epoch, offset = epoch + 1, 0
        return micro


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
    """[R, T] float32 weight of each position's token loss.

    token: 1 / (supervised tokens in the global batch); sequence: 1 / (tokens of that sequence
    x sequences in the global batch), as in the paper. Multiplied by `replicas` (grad accum x
    world size) because DeepSpeed divides the loss by grad accumulation and averages gradients
    over ranks, and we want the gradient of the global-batch mean.

    A sequence is an example, found through batch["sequence_index"] ([R, T] int64, -1 on padding),
    so a packed row holding several examples (data/packing.py) normalises each one by its own
    tokens, exactly as unpacked; without it, each row is one example.

    The data's loss weights (batch["weights"], [R, T] float, optional) multiply each token's
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
        sequence_index = batch.get("sequence_index")
        if sequence_index is None:
            sequence_index = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
        slot = sequence_index.clamp(min=0)  # padding is unsupervised: its slot's count is never read
        # Sized by positions, an upper bound on the examples: reading slot.max() would wait for the GPU.
        per_sequence = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
        per_sequence.index_add_(0, slot.reshape(-1), supervised.reshape(-1))
        shares = supervised / per_sequence[slot].clamp(min=1) * (replicas / max(global_sequences, 1))
    return shares if data_weights is None else shares * data_weights.to(shares.device, torch.float32)
