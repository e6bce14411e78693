"""Batched greedy generation with a KV cache, left padding and length-sorted batches."""

from __future__ import annotations

from typing import Callable, Optional

import torch


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int,
                         on_batch: Optional[Callable[[int], None]] = None) -> list[str]:
    """Greedy completions for `prompts` (already chat-rendered), in the input order.

    Prompts are sorted by length so each batch pads little; padding is on the left so every
    sequence's next token sits at the same position.
    """
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[Optional[str]] = [None] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            encoded = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            for index, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                completions[index] = text
            if on_batch:
                on_batch(len(indices))
    finally:
        tokenizer.padding_side = previous_side
    return [c or "" for c in completions]
