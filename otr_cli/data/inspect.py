"""What `otr data` computes from tokenized examples: supervised spans as text, a length histogram, padding.

Pure functions of token ids, lengths and micro-batches (no model): the command that prints them
is train/data_command.py, which takes the micro-batches from the training run's own batch plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from otr_cli.data.examples import IGNORE_INDEX, TokenizedExample
from otr_cli.data.packing import pack_rows

# Plain-text marks around supervised text where no terminal styling is available (a pipe, a file, a test).
SUPERVISED_OPEN, SUPERVISED_CLOSE = "⟦", "⟧"


def supervised_runs(example: TokenizedExample) -> list[tuple[list[int], bool]]:
    """The example's token ids cut into maximal runs of equal supervision: [(ids, supervised), ...] in order.

    supervised: the tokens carry a label (label != IGNORE_INDEX), i.e. the loss trains on predicting them.
    """
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return runs


def rendered_spans(example: TokenizedExample, tokenizer: Any) -> list[tuple[str, bool]]:
    """The example decoded run by run (special tokens kept): [(text, supervised), ...]."""
    return [(tokenizer.decode(ids, skip_special_tokens=False), supervised)
            for ids, supervised in supervised_runs(example)]


def marked_text(spans: list[tuple[str, bool]]) -> str:
    """The spans as one string, supervised text between ⟦ and ⟧."""
    return "".join(f"{SUPERVISED_OPEN}{text}{SUPERVISED_CLOSE}" if supervised else text for text, supervised in spans)


@dataclass
class LengthStats:
    """Token lengths of the kept training examples, and their histogram.

    bins: [(low, high, count)]: examples with low <= tokens <= high, equal-width bins from 1 to the
    largest of `upper` and the longest example.
    """

    count: int
    minimum: int
    mean: float
    median: float
    p95: int
    maximum: int
    bins: list[tuple[int, int, int]]

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "min": self.minimum, "mean": round(self.mean, 2), "median": self.median,
                "p95": self.p95, "max": self.maximum,
                "histogram": [{"from": low, "to": high, "count": count} for low, high, count in self.bins]}


def length_stats(lengths: list[int], upper: int, num_bins: int = 10) -> LengthStats:
    """Summary and histogram of `lengths` (tokens per example, at least one example); `upper` is
    data.max_length, so that the bins show how close the examples come to it."""
    ordered = sorted(lengths)
    count = len(ordered)
    top = max(upper, ordered[-1])
    width = max(1, math.ceil(top / num_bins))
    bins = []
    for low in range(1, top + 1, width):
        high = min(top, low + width - 1)
        bins.append((low, high, sum(1 for length in ordered if low <= length <= high)))
    middle = count // 2
    median = float(ordered[middle]) if count % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    p95 = ordered[min(count - 1, math.ceil(0.95 * count) - 1)]
    return LengthStats(count, ordered[0], sum(ordered) / count, median, p95, ordered[-1], bins)


def histogram_lines(stats: LengthStats, width: int = 40) -> list[str]:
    """One text bar per bin: `  1-  52 | ████████ 12`."""
    most = max(count for _, _, count in stats.bins) or 1
    digits = len(str(stats.bins[-1][1]))
    return [f"{low:>{digits}}-{high:>{digits}} | {'█' * math.ceil(width * count / most):<{width}} {count}"
            for low, high, count in stats.bins]


@dataclass
class LayoutCost:
    """Tokens a layout of micro-batches computes: `positions` of which `real_tokens` are the examples' own."""

    real_tokens: int
    positions: int

    @property
    def padding_share(self) -> float:
        """Fraction of the computed positions that are padding (0 when nothing is computed for nothing)."""
        return 1.0 - self.real_tokens / self.positions if self.positions else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"real_tokens": self.real_tokens, "positions": self.positions,
                "padding_share": round(self.padding_share, 4)}


def padded_cost(micro_batches: list[list[int]], lengths: list[int]) -> LayoutCost:
    """Unpacked micro-batches (data/collate.collate_batch): every example right-padded to the batch's longest."""
    real = positions = 0
    for batch in micro_batches:
        batch_lengths = [lengths[index] for index in batch]
        real += sum(batch_lengths)
        positions += len(batch_lengths) * max(batch_lengths)
    return LayoutCost(real, positions)


def packed_cost(micro_batches: list[list[int]], lengths: list[int], row_capacity: Optional[int]) -> LayoutCost:
    """Packed micro-batches (data/packing.collate_packed): rows from pack_rows, padded to the longest row;
    row_capacity None is one row per micro-batch, with no padding at all."""
    real = positions = 0
    for batch in micro_batches:
        batch_lengths = [lengths[index] for index in batch]
        real += sum(batch_lengths)
        if row_capacity is None:
            positions += sum(batch_lengths)
            continue
        rows = pack_rows(batch_lengths, row_capacity)
        positions += len(rows) * max(sum(batch_lengths[i] for i in row) for row in rows)
    return LayoutCost(real, positions)
