"""The module DeepSpeed trains: a causal LM whose head is applied by the fused token loss.

The LM's own forward would materialise [B, T, V] logits; instead the decoder's hidden states
of the supervised positions go, with the head weight, into ``fused_token_loss``, which never
holds more than one chunk of logits.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from otr_cli.data import IGNORE_INDEX
from otr_cli.data.packing import block_causal_mask
from otr_cli.losses import LossOptions, fused_token_loss, reference_token_loss
from otr_cli.train.micro_batch import SupervisedTokens, supervised_positions
from otr_cli.train.packed_attention import (VARLEN_SDPA, ExampleSpans, base_model, example_spans,
                                            packed_attention_implementation)


def sampling_generator(seed: int, step: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator for one micro-step's OTR draws, derived from (seed, step, micro-step, rank).

    Deriving it, instead of carrying one generator along, means a resumed run (or a
    recomputation) draws exactly the tokens the uninterrupted run drew.
    """
    digest = hashlib.blake2b(f"otr:{seed}:{step}:{micro_step}:{rank}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def _decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    base = base_model(lm)
    return base.get_decoder(), base.get_output_embeddings()


class TokenLossLM(nn.Module):
    """Wraps a ``*ForCausalLM``; ``forward`` returns (loss, stats) instead of logits."""

    def __init__(self, lm: nn.Module, zero_stage: int = 0):
        super().__init__()
        self.lm = lm
        if zero_stage == 3:
            import deepspeed

            # The head weight is read outside lm_head.forward: tell ZeRO-3 to gather it for us.
            _, head = _decoder_and_head(lm)
            deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                row_weights: torch.Tensor, options: LossOptions,
                generator: Optional[torch.Generator] = None, position_ids: Optional[torch.Tensor] = None,
                sequence_index: Optional[torch.Tensor] = None, supervised: Optional[SupervisedTokens] = None,
                packed_spans: Optional[ExampleSpans] = None):
        """Loss of one micro-batch.

        input_ids, attention_mask, labels: [R, T] long; labels are aligned with input_ids
        (position t predicts labels[t + 1]) and IGNORE_INDEX where not supervised.
        row_weights: [R, T] float, the weight of each position's loss (zero where ignored);
        the trainer sets them so that summing over all micro-batches and ranks gives the
        global-batch mean. Returns (loss: 0-dim tensor = sum of weighted token losses, stats).
        position_ids, sequence_index: [R, T] long, given for packed rows (data/packing.py): the
        attention is then confined to each example, and the supervised positions are taken in
        example order, so that the loss kernel (and OTR's draws) sees them in the order an
        unpacked batch of the same examples gives.
        supervised, packed_spans: where the supervised targets are and, for packed rows, each row's example
        spans, found on the host when the micro-batch was collated (train/micro_batch.py): with them a
        micro-batch reads nothing back from the device. Without them they are found here, on the device,
        at the cost of host reads (``nonzero``, the loss kernel's count, ``example_spans``).
        """
        decoder, head = _decoder_and_head(self.lm)
        packed = position_ids is not None
        if packed:
            hidden = decoder(input_ids=input_ids, position_ids=position_ids,
                             **self._packed_attention_arguments(attention_mask, sequence_index, head.weight.dtype,
                                                                packed_spans)).last_hidden_state
        else:
            hidden = decoder(input_ids=input_ids,
                             attention_mask=self._padded_attention_mask(attention_mask, sequence_index, head.weight.dtype)
                             ).last_hidden_state
        if supervised is not None:
            _check_label_range(supervised.label_range, _vocab_size(head.weight))
            positions = supervised.positions
        else:
            positions = supervised_positions(labels, sequence_index if packed else None)
        # Position t's hidden state predicts token t + 1.
        supervised_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
        supervised_targets = labels[:, 1:].reshape(-1).index_select(0, positions)
        supervised_weights = row_weights[:, 1:].reshape(-1).index_select(0, positions)
        loss_fn = fused_token_loss if options.implementation == "fused" else reference_token_loss
        # Without grad mode (validation) the kernel must not build the [V, H] weight gradient.
        head_weight = head.weight if torch.is_grad_enabled() else head.weight.detach()
        weights = supervised_weights.to(torch.promote_types(supervised_hidden.dtype, torch.float32))
        # Every row given to the kernel is supervised; checked on the host, it needs no count from the device.
        return loss_fn(supervised_hidden, head_weight, supervised_targets, options, weights=weights, generator=generator,
                       all_supervised=supervised is not None)

    def _packed_attention_arguments(self, attention_mask: torch.Tensor, sequence_index: torch.Tensor,
                                    dtype: torch.dtype, packed_spans: Optional[ExampleSpans] = None) -> dict:
        """How the model's attention kernel is told where each packed example ends (packed_attention.py).

        sdpa's per-example form: the examples' spans (`packed_spans`, found on the host, else read from
        `sequence_index` here) and a mask it ignores: a 4-D placeholder with host spans (Transformers reads
        no 4-D mask), else the 2-D padding mask. Flash attention: no mask; it finds the examples from the
        restarting position ids. sdpa (not switched) and eager: the block-causal 4-D mask."""
        implementation = packed_attention_implementation(self.lm)
        if implementation == VARLEN_SDPA and packed_spans is not None:
            # The per-example kernel ignores the mask. Transformers would read a 2-D one back (is it all ones?),
            # and with none it would read the position ids (are they packed?); a 4-D mask it passes on unread.
            placeholder = torch.ones((attention_mask.shape[0], 1, 1, 1), dtype=torch.bool, device=attention_mask.device)
            return {"attention_mask": placeholder, "packed_spans": packed_spans}
        if implementation == VARLEN_SDPA:
            return {"attention_mask": attention_mask, "packed_spans": example_spans(sequence_index)}  # a host read
        if implementation.startswith("flash_attention"):
            return {"attention_mask": None}
        return {"attention_mask": block_causal_mask(sequence_index, implementation, dtype)}

    def _padded_attention_mask(self, attention_mask: torch.Tensor, sequence_index: Optional[torch.Tensor],
                               dtype: torch.dtype) -> torch.Tensor:
        """The mask of unpacked, right-padded rows: with `sequence_index` ([R, T], -1 on padding) and sdpa or
        eager attention, the [R, 1, T, T] causal mask without padding, built on the device; Transformers
        would build the same from the 2-D mask, after reading it back to see whether it may skip it."""
        implementation = getattr(base_model(self.lm).config, "_attn_implementation", None)
        if sequence_index is None or implementation not in ("sdpa", VARLEN_SDPA, "eager") or _has_sliding_layers(
                base_model(self.lm).config):
            return attention_mask
        return block_causal_mask(sequence_index, "eager" if implementation == "eager" else "sdpa", dtype)


def _has_sliding_layers(config) -> bool:
    """Whether some attention layers use a sliding window (a plain causal mask would be wrong for them)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return "sliding_attention" in layer_types
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def _vocab_size(head_weight: torch.Tensor) -> int:
    """Rows of the LM head; ZeRO-3 keeps the full shape of a partitioned weight in ``ds_shape``."""
    return int(getattr(head_weight, "ds_shape", head_weight.shape)[0])


def _check_label_range(label_range: tuple[int, int], vocab: int) -> None:
    """ValueError, as the loss kernel's own check gives, for a supervised label outside [0, vocab)."""
    smallest, largest = label_range
    if smallest > largest:  # nothing supervised
        return
    if smallest < 0 or largest >= vocab:
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={IGNORE_INDEX}; this micro-batch "
                         f"has labels from {smallest} to {largest}")
