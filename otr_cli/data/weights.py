"""Loss weights from the data: one per example (``data.weight_field``) and one per assistant turn.

Per turn, the convention of OpenAI's chat fine-tuning format, also read by axolotl: an assistant
message may carry ``"weight"``; 0 makes that reply context (label -100 on every token), 1 (the
default) trains on it. Any other non-negative number scales the loss of its tokens, like an
example weight.

How a weight enters the loss (docs/data.md, "Loss weights"): it multiplies the loss of each token
it covers; the normaliser of ``loss.reduction`` stays a count (supervised tokens, or sequences).
Weight 0 is the same as not supervising: those tokens get label -100, so they are not in the
count and their gradient is exactly zero, while the example keeps its place in the data order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from otr_cli.data.errors import DataError

TURN_WEIGHT_KEY = "weight"


def parse_weight(value: Any, what: str, where: str) -> float:
    """A finite weight >= 0 from a record: a number, or text holding one (CSV/TSV cells are text)."""
    number: Optional[float] = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise DataError(f"{where}: {what} should be a number >= 0, got {value!r}")
    if number < 0:
        raise DataError(f"{where}: {what} is {value!r}; weights must be >= 0 (0: no loss from it)")
    return number


def example_weight(record: dict, data_cfg: Any, where: str) -> float:
    """The record's data.weight_field as a float >= 0; 1.0 when data.weight_field is not set."""
    name = getattr(data_cfg, "weight_field", None)
    if not name:
        return 1.0
    if name not in record:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise DataError(f"{where}: missing the weight field {name!r} (data.weight_field); give every record one, "
                        f"or set data.weight_field=null. The record has fields: {fields}")
    return parse_weight(record[name], f"field {name!r} (data.weight_field)", where)


def turn_weight(item: dict, role: str, index: int, where: str) -> Optional[float]:
    """The ``"weight"`` of message `index` (None when it has none); only assistant replies may have one."""
    if TURN_WEIGHT_KEY not in item:
        return None
    if role != "assistant":
        raise DataError(f"{where}: message {index} ({role}) has a \"weight\"; only assistant messages can be "
                        f"weighted (0: the reply is context, 1: it is trained on)")
    return parse_weight(item[TURN_WEIGHT_KEY], f"the \"weight\" of message {index}", where)


def split_turn_weights(messages: list[dict]) -> tuple[list[dict], list[float]]:
    """(messages without their weights, the weight of each assistant reply in order, default 1).

    The weights are taken off so that the chat template sees exactly the messages it would
    without them.
    """
    clean, weights = [], []
    for message in messages:
        if message["role"] == "assistant":
            weights.append(message.get(TURN_WEIGHT_KEY, 1.0))
        clean.append({key: value for key, value in message.items() if key != TURN_WEIGHT_KEY})
    return clean, weights


@dataclass
class WeightCounts:
    """What the weights did to the kept examples of one split (data_report.json)."""

    zero_weight_examples: int = 0  # kept in the data order, no loss (weight 0 or every reply context)
    weighted_examples: int = 0  # data.weight_field other than 0 and 1
    context_turns: int = 0  # assistant replies with "weight": 0
    weighted_turns: int = 0  # assistant replies with a weight other than 0 and 1

    def add(self, weight: float, reply_weights: list[float], trains: bool) -> None:
        self.zero_weight_examples += not trains
        self.weighted_examples += weight not in (0.0, 1.0)
        self.context_turns += sum(1 for value in reply_weights if value == 0)
        self.weighted_turns += sum(1 for value in reply_weights if value not in (0.0, 1.0))
