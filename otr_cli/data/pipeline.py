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
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from otr_cli.config import check_chat_template_kwargs, validate_data
from otr_cli.data.cache import CacheEntry, cache_entry, generated_records_digest
from otr_cli.data.chat import encode_conversation, resolve_chat_template
from otr_cli.data.errors import DataError
from otr_cli.data.examples import IGNORE_INDEX, DataBundle, DataReport, TokenizedExample
from otr_cli.data.documents import encode_document
from otr_cli.data.formats import detect_format, text_document, to_messages
from otr_cli.data.mixture import MixtureParts, mixture_entries, mixture_order, read_mixture
from otr_cli.data.shared_encoding import ONE_PROCESS, ChunkPlan, DataRanks, encode_in_rounds, read_chunk
from otr_cli.data.sources import SYNTHETIC_SOURCE, RecordSet, read_source, read_split
from otr_cli.data.tokenized import TokenizedSplit
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
    first_dropped: str = ""  # where the first record dropped with no supervised token is (file:line), for errors
    # Per source of a mixture (data.sources; one entry otherwise): kept examples, their supervised tokens.
    source_kept: list[int] = field(default_factory=list)
    source_supervised_tokens: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> "_SplitCounts":
        return cls(**{**stored, "weights": WeightCounts(**stored["weights"])})

    def add(self, other: "_SplitCounts") -> None:
        for name in ("kept", "truncated", "dropped_too_long", "dropped_no_supervised", "unused", "supervised_tokens",
                     "total_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in asdict(self.weights):
            setattr(self.weights, name, getattr(self.weights, name) + getattr(other.weights, name))
        self.first_dropped = self.first_dropped or other.first_dropped
        for name in ("source_kept", "source_supervised_tokens"):
            mine, theirs = getattr(self, name), getattr(other, name)
            size = max(len(mine), len(theirs))
            setattr(self, name, [(mine[i] if i < len(mine) else 0) + (theirs[i] if i < len(theirs) else 0)
                                 for i in range(size)])


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


@dataclass
class _Encoding:
    """How the records of one split are encoded: the settings and format of each source (one unless a mixture).

    settings: data.* as it applies to the source's records (a mixture's source may set its own format and fields).
    formats: the record format of each source, detected once per source: a record lacking a field is an error,
        not another format.
    """

    settings: list[Any]
    formats: list[str]
    parts: Optional[MixtureParts] = None

    def at(self, index: int) -> tuple[int, Any, str]:
        """(source number, settings, format) of record `index`."""
        part = self.parts.part_of(index) if self.parts is not None else 0
        return part, self.settings[part], self.formats[part]

    @property
    def format_name(self) -> str:
        """The format(s) in words, for the report: ``alpaca`` or ``alpaca, text``."""
        return ", ".join(dict.fromkeys(self.formats))


def _split_encoding(records: RecordSet, order: list[int], data_cfg: Any, parts: Optional[MixtureParts]) -> _Encoding:
    """A single source's format is detected on its first record in encoding order; a mixture's on each source's first."""
    if parts is not None:
        formats = [detect_format(records[start], settings, records.where(start))
                   for start, settings in zip(parts.starts, parts.settings)]
        return _Encoding(list(parts.settings), formats, parts)
    fmt = detect_format(records[order[0]], data_cfg, records.where(order[0])) if order else data_cfg.format
    return _Encoding([data_cfg], [fmt])


def _encode_split(records: RecordSet, order: list[int], encoding: _Encoding, tokenizer: Any, template: Optional[str],
                  template_kwargs: dict[str, Any], limit: Optional[int]) -> tuple[list[TokenizedExample], _SplitCounts]:
    """Encode records[order[...]] as `encoding` says until `limit` are kept; returns examples and counts."""
    counts = _SplitCounts(source_kept=[0] * len(encoding.settings),
                          source_supervised_tokens=[0] * len(encoding.settings))
    examples: list[TokenizedExample] = []
    for position, index in enumerate(order):
        if limit is not None and len(examples) >= limit:
            counts.unused = len(order) - position
            break
        where = records.where(index)
        part, data_cfg, record_format = encoding.at(index)
        weight = example_weight(records[index], data_cfg, where)
        if record_format == "text":
            reply_weights: list[float] = []
            encoded = encode_document(text_document(records[index], data_cfg, where), tokenizer)
        else:
            messages, reply_weights = split_turn_weights(
                to_messages(records[index], data_cfg, record_format=record_format, where=where, keep_weights=True))
            encoded = encode_conversation(messages, tokenizer, template, where, template_kwargs, reply_weights)
        example = _fit_length(encoded, data_cfg.max_length, data_cfg.truncation, counts)
        if example is None:
            continue
        example = _with_example_weight(example, weight)
        supervised = example.num_supervised
        # A record with no assistant reply has no weights at all: dropped below, not "weighted away".
        weighted_away = weight == 0.0 or (bool(reply_weights) and not any(reply_weights))
        if supervised == 0 and not weighted_away:
            counts.dropped_no_supervised += 1
            counts.first_dropped = counts.first_dropped or where
            continue
        counts.weights.add(weight, reply_weights, trains=supervised > 0)
        examples.append(example)
        counts.kept += 1
        counts.supervised_tokens += supervised
        counts.source_kept[part] += 1
        counts.source_supervised_tokens[part] += supervised
        counts.total_tokens += len(example.input_ids)
    return examples, counts


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
        first = f"; the first is {counts.first_dropped}" if counts.first_dropped else ""
        reasons.append(f"{counts.dropped_no_supervised} with no supervised token left (a record with no assistant "
                       f"reply: add one; a reply that starts after token {data_cfg.max_length}: raise "
                       f"data.max_length){first}")
    why = "; ".join(reasons) or "the split has no records"
    return DataError(f"no {split} examples left from {records.description}: {why}")


def _validation_records(data_cfg: Any, train_records: RecordSet) -> tuple[Optional[RecordSet], list[int], list[int]]:
    """(validation record set or None, validation indices, training indices into train_records)."""
    train_order = list(range(len(train_records)))
    if data_cfg.validation_split:
        if mixture_entries(data_cfg) and not Path(data_cfg.validation_split).expanduser().is_file():
            raise DataError(f"data.validation_split={data_cfg.validation_split!r}: with data.sources it must be a "
                            f"file (read with the data.* format settings), or hold validation records out of the "
                            f"mixture with data.validation_size")
        if mixture_entries(data_cfg):
            records = read_source(data_cfg.validation_split, data_cfg.validation_split)
        else:
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
    if data_cfg.source == SYNTHETIC_SOURCE and data_cfg.synthetic.num_validation > 0 and not mixture_entries(data_cfg):
        records = read_split(data_cfg, "validation")
        return records, list(range(len(records))), train_order
    return None, [], train_order


@dataclass
class _Inputs:
    """The records to encode, in encoding order: what every rank reads before a first tokenization."""

    train_records: RecordSet
    train_order: list[int]  # shuffled with the run's seed when data.shuffle; a mixture's drawn records
    validation_records: Optional[RecordSet]
    validation_order: list[int]
    held_out: int = 0  # training records moved to validation (data.validation_size)
    parts: Optional[MixtureParts] = None  # where each source of a mixture (data.sources) starts in train_records
    drawn: list[int] = field(default_factory=list)  # a mixture's records drawn from each source (data/mixture.py)

    def encoding(self, data_cfg: Any, split: str) -> _Encoding:
        """How the records of `split` ("train" or "validation") are encoded."""
        if split == "train":
            return _split_encoding(self.train_records, self.train_order, data_cfg, self.parts)
        records = self.validation_records
        parts = self.parts if records is self.train_records else None
        return _split_encoding(records, self.validation_order, data_cfg, parts)


def _read_inputs(data_cfg: Any, seed: int) -> _Inputs:
    parts: Optional[MixtureParts] = None
    if mixture_entries(data_cfg):
        train_records, parts = read_mixture(data_cfg, data_cfg.split)
    else:
        train_records = read_split(data_cfg, data_cfg.split)
    if len(train_records) == 0:
        raise DataError(f"{train_records.description} has no records (data.source / data.split)")
    validation_records, validation_order, train_order = _validation_records(data_cfg, train_records)
    held_out = len(train_records) - len(train_order)
    drawn: list[int] = []
    if parts is not None:
        train_order, drawn = mixture_order(parts, train_order, seed, data_cfg.shuffle)
    elif data_cfg.shuffle:
        random.Random(seed).shuffle(train_order)
    return _Inputs(train_records, train_order, validation_records, validation_order, held_out, parts, drawn)


def build_datasets(data_cfg: Any, tokenizer: Any, seed: int, ranks: DataRanks = ONE_PROCESS) -> DataBundle:
    """Tokenized training and validation examples and a report of what was kept and why.

    data_cfg: ``DataConfig`` (or a DictConfig with the same keys).
    tokenizer: a fast Hugging Face tokenizer with a chat template (or set data.chat_template).
    seed: shuffles the training order (data.shuffle); the validation hold-out does not depend on it.
    ranks: the ranks of a distributed run, every one of which calls this (data/shared_encoding.py). Rank 0
        alone reads and hashes the records to find the cache entry; on a hit every rank memory-maps it, on a
        miss every rank encodes a share of the records and rank 0 stores the entry. With data.cache=false
        every rank builds its own copy and no rank waits for another.
    With data.cache (the default) the result is read from the tokenized-data cache when an entry for the
    same records, settings, seed and tokenizer exists, and stored there otherwise (data/cache.py);
    ``report.cache`` says which. The splits are TokenizedSplit (flat arrays, data/tokenized.py).
    Raises DataError for bad records, templates or settings, and when no example is left.
    """
    validate_data(data_cfg)
    # Documents need no chat template: a base model's tokenizer (none) trains on data.format=text as it is.
    template = None if _only_documents(data_cfg) else resolve_chat_template(tokenizer, data_cfg.chat_template)
    template_kwargs = check_chat_template_kwargs("data.chat_template_kwargs", data_cfg.chat_template_kwargs)
    if not getattr(data_cfg, "cache", True):
        ranks = ONE_PROCESS  # nothing stored to share: every rank builds its own copy
    inputs: Optional[_Inputs] = None
    entry: Optional[CacheEntry] = None
    bundle: Optional[DataBundle] = None
    decision: dict[str, Any] = {}
    failure: Optional[Exception] = None
    if ranks.is_main:
        try:
            if generated_records_digest(data_cfg) is not None:
                # Generated records: the key needs none of them, and a hit never makes them.
                entry = cache_entry(data_cfg, tokenizer, template, seed, None)
            else:
                inputs = _read_inputs(data_cfg, seed)
                separate = inputs.validation_records if inputs.validation_records is not inputs.train_records else None
                entry = cache_entry(data_cfg, tokenizer, template, seed,
                                    [inputs.train_records.records, separate.records if separate else None])
            bundle = entry.load() if entry is not None else None
            decision = {"hit": bundle is not None, "entry": [str(entry.path), entry.key] if entry else None,
                        "progress": _progress_dir(entry) if entry is not None and bundle is None else None}
        except Exception as exc:  # every rank must hear of it, or they wait for rank 0 until the timeout
            if ranks.world_size == 1:
                raise
            failure, decision = exc, {"error": f"{type(exc).__name__}: {exc}"}
    decision = ranks.broadcast(decision)
    if "error" in decision:
        if failure is not None:
            raise failure
        raise DataError(f"rank 0 could not prepare the data: {decision['error']}")
    if entry is None and decision["entry"]:
        entry = CacheEntry(Path(decision["entry"][0]), decision["entry"][1], {})
    if decision["hit"]:
        bundle = bundle if bundle is not None else entry.read_published()
    else:
        inputs = inputs if inputs is not None else _read_inputs(data_cfg, seed)
        progress = Path(decision["progress"]) if decision["progress"] else None
        # Without a progress directory no rank can see another's chunks: each builds all of them.
        bundle = _build(data_cfg, tokenizer, template, template_kwargs, inputs, entry, progress,
                        ranks if progress is not None else ONE_PROCESS)
    for line in bundle.report.summary_lines():
        log.info(line)
    return bundle


def _only_documents(data_cfg: Any) -> bool:
    """Whether every source is set to data.format=text (auto-detected formats may need a template)."""
    entries = mixture_entries(data_cfg)
    if entries:
        return all((getattr(entry, "format", None) or data_cfg.format) == "text" for entry in entries)
    return data_cfg.format == "text"


def _progress_dir(entry: CacheEntry) -> Optional[str]:
    """The entry's progress directory, created; None (with a warning) when the cache cannot be written."""
    try:
        entry.partial_dir.mkdir(parents=True, exist_ok=True)
        probe = entry.partial_dir / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return str(entry.partial_dir)
    except OSError as exc:
        log.warning("data: could not write the tokenized cache in %s (%s); every rank tokenizes on its own and "
                    "the next start tokenizes again. Set data.cache_dir (or $OTR_CACHE_DIR) to a writable "
                    "directory, or data.cache=false", entry.path.parent, exc)
        return None


def _build(data_cfg: Any, tokenizer: Any, template: Optional[str], template_kwargs: dict[str, Any],
           inputs: _Inputs, entry: Optional[CacheEntry], progress: Optional[Path], ranks: DataRanks) -> DataBundle:
    """A first tokenization: every rank of `ranks` encodes chunks in rounds, rank 0 merges and stores them."""
    # Chunks by split and index, where no progress directory keeps them (one process builds them all).
    memory: dict[str, dict] = {"train": {}, "validation": {}}

    def encoder(records: RecordSet, encoding: _Encoding):
        def encode(indices: list[int], limit: Optional[int]) -> tuple[TokenizedSplit, dict]:
            examples, counts = _encode_split(records, indices, encoding, tokenizer, template, template_kwargs, limit)
            return TokenizedSplit.from_examples(examples), counts.as_dict()
        return encode

    train_encoding = inputs.encoding(data_cfg, "train")
    encode_train = encoder(inputs.train_records, train_encoding)
    train_plan = encode_in_rounds("train", inputs.train_order, data_cfg.max_examples, encode_train, ranks, progress,
                                  memory["train"])
    encode_validation = validation_plan = None
    if inputs.validation_records is not None:
        encode_validation = encoder(inputs.validation_records, inputs.encoding(data_cfg, "validation"))
        validation_plan = encode_in_rounds("validation", inputs.validation_order, None, encode_validation, ranks,
                                           progress, memory["validation"])

    def merge() -> DataBundle:
        train, counts = _merge_chunks("train", train_plan, data_cfg.max_examples, len(inputs.train_order),
                                      encode_train, progress, memory["train"])
        validation = val_counts = None
        if validation_plan is not None:
            validation, val_counts = _merge_chunks("validation", validation_plan, None, len(inputs.validation_order),
                                                   encode_validation, progress, memory["validation"])
        return _bundle(data_cfg, inputs, train_encoding, train, counts, validation, val_counts)

    outcome: dict[str, Any] = {}
    bundle: Optional[DataBundle] = None
    failure: Optional[Exception] = None
    if ranks.is_main:
        try:
            bundle = merge()
            outcome = {"stored": entry.store(bundle) if entry is not None else False}
        except Exception as exc:
            if ranks.world_size == 1:
                raise
            failure, outcome = exc, {"error": f"{type(exc).__name__}: {exc}"}
    outcome = ranks.broadcast(outcome)  # the others wait here while rank 0 merges (data group's timeout)
    if "error" in outcome:
        if failure is not None:
            raise failure
        raise DataError(f"rank 0 could not merge the tokenized data: {outcome['error']}")
    if entry is None:
        return bundle if bundle is not None else merge()
    if outcome["stored"]:
        # Every rank, rank 0 too, maps the stored entry: one copy per node in the page cache.
        bundle = entry.read_published()
        ranks.barrier()  # every rank has the entry: the chunks are no longer needed
        if ranks.is_main and progress is not None:
            shutil.rmtree(progress, ignore_errors=True)
        bundle.report.cache = "miss"
        return bundle
    bundle = bundle if bundle is not None else merge()
    bundle.report.cache, bundle.report.cache_path = "miss", ""
    return bundle


def _merge_chunks(name: str, plan: ChunkPlan, limit: Optional[int], num_records: int, encode: Any,
                  progress: Optional[Path], memory: dict) -> tuple[TokenizedSplit, _SplitCounts]:
    """The chunks of `plan` as one split and its counts, exactly as one sequential pass would have made them.

    The chunk in which `limit` is reached is encoded again with the limit that remains, so that the
    examples and counts stop where a sequential pass stops (and records past it count as unused).
    """
    parts: list[TokenizedSplit] = []
    counts = _SplitCounts()
    kept = position = 0
    for index, (chunk, chunk_kept) in enumerate(zip(plan.chunks, plan.kept)):
        position += len(chunk)
        if limit is not None and kept + chunk_kept >= limit:
            split, stored = encode(chunk, limit - kept)
            chunk_counts = _SplitCounts.from_dict(stored)
            chunk_counts.unused += num_records - position
            parts.append(split)
            counts.add(chunk_counts)
            break
        split, stored = read_chunk(progress, memory, name, index)
        parts.append(split)
        counts.add(_SplitCounts.from_dict(stored))
        kept += chunk_kept
    return TokenizedSplit.concatenate(parts), counts


def _source_reports(inputs: _Inputs, encoding: _Encoding, counts: _SplitCounts) -> list[dict[str, Any]]:
    """Per source of a mixture: what it is, its format, records read, drawn, kept and their supervised tokens."""
    if inputs.parts is None:
        return []
    return [{"source": label, "format": encoding.formats[i], "records": inputs.parts.sizes[i],
             "drawn": inputs.drawn[i], "kept": counts.source_kept[i] if i < len(counts.source_kept) else 0,
             "supervised_tokens": counts.source_supervised_tokens[i] if i < len(counts.source_supervised_tokens)
             else 0}
            for i, label in enumerate(inputs.parts.labels)]


def _bundle(data_cfg: Any, inputs: _Inputs, encoding: _Encoding, train: TokenizedSplit, counts: _SplitCounts,
            validation: Optional[TokenizedSplit], val_counts: Optional[_SplitCounts]) -> DataBundle:
    """The bundle and its report; raises DataError when a split kept nothing."""
    if not len(train):
        raise _nothing_left_error("training", inputs.train_records, counts, data_cfg)
    if not counts.supervised_tokens:
        # Kept, but every example has weight 0 (data.weight_field, or "weight": 0 on every reply): a run would
        # train on nothing while looking healthy.
        raise DataError(f"no training example of {inputs.train_records.description} has a supervised token: all "
                        f"{counts.kept} kept have weight 0 (data.weight_field, or \"weight\": 0 on every assistant "
                        f"reply); give some examples a weight above 0")
    report = DataReport(
        source=inputs.train_records.description, split=data_cfg.split, format=encoding.format_name,
        max_length=data_cfg.max_length, truncation=data_cfg.truncation, loaded=len(inputs.train_records),
        held_out=inputs.held_out, unused=counts.unused, kept=counts.kept,
        truncated=counts.truncated, dropped_too_long=counts.dropped_too_long,
        dropped_no_supervised=counts.dropped_no_supervised, supervised_tokens=counts.supervised_tokens,
        total_tokens=counts.total_tokens, zero_weight_examples=counts.weights.zero_weight_examples,
        weighted_examples=counts.weights.weighted_examples, context_turns=counts.weights.context_turns,
        weighted_turns=counts.weights.weighted_turns, sources=_source_reports(inputs, encoding, counts),
    )
    if validation is None:
        validation = TokenizedSplit.from_examples([])
    elif inputs.validation_records is not None and val_counts is not None:
        if not len(validation) and inputs.validation_order:
            raise _nothing_left_error("validation", inputs.validation_records, val_counts, data_cfg)
        if len(validation) and not val_counts.supervised_tokens:
            # The validation loss would be a mean over no token: reported as 0, a perfect score.
            raise DataError(f"no validation example of {inputs.validation_records.description} has a supervised "
                            f"token: all {val_counts.kept} kept have weight 0 (data.weight_field, or \"weight\": 0 "
                            f"on every assistant reply); give some of them a weight above 0, or choose other "
                            f"validation records (data.validation_split / data.validation_size)")
        report.validation_source = inputs.validation_records.description
        report.validation_loaded = len(inputs.validation_order)
        report.validation_kept = val_counts.kept
        report.validation_truncated = val_counts.truncated
        report.validation_dropped = val_counts.dropped_too_long + val_counts.dropped_no_supervised
        report.validation_supervised_tokens = val_counts.supervised_tokens

    processed = counts.kept + counts.dropped_too_long + counts.dropped_no_supervised
    if processed and (counts.truncated + counts.dropped_too_long) / processed > 0.1:
        report.notes.append(f"{counts.truncated + counts.dropped_too_long} of {processed} training examples exceed "
                            f"data.max_length={data_cfg.max_length}; consider raising it")
    return DataBundle(train=train, validation=validation, report=report)
