"""Padding-free micro-batches: the examples of a micro-batch packed into a few rows (``data.packing``).

Each row holds whole examples, concatenated. With an attention kernel that attends within each
example by itself (sdpa's per-example form, flash attention's variable-length path:
train/packed_attention.py) a micro-batch is one row with no padding at all. Eager attention needs a
block-causal mask, quadratic in the row's length, so its rows hold at most ``data.pack_length``
tokens (default ``data.max_length``): one long masked row per micro-batch would spend the saved
compute on a mostly empty block-diagonal mask (docs/benchmarks/bench_packing.md measures both).

What keeps packed training equal to unpacked training (tests/test_packing.py):
- position ids restart at 0 at every example;
- ``sequence_index`` names each position's example; the model builds a block-causal mask from it
  (``block_causal_mask``), so no token attends to another example;
- the label of each example's first token is IGNORE_INDEX: in a row, the previous example's last
  position would otherwise learn to predict it (unpacked, nothing predicts position 0);
- the loss normalisers count examples through ``sequence_index``, never rows
  (train/batches.loss_weights).
"""

from __future__ import annotations

from typing import Optional

import torch

from otr_cli.data.examples import IGNORE_INDEX, TokenizedExample


def pack_rows(lengths: list[int], row_capacity: int) -> list[list[int]]:
    """Example indices of each row, a pure function of `lengths` (ties broken by index).

    lengths: tokens of each example, each at most `row_capacity`. First-fit decreasing finds how
    many rows are needed; the examples are then dealt, longest first, to the row with the fewest
    tokens so far (within capacity), so the rows come out of similar length and the padding to the
    longest row is small. Where that deal does not fit, the first-fit rows are kept.
    """
    too_long = [i for i, length in enumerate(lengths) if length > row_capacity]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than a packed row's "
                         f"{row_capacity} (data.pack_length must be at least data.max_length)")
    longest_first = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    first_fit: list[list[int]] = []
    free: list[int] = []
    for index in longest_first:
        row = next((row for row, room in enumerate(free) if lengths[index] <= room), None)
        if row is None:
            first_fit.append([])
            free.append(row_capacity)
            row = len(free) - 1
        first_fit[row].append(index)
        free[row] -= lengths[index]
    balanced: list[list[int]] = [[] for _ in first_fit]
    filled = [0] * len(first_fit)
    for index in longest_first:
        row = min(range(len(balanced)), key=lambda r: (filled[r], r))
        if filled[row] + lengths[index] > row_capacity:
            return first_fit
        balanced[row].append(index)
        filled[row] += lengths[index]
    return balanced


def collate_packed(examples: list[TokenizedExample], pad_token_id: int,
                   row_capacity: Optional[int]) -> dict[str, torch.Tensor]:
    """Pack a micro-batch's examples into rows of at most `row_capacity` tokens, right-padded to the longest row.

    row_capacity None: one row holding the whole micro-batch, without any padding (for the attention
    kernels that find the examples themselves, train/packed_attention.py).

    Returns [R, T] tensors (R rows, T = longest row's tokens):
      input_ids (int64): the examples' tokens, `pad_token_id` after the row's last example;
      attention_mask (int64): 1 on real tokens, 0 on padding (counts tokens; the model's mask is
        built from sequence_index);
      position_ids (int64): 0, 1, ... within every example, and again from 0 over the padding tail;
      sequence_index (int64): the position's example, as an index into `examples`; -1 on padding;
      labels (int64): the examples' labels (not shifted), IGNORE_INDEX at each example's first token
        and on padding;
      weights (float32): each label's loss weight (1 where an example has none), 0 on padding.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    lengths = [len(example.input_ids) for example in examples]
    for index, example in enumerate(examples):
        if len(example.labels) != lengths[index]:
            raise ValueError(f"example {index}: {lengths[index]} input ids but {len(example.labels)} labels")
    rows = [list(range(len(examples)))] if row_capacity is None else pack_rows(lengths, row_capacity)
    longest = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            example, end = examples[index], start + lengths[index]
            input_ids[row, start:end] = torch.tensor(example.input_ids, dtype=torch.long)
            attention_mask[row, start:end] = 1
            position_ids[row, start:end] = torch.arange(lengths[index])
            sequence_index[row, start:end] = index
            labels[row, start:end] = torch.tensor(example.labels, dtype=torch.long)
            labels[row, start] = IGNORE_INDEX
            weights[row, start:end] = 1.0 if example.weights is None else torch.tensor(example.weights)
            start = end
        position_ids[row, start:] = torch.arange(longest - start)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "sequence_index": sequence_index, "labels": labels, "weights": weights}


def block_causal_mask(sequence_index: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D attention mask of packed rows: position i sees position j iff j <= i in the same example.

    sequence_index: [R, T] int64 (-1 on padding; padding positions see the padding before them, so
    no query row is empty and no real token sees padding).
    Returns [R, 1, T, T]: bool (True: attend) for sdpa; for eager attention, which adds the mask to
    the scores, `dtype` with 0 where allowed and the dtype's most negative value elsewhere.
    """
    length = sequence_index.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_index.device).tril()
    allowed = (sequence_index[:, :, None] == sequence_index[:, None, :]) & causal
    allowed = allowed[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed
