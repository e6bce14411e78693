"""Pad a list of tokenized examples into one batch of tensors."""

from __future__ import annotations

import torch

from otr_cli.data.examples import IGNORE_INDEX, TokenizedExample


def collate_batch(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch.

    Returns int64 tensors of shape [B, T], T = longest example:
      input_ids: padded with `pad_token_id`;
      attention_mask: 1 on real tokens, 0 on padding;
      labels: the examples' labels (not shifted), IGNORE_INDEX (-100) on padding;
      sequence_index: the row's example (its index in `examples`, = the row), -1 on padding;
    and float32 [B, T] weights: each label's loss weight (1 where an example has none, 0 on padding).
    Padding is found from lengths, never from token ids (pad may equal the end-of-turn token).
    """
    if not examples:
        raise ValueError("collate_batch needs at least one example")
    longest = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    sequence_index = torch.full((len(examples), longest), -1, dtype=torch.long)
    weights = torch.zeros((len(examples), longest), dtype=torch.float32)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        if len(example.labels) != length:
            raise ValueError(f"example {row}: {length} input ids but {len(example.labels)} labels")
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        sequence_index[row, :length] = row
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        if example.weights is None:
            weights[row, :length] = 1.0
        else:
            weights[row, :length] = torch.tensor(example.weights, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights,
            "sequence_index": sequence_index}
