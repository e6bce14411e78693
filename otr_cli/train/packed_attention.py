"""Attention over packed rows: how each attention kernel is told where one example ends.

A packed row (data/packing.py) holds several examples; a token must attend only to the tokens before
it in its own example. Each kernel gets that differently:

- ``sdpa`` (the default, and the only fast kernel on CPU) is switched to ``otr_sdpa_varlen`` for packed
  runs: the same PyTorch ``scaled_dot_product_attention``, called once per example with ``is_causal``,
  so packed rows need no mask and no padding, and attention costs what each example alone costs. It is
  what flash attention's variable-length path does, in a loop over the examples of the micro-batch.
  Unpacked batches (validation) go through Transformers' own sdpa path unchanged.
- ``flash_attention_2`` / ``flash_attention_3`` find the examples from the restarting position ids
  (their variable-length path).
- ``eager`` adds a block-causal mask (``block_causal_mask``), quadratic in the row's length, so its
  rows are bounded (``data.pack_length``, default ``data.max_length``).

The kernels with a variable-length path take a micro-batch as one row without any padding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from otr_cli.config import ConfigError, DataConfig

VARLEN_SDPA = "otr_sdpa_varlen"
VARLEN_KERNELS = (VARLEN_SDPA, "flash_attention_2", "flash_attention_3")
PACKED_ATTENTION = ("sdpa", "eager", *VARLEN_KERNELS)

# Rows are runs of (start, end) token spans, one per example, then the padding tail if any.
ExampleSpans = tuple[tuple[tuple[int, int], ...], ...]


def example_spans(sequence_index: torch.Tensor) -> ExampleSpans:
    """The (start, end) spans of consecutive equal `sequence_index` values in each row.

    sequence_index: [R, T] int64 (data/packing.collate_packed; -1 on the padding tail, which becomes
    a span of its own so that every position gets an output). One host read per micro-batch.
    """
    length = sequence_index.shape[1]
    starts = (sequence_index[:, 1:] != sequence_index[:, :-1]).cpu()
    rows = []
    for row_starts in starts:
        edges = [0, *(row_starts.nonzero().squeeze(1) + 1).tolist(), length]
        rows.append(tuple(zip(edges[:-1], edges[1:])))
    return tuple(rows)


def sdpa_per_example(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     packed_spans: Optional[ExampleSpans] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers attention function ``otr_sdpa_varlen``.

    query: [R, H, T, D]; key, value: [R, H_kv, T, D] (grouped-query heads are handled by Transformers'
    sdpa function). Returns ([R, T, H, D], None) like every Transformers attention function.
    With `packed_spans` (TokenLossLM passes them for packed rows) each span attends causally to itself
    only and `attention_mask` is ignored; without them this is Transformers' sdpa attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None:
        # A per-example causal call has no window; eager's mask and flash attention have one.
        raise ConfigError("data.packing with sdpa does not support sliding-window attention layers: set "
                          "model.attn_implementation=eager (or flash_attention_2 on GPU)")
    rows = []
    for row_query, row_key, row_value, spans in zip(query.split(1), key.split(1), value.split(1), packed_spans):
        # split, not slicing: its backward is one concatenation, where each slice's backward would
        # add a zero-filled full-length gradient per example.
        lengths = [end - start for start, end in spans]
        pieces = [sdpa_attention_forward(module, example_query, example_key, example_value, None, dropout=dropout,
                                         scaling=scaling, is_causal=True)[0]
                  for example_query, example_key, example_value in zip(
                      row_query.split(lengths, dim=2), row_key.split(lengths, dim=2), row_value.split(lengths, dim=2))]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def register_varlen_sdpa() -> None:
    """Make ``otr_sdpa_varlen`` a Transformers attention implementation (idempotent). Its mask function
    is sdpa's, so unpacked batches get exactly the sdpa masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, sdpa_per_example)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def base_model(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft wraps the LM


def packed_attention_implementation(lm: nn.Module) -> str:
    """The model's attention implementation, if packed rows can be given to it; ConfigError otherwise."""
    implementation = getattr(base_model(lm).config, "_attn_implementation", None) or "eager"
    if implementation not in PACKED_ATTENTION:
        raise ConfigError(f"data.packing=true needs model.attn_implementation in {['sdpa', 'eager', *VARLEN_KERNELS[1:]]}"
                          f"; this model uses {implementation!r}: set model.attn_implementation=sdpa or "
                          f"data.packing=false")
    return implementation


def prepare_for_packing(lm: nn.Module) -> str:
    """Check the model's attention kernel for packed rows, switching sdpa to its per-example form.

    Returns the implementation packed rows will use. Call before peft wraps the model.
    """
    implementation = packed_attention_implementation(lm)
    if implementation == "sdpa":
        register_varlen_sdpa()
        lm.set_attn_implementation(VARLEN_SDPA)
        implementation = VARLEN_SDPA
    return implementation


def packed_row_capacity(data: DataConfig, implementation: str) -> Optional[int]:
    """Tokens per packed row: data.pack_length if set; else one row per micro-batch (None) for the
    kernels with a variable-length path, and data.max_length for eager's quadratic mask."""
    if data.pack_length is not None:
        return data.pack_length
    return None if implementation in VARLEN_KERNELS else data.max_length
