"""Several sources in one training set (``data.sources``): which records, how often, in which order.

A mixture is read as one RecordSet, the sources' records laid end to end (``MixtureParts`` says where each
source starts and with which settings and format its records are encoded). The examples drawn from it are a
pure function of the seed and the sources' records, so that every rank and every resume sees the same ones:

- a source with ``examples: n`` gives exactly n records: its records in an order shuffled by (seed, its
  index), taken whole as many times as n allows and then the first of a new shuffle for the rest;
- the weighted sources (``weight: w``, 1 when neither is set) share N draws, N = their records together:
  each draw picks source i with probability w_i / sum(w), seeded by the run's seed (so a source's count is
  Binomial(N, w_i / sum(w))); each source then gives its count of records as above, repeating when the
  count exceeds its records.

The drawn records are shuffled together with the seed (data.shuffle), or kept source after source.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

from otr_cli.config import SOURCE_SETTING_KEYS, source_entries
from otr_cli.data.errors import DataError
from otr_cli.data.sources import RecordSet, _Segment, read_source


def mixture_entries(data_cfg: Any) -> list[Any]:
    """data.sources as a list of SourceConfig-like entries (empty: no mixture, data.source is read)."""
    return source_entries(data_cfg)


def source_settings(data_cfg: Any, entry: Any) -> SimpleNamespace:
    """data.* with the fields `entry` sets (SOURCE_SETTING_KEYS) replaced: how that source's records are read."""
    from otr_cli.data.cache import _plain

    settings = _plain(data_cfg)
    for key in SOURCE_SETTING_KEYS:
        value = getattr(entry, key, None)
        if value is not None:
            settings[key] = value
    settings["source"] = entry.source
    settings["synthetic"] = data_cfg.synthetic
    return SimpleNamespace(**settings)


def describe_entry(entry: Any) -> str:
    """A source of the mixture in words: ``a.jsonl (weight 2)``, ``b.jsonl (1000 examples)``."""
    if getattr(entry, "examples", None) is not None:
        return f"{entry.source} ({entry.examples} examples)"
    weight = entry.weight if getattr(entry, "weight", None) is not None else 1
    return f"{entry.source} (weight {weight:g})"


@dataclass
class MixtureParts:
    """Records [starts[i], starts[i] + sizes[i]) of a mixture's RecordSet came from source i."""

    starts: list[int]
    sizes: list[int]
    labels: list[str]  # describe_entry of each source
    settings: list[SimpleNamespace]  # source_settings of each source
    weights: list[Optional[float]]  # None where the source takes a number of examples
    examples: list[Optional[int]]

    def part_of(self, index: int) -> int:
        """The source (0-based) that record `index` of the mixture came from."""
        return bisect.bisect_right(self.starts, index) - 1


def read_mixture(data_cfg: Any, split: str) -> tuple[RecordSet, MixtureParts]:
    """The records of every source of data.sources (its own split, else `split`) and where each starts."""
    records: list[dict] = []
    segments: list[_Segment] = []
    parts = MixtureParts([], [], [], [], [], [])
    for index, entry in enumerate(mixture_entries(data_cfg)):
        settings = source_settings(data_cfg, entry)
        part = read_source(entry.source, settings.split if split == data_cfg.split else split,
                           subset=settings.subset, synthetic=data_cfg.synthetic)
        if len(part) == 0:
            raise DataError(f"data.sources[{index}]: {part.description} has no records")
        start = len(records)
        if part.segments:
            segments.extend(_Segment(start + segment.start, segment.label, segment.lines)
                            for segment in part.segments)
        else:
            segments.append(_Segment(start, part.description))
        records.extend(dict(record) for record in part.records)
        examples = getattr(entry, "examples", None)
        parts.starts.append(start)
        parts.sizes.append(len(part))
        parts.labels.append(describe_entry(entry))
        parts.settings.append(settings)
        parts.examples.append(examples)
        parts.weights.append(None if examples is not None else float(entry.weight if entry.weight is not None else 1))
    description = "mixture of " + ", ".join(parts.labels)
    return RecordSet(records, description, segments), parts


def _take(available: list[int], count: int, rng: random.Random) -> list[int]:
    """`count` of `available`: whole shuffled passes, then the start of one more."""
    taken: list[int] = []
    while len(taken) < count:
        shuffled = list(available)
        rng.shuffle(shuffled)
        taken.extend(shuffled[: count - len(taken)])
    return taken


def mixture_order(parts: MixtureParts, available: list[int], seed: int, shuffle: bool) -> tuple[list[int], list[int]]:
    """(record indices to encode, in order; how many were drawn from each source).

    available: the mixture's record indices that may train (those not held out for validation).
    """
    by_part: list[list[int]] = [[] for _ in parts.starts]
    for index in available:
        by_part[parts.part_of(index)].append(index)
    counts = [examples or 0 for examples in parts.examples]
    weighted = [i for i, weight in enumerate(parts.weights) if weight is not None]
    if weighted:
        draws = sum(len(by_part[i]) for i in weighted)
        picks = random.Random(seed).choices(weighted, weights=[parts.weights[i] for i in weighted], k=draws)
        for i in picks:
            counts[i] += 1
    order: list[int] = []
    for i, count in enumerate(counts):
        if count and not by_part[i]:
            raise DataError(f"data.sources[{i}]: every record of {parts.labels[i]} is held out for validation "
                            f"(data.validation_size); lower it")
        # One generator per source: a source's records do not depend on the other sources' sizes.
        order.extend(_take(by_part[i], count, random.Random(f"{seed}:source:{i}")))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order, counts
