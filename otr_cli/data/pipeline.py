"""From ``data.*`` settings to tokenized train and validation sets: ``build_datasets``.

Order of operations, chosen so that runs are comparable:

1. Read data.split. Pick the validation records: data.validation_split (a split of the source
   or a file path), else data.validation_size held out of the training records, else the
   source's own validation split for synthetic_arith. The hold-out is drawn with a fixed seed,
   independent of ``seed``, so a seed sweep evaluates every run on the same validation set.
2. Shuffle the training records with ``seed`` (data.shuffle), then encode them in that order
   until data.max_examples are kept; the rest are never tokenized (``report.unused``).
3. Each record: format -> messages -> render (data.chat_template, data.chat_template_kwargs)
   -> assistant-only labels (a reply with "weight": 0 stays context) -> length policy
   (data.truncation=truncate keeps the first data.max_length tokens, drop drops the example)
   -> loss weights (data.weight_field) -> dropped if no supervised token is left, unless the
   weights took it away (then kept, with no loss, so that the data order does not move).

Steps 2 and 3 are the expensive part (render and tokenize, about 2 ms a record); their result is kept
in the tokenized-data cache (data/cache.py), keyed on the records read in step 1, the data settings,
the seed and the tokenizer, and read back on the next start instead of being redone.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from otr_cli.config import check_chat_template_kwargs, validate_data
from otr_cli.data.cache import cache_entry
from otr_cli.data.chat import encode_conversation, resolve_chat_template
from otr_cli.data.errors import DataError
from otr_cli.data.examples import IGNORE_INDEX, DataBundle, DataReport, TokenizedExample
from otr_cli.data.formats import detect_format, to_messages
from otr_cli.data.sources import SYNTHETIC_SOURCE, RecordSet, read_split
from otr_cli.data.weights import WeightCounts, example_weight, split_turn_weights

log = logging.getLogger(__name__)

HOLDOUT_SEED = 20250930  # fixed: the validation hold-out must not move with the training seed


@dataclass
class _SplitCounts:
    """What happened to the records of one split while encoding."""

    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    unused: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0
    weights: WeightCounts = field(default_factory=WeightCounts)


def _with_example_weight(example: TokenizedExample, weight: float) -> TokenizedExample:
    """Scale every token's weight by the example's; weight 0 unsupervises every token (see data/weights.py)."""
    if weight == 1.0:
        return example
    if weight == 0.0:
        return TokenizedExample(example.input_ids, [IGNORE_INDEX] * len(example.labels))
    token_weights = example.weights or [1.0 if label != IGNORE_INDEX else 0.0 for label in example.labels]
    return TokenizedExample(example.input_ids, example.labels, [weight * value for value in token_weights])


def _fit_length(example: TokenizedExample, max_length: int, truncation: str,
                counts: _SplitCounts) -> Optional[TokenizedExample]:
    """Apply the length policy; None means dropped (and counted)."""
    if len(example.input_ids) <= max_length:
        return example
    if truncation == "drop":
        counts.dropped_too_long += 1
        return None
    counts.truncated += 1
    weights = example.weights[:max_length] if example.weights is not None else None
    return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length], weights)


def _encode_split(records: RecordSet, order: list[int], data_cfg: Any, tokenizer: Any, template: Optional[str],
                  template_kwargs: dict[str, Any], limit: Optional[int]
                  ) -> tuple[list[TokenizedExample], _SplitCounts, str]:
    """Encode records[order[...]] until `limit` are kept; returns examples, counts, format name."""
    counts = _SplitCounts()
    examples: list[TokenizedExample] = []
    record_format = detect_format(records[order[0]], data_cfg, records.where(order[0])) if order else data_cfg.format
    for position, index in enumerate(order):
        if limit is not None and len(examples) >= limit:
            counts.unused = len(order) - position
            break
        where = records.where(index)
        # One format for the whole split: a record lacking a field is an error, not another format.
        weight = example_weight(records[index], data_cfg, where)
        messages, reply_weights = split_turn_weights(
            to_messages(records[index], data_cfg, record_format=record_format, where=where, keep_weights=True))
        example = _fit_length(encode_conversation(messages, tokenizer, template, where, template_kwargs,
                                                  reply_weights),
                              data_cfg.max_length, data_cfg.truncation, counts)
        if example is None:
            continue
        example = _with_example_weight(example, weight)
        supervised = example.num_supervised
        weighted_away = weight == 0.0 or not any(reply_weights)
        if supervised == 0 and not weighted_away:
            counts.dropped_no_supervised += 1
            continue
        counts.weights.add(weight, reply_weights, trains=supervised > 0)
        examples.append(example)
        counts.kept += 1
        counts.supervised_tokens += supervised
        counts.total_tokens += len(example.input_ids)
    return examples, counts, record_format


def _holdout_size(validation_size: float, available: int) -> int:
    """data.validation_size as a record count: a fraction when < 1, else a count."""
    if validation_size < 1:
        return max(1, round(validation_size * available))
    return int(validation_size)


def _nothing_left_error(split: str, records: RecordSet, counts: _SplitCounts, data_cfg: Any) -> DataError:
    reasons = []
    if counts.dropped_too_long:
        reasons.append(f"{counts.dropped_too_long} longer than data.max_length={data_cfg.max_length} with "
                       f"data.truncation=drop (raise data.max_length or set data.truncation=truncate)")
    if counts.dropped_no_supervised:
        reasons.append(f"{counts.dropped_no_supervised} with no supervised token left (the assistant reply starts "
                       f"after token {data_cfg.max_length}: raise data.max_length)")
    why = "; ".join(reasons) or "the split has no records"
    return DataError(f"no {split} examples left from {records.description}: {why}")


def _validation_records(data_cfg: Any, train_records: RecordSet) -> tuple[Optional[RecordSet], list[int], list[int]]:
    """(validation record set or None, validation indices, training indices into train_records)."""
    train_order = list(range(len(train_records)))
    if data_cfg.validation_split:
        records = read_split(data_cfg, data_cfg.validation_split)
        return records, list(range(len(records))), train_order
    if data_cfg.validation_size > 0:
        size = _holdout_size(data_cfg.validation_size, len(train_records))
        if size >= len(train_records):
            raise DataError(f"data.validation_size={data_cfg.validation_size} holds out {size} of the "
                            f"{len(train_records)} records of {train_records.description}, leaving none to train on")
        shuffled = list(train_order)
        random.Random(HOLDOUT_SEED).shuffle(shuffled)
        held_out = sorted(shuffled[:size])
        held = set(held_out)
        return train_records, held_out, [index for index in train_order if index not in held]
    if data_cfg.source == SYNTHETIC_SOURCE and data_cfg.synthetic.num_validation > 0:
        records = read_split(data_cfg, "validation")
        return records, list(range(len(records))), train_order
    return None, [], train_order


def build_datasets(data_cfg: Any, tokenizer: Any, seed: int) -> DataBundle:
    """Tokenized training and validation examples and a report of what was kept and why.

    data_cfg: ``DataConfig`` (or a DictConfig with the same keys).
    tokenizer: a fast Hugging Face tokenizer with a chat template (or set data.chat_template).
    seed: shuffles the training order (data.shuffle); the validation hold-out does not depend on it.
    With data.cache (the default) the result is read from the tokenized-data cache when an entry for the
    same records, settings, seed and tokenizer exists, and stored there otherwise (data/cache.py);
    ``report.cache`` says which.
    Raises DataError for bad records, templates or settings, and when no example is left.
    """
    validate_data(data_cfg)
    template = resolve_chat_template(tokenizer, data_cfg.chat_template)
    template_kwargs = check_chat_template_kwargs("data.chat_template_kwargs", data_cfg.chat_template_kwargs)
    train_records = read_split(data_cfg, data_cfg.split)
    if len(train_records) == 0:
        raise DataError(f"{train_records.description} has no records (data.source / data.split)")
    validation_records, validation_order, train_order = _validation_records(data_cfg, train_records)

    separate_validation = validation_records if validation_records is not train_records else None
    entry = cache_entry(data_cfg, tokenizer, template, seed,
                        [train_records.records, separate_validation.records if separate_validation else None])
    bundle = entry.load() if entry is not None else None
    if bundle is None:
        bundle = _encode_bundle(data_cfg, tokenizer, seed, template, template_kwargs, train_records,
                                train_order, validation_records, validation_order)
        if entry is not None:
            bundle.report.cache = "miss"
            bundle.report.cache_path = str(entry.path) if entry.store(bundle) else ""
    for line in bundle.report.summary_lines():
        log.info(line)
    return bundle


def _encode_bundle(data_cfg: Any, tokenizer: Any, seed: int, template: Optional[str],
                   template_kwargs: dict[str, Any], train_records: RecordSet, train_order: list[int],
                   validation_records: Optional[RecordSet], validation_order: list[int]) -> DataBundle:
    """Shuffle, render, tokenize and count: the work the cache saves. Changing what this (or anything it
    calls) produces for the same inputs needs a bump of cache.FORMAT_VERSION."""
    if data_cfg.shuffle:
        random.Random(seed).shuffle(train_order)
    train, counts, record_format = _encode_split(train_records, train_order, data_cfg, tokenizer, template,
                                                 template_kwargs, data_cfg.max_examples)
    if not train:
        raise _nothing_left_error("training", train_records, counts, data_cfg)

    report = DataReport(
        source=train_records.description, split=data_cfg.split, format=record_format,
        max_length=data_cfg.max_length, truncation=data_cfg.truncation, loaded=len(train_records),
        held_out=len(train_records) - len(train_order), unused=counts.unused, kept=counts.kept,
        truncated=counts.truncated, dropped_too_long=counts.dropped_too_long,
        dropped_no_supervised=counts.dropped_no_supervised, supervised_tokens=counts.supervised_tokens,
        total_tokens=counts.total_tokens, zero_weight_examples=counts.weights.zero_weight_examples,
        weighted_examples=counts.weights.weighted_examples, context_turns=counts.weights.context_turns,
        weighted_turns=counts.weights.weighted_turns,
    )
    validation: list[TokenizedExample] = []
    if validation_records is not None:
        validation, val_counts, _ = _encode_split(validation_records, validation_order, data_cfg, tokenizer,
                                                  template, template_kwargs, None)
        if not validation and validation_order:
            raise _nothing_left_error("validation", validation_records, val_counts, data_cfg)
        report.validation_source = validation_records.description
        report.validation_loaded = len(validation_order)
        report.validation_kept = val_counts.kept
        report.validation_truncated = val_counts.truncated
        report.validation_dropped = val_counts.dropped_too_long + val_counts.dropped_no_supervised
        report.validation_supervised_tokens = val_counts.supervised_tokens

    processed = counts.kept + counts.dropped_too_long + counts.dropped_no_supervised
    if processed and (counts.truncated + counts.dropped_too_long) / processed > 0.1:
        report.notes.append(f"{counts.truncated + counts.dropped_too_long} of {processed} training examples exceed "
                            f"data.max_length={data_cfg.max_length}; consider raising it")
    return DataBundle(train=train, validation=validation, report=report)
