"""trainer.metric_for_best: which checkpoint is the best so far, and trainer.early_stopping_patience.

The metric is measured at evaluation steps (val_ce every trainer.eval_steps, eval/<benchmark> every
eval.every_steps); config.validate requires trainer.save_steps to be a multiple of that cadence, so every
checkpoint step has the metric and only checkpoint steps count here (a best without a checkpoint could not
be kept, nor put in final/). Every rank holds the same tracker: val_ce is all-reduced before it is
observed, a benchmark score is observed on rank 0 and its record handed to every rank (Trainer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from otr_cli.atomic import write_json_atomic
from otr_cli.train.trainer_state import TRAINER_STATE, best_fields, otr_state_file

log = logging.getLogger("otr.train")


def greater_is_better(metric: str, override: Optional[bool]) -> bool:
    """A loss (val_ce) is better lower, a benchmark score (eval/<benchmark>) higher; `override` when set."""
    if override is not None:
        return bool(override)
    return not metric == "val_ce"


@dataclass
class BestTracker:
    metric: str
    greater_is_better: bool
    # early_stopping_patience: evaluations without an improvement of more than `threshold` before the stop (0: never).
    patience: int = 0
    threshold: float = 0.0
    metric_value: Optional[float] = None
    step: Optional[int] = None
    checkpoint: Optional[str] = None
    evaluations_without_improvement: int = 0
    # The step of the last evaluation observed (a resume re-observes one its checkpoint did not record).
    observed_step: Optional[int] = None

    def observe(self, step: int, value: float, checkpoint: Path) -> bool:
        """The metric of the checkpoint of `step`; True when it is the new best."""
        if self.observed_step is not None and step <= self.observed_step:
            return False
        self.observed_step = step
        better = self.metric_value is None or (value > self.metric_value if self.greater_is_better
                                               else value < self.metric_value)
        # As Hugging Face's EarlyStoppingCallback: a new best by no more than the threshold still counts as
        # an evaluation without improvement.
        if self.metric_value is None or (better and abs(value - self.metric_value) > self.threshold):
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        if better:
            self.metric_value, self.step, self.checkpoint = float(value), step, str(checkpoint)
        return better

    def should_stop(self) -> bool:
        return self.patience > 0 and self.evaluations_without_improvement >= self.patience

    def record(self) -> Optional[dict[str, Any]]:
        """What trainer_state.json keeps under "best" (None before the first evaluation)."""
        return asdict(self) if self.observed_step is not None else None

    def restore(self, saved: Optional[dict[str, Any]]) -> None:
        """Take a record() back (from a checkpoint, or from rank 0); the patience and threshold stay the config's."""
        if not saved or saved.get("metric") != self.metric:
            return  # another metric's best says nothing about this one
        for key in ("metric_value", "step", "checkpoint", "evaluations_without_improvement", "observed_step"):
            setattr(self, key, saved.get(key))
        self.evaluations_without_improvement = int(self.evaluations_without_improvement or 0)


def record_best_in(checkpoint: Path, best: Optional[dict[str, Any]]) -> None:
    """Rewrite `checkpoint`'s state files with the best known after its own evaluation (a benchmark score
    comes after the save): Hugging Face's best_* fields in trainer_state.json, otr's record in otr_state.json.
    Rank 0, on its background file thread, after the save's own rewrite of the files."""
    if best is None:
        return
    try:
        for state_file, fields in ((checkpoint / TRAINER_STATE, best_fields(best)),
                                   (otr_state_file(checkpoint), {"best": best})):
            state = json.loads(state_file.read_text())
            state.update(fields)
            write_json_atomic(state_file, state)
    except FileNotFoundError:
        return  # pruned meanwhile
