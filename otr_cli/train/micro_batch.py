"""A training micro-batch on its way from the collated host tensors to the device, without host synchronisations.

Where the supervised targets are, how many there are, and where each packed example starts are all known
on the host when the micro-batch is collated. Found there (``supervised_tokens``, ``example_spans`` on host
tensors), they cost the device nothing; found on the device, each would be a host read that waits for every
kernel queued before it (``nonzero``, ``.tolist()``, ``.cpu()``). The tensors then go to the device from
pinned memory with non-blocking copies: a copy from pageable memory blocks the host until it is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from otr_cli.data import IGNORE_INDEX
from otr_cli.train.packed_attention import ExampleSpans, example_spans


@dataclass(frozen=True)
class SupervisedTokens:
    """The supervised targets of a micro-batch of [R, T] labels (position t of a row predicts labels[t + 1]).

    positions: [n] int64, indices into ``labels[:, 1:].reshape(-1)``, in example order (example by
      example, then position by position: the order an unpacked batch of the same examples gives, which
      OTR's draws follow); on the host until ``to`` moves them.
    count: n, a host int.
    label_range: (smallest, largest) supervised label, host ints ((0, -1) when n = 0), so that the model
      checks them against its vocabulary without reading the device.
    """

    positions: torch.Tensor
    count: int
    label_range: tuple[int, int]

    def to(self, device: torch.device) -> "SupervisedTokens":
        return SupervisedTokens(copy_to_device(self.positions, device), self.count, self.label_range)


def supervised_positions(labels: torch.Tensor, sequence_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[n] int64 indices into ``labels[:, 1:].reshape(-1)`` of the supervised targets of [R, T] int64 labels.

    sequence_index: [R, T] int64, each position's example (-1 on padding), for packed rows, whose
    targets are then put in example order; None: each row is one example, and row order is example order.
    On host tensors this costs the device nothing; on device tensors ``nonzero`` is a host read
    (TokenLossLM's path for callers that pass no ``SupervisedTokens``).
    """
    targets = labels[:, 1:].reshape(-1)
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if sequence_index is not None:
        # Example by example, then position by position: sort on (example, flat position).
        target_example = sequence_index[:, 1:].reshape(-1)[positions]
        positions = positions[torch.argsort(target_example * targets.numel() + positions)]
    return positions


def supervised_tokens(labels: torch.Tensor, sequence_index: Optional[torch.Tensor] = None) -> SupervisedTokens:
    """The ``SupervisedTokens`` of host [R, T] int64 labels (see ``supervised_positions``)."""
    positions = supervised_positions(labels, sequence_index)
    if positions.numel() == 0:
        return SupervisedTokens(positions, 0, (0, -1))
    supervised = labels[:, 1:].reshape(-1)[positions]
    return SupervisedTokens(positions, positions.numel(), (int(supervised.min()), int(supervised.max())))


def copy_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` without blocking the host: from pinned memory on CUDA (the caching host
    allocator keeps the pinned block until the copy has run); unchanged where device is the CPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch ready for TokenLossLM.

    tensors: the collated [R, T] tensors (data/collate.py, data/packing.py) on the device.
    supervised: its supervised targets, positions on the device.
    packed_spans: each packed row's (start, end) example spans (host ints), None for unpacked rows.
    """

    tensors: dict[str, torch.Tensor]
    supervised: SupervisedTokens
    packed_spans: Optional[ExampleSpans]

    @property
    def packed(self) -> bool:
        return "position_ids" in self.tensors

    def model_kwargs(self) -> dict:
        """TokenLossLM.forward's keywords for what was found on the host (and, packed, the rows' layout)."""
        # sequence_index of unpacked rows too: TokenLossLM builds their mask from it, reading nothing back.
        kwargs = {"supervised": self.supervised, "sequence_index": self.tensors["sequence_index"]}
        if self.packed:
            kwargs.update(position_ids=self.tensors["position_ids"], sequence_index=self.tensors["sequence_index"],
                          packed_spans=self.packed_spans)
        return kwargs


def micro_batch_to_device(host_batch: dict[str, torch.Tensor], device: torch.device) -> MicroBatch:
    """Find the supervised targets (and packed spans) of a collated micro-batch on the host, then copy it to
    `device` without a host synchronisation."""
    packed = "position_ids" in host_batch
    sequence_index = host_batch["sequence_index"] if packed else None
    supervised = supervised_tokens(host_batch["labels"], sequence_index)
    spans = example_spans(sequence_index) if packed else None
    tensors = {key: copy_to_device(value, device) for key, value in host_batch.items()}
    return MicroBatch(tensors, supervised.to(device), spans)
