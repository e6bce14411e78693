"""What the data package hands to training: tokenized examples, a report of what was kept."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

IGNORE_INDEX = -100  # label of a position that carries no loss (PyTorch's cross-entropy default)


@dataclass
class TokenizedExample:
    """One rendered conversation, ready for collation.

    input_ids: token ids of the whole rendered chat (prompt and replies), length T.
    labels: length T, aligned with input_ids and NOT shifted: ``labels[t] == input_ids[t]`` where
        token t is supervised (assistant reply text and the token that ends the assistant turn),
        ``IGNORE_INDEX`` (-100) elsewhere. The loss shifts: position t-1 predicts labels[t].
    weights: None (every supervised token weighs 1) or length T: the factor on the loss of
        labels[t] (example weight x reply weight, > 0 where supervised; weight-0 tokens are not
        supervised at all, see data/weights.py).
    """

    input_ids: list[int]
    labels: list[int]
    weights: Optional[list[float]] = None

    @property
    def num_supervised(self) -> int:
        """Supervised positions that a causal LM can predict (position 0 has no context)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class DataReport:
    """Counts of what happened to the records, for the log and for ``metrics``.

    Training counts satisfy ``loaded - held_out - unused == kept + dropped_too_long +
    dropped_no_supervised``; ``truncated`` counts examples cut to ``max_length`` (they are among
    the kept unless truncation left them with no supervised token). Token counts are over the
    kept training examples; ``supervised_tokens`` counts positions with a label (loss tokens).
    ``kept`` includes the ``zero_weight_examples``: weights take an example out of the loss, never
    out of the data order. For a mixture (data.sources) the records drawn replace ``loaded - held_out``:
    ``sum(drawn) - unused == kept + dropped_too_long + dropped_no_supervised``, and ``sources`` holds one
    dict per source: source (in words), format, records (read), drawn, kept, supervised_tokens.
    """

    source: str = ""
    split: str = ""
    format: str = ""
    max_length: int = 0
    truncation: str = "truncate"
    loaded: int = 0  # records read from data.split
    held_out: int = 0  # of those, moved to validation (data.validation_size)
    unused: int = 0  # shuffled past data.max_examples, never tokenized
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_supervised: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0
    # Loss weights (data.weight_field, an assistant message's "weight"), over the kept training examples.
    zero_weight_examples: int = 0  # in the data order but no loss: weight 0, or every reply context
    weighted_examples: int = 0  # data.weight_field other than 0 and 1
    context_turns: int = 0  # assistant replies with "weight": 0 (label -100)
    weighted_turns: int = 0  # assistant replies with a weight other than 0 and 1
    validation_source: str = ""  # "" when there is no validation set
    validation_loaded: int = 0
    validation_kept: int = 0
    validation_truncated: int = 0
    validation_dropped: int = 0
    validation_supervised_tokens: int = 0
    notes: list[str] = field(default_factory=list)  # warnings worth showing the user
    sources: list[dict] = field(default_factory=list)  # per source of a mixture (data.sources); [] otherwise
    # The tokenized-data cache (data/cache.py): "hit" (loaded from cache_path), "miss" (tokenized, stored in
    # cache_path; "" when it could not be written) or "off" (data.cache=false).
    cache: str = "off"
    cache_path: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """A few human-readable lines for the start-of-run log."""
        lines = [f"data: {self.loaded} records from {self.source}, format {self.format}"]
        if self.cache == "hit":
            lines.append(f"data: tokenized cache hit {self.cache_path}")
        elif self.cache == "miss":
            lines.append(f"data: tokenized cache miss, stored in {self.cache_path}" if self.cache_path
                         else "data: tokenized cache miss, not stored (see the warning above)")
        train = f"train: {self.kept} examples kept"
        if self.held_out:
            train += f", {self.held_out} held out for validation"
        if self.unused:
            train += f", {self.unused} not used (data.max_examples)"
        lines.append(train)
        for number, part in enumerate(self.sources, start=1):
            lines.append(f"  source {number}: {part['source']}, format {part['format']}: {part['records']} records, "
                         f"{part['drawn']} drawn, {part['kept']} kept ({part['supervised_tokens']} supervised tokens)")
        if self.truncation == "truncate":
            limits = f"{self.truncated} truncated to data.max_length={self.max_length} tokens"
        else:
            limits = f"{self.dropped_too_long} dropped as longer than data.max_length={self.max_length}"
        lines.append(f"  {limits}; {self.dropped_no_supervised} dropped with no supervised token")
        share = 100.0 * self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0
        lines.append(f"  tokens: {self.total_tokens} total, {self.supervised_tokens} supervised ({share:.1f}%)")
        if self.zero_weight_examples or self.weighted_examples or self.context_turns or self.weighted_turns:
            lines.append(f"  weights: {self.zero_weight_examples} examples with no loss, {self.weighted_examples} "
                         f"weighted; {self.context_turns} replies as context, {self.weighted_turns} weighted")
        if self.validation_source:
            lines.append(
                f"validation: {self.validation_kept} of {self.validation_loaded} examples kept "
                f"from {self.validation_source} ({self.validation_supervised_tokens} supervised tokens)"
            )
        else:
            lines.append("validation: none (set data.validation_split or data.validation_size)")
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


@dataclass
class DataBundle:
    """Training and validation examples plus the report of how they were built."""

    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    report: DataReport
