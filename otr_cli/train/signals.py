"""Warn when OTR has no on-policy signal to learn from.

OTR's expected gradient weights the target by q(y), the rollout probability of the target
token. Two ways that weight vanishes, each watched as a mean over the last ``patience`` OTR
steps; the first to fire is reported, once per run:

* the match rate is near zero: the model almost never samples the targets at all (a model that
  has never seen the data's format);
* many targets are unreachable (q(y) < 1e-3) although the match rate looks healthy: the easy
  tokens match, while on a growing set of positions the model is confidently wrong and OTR only
  sharpens its own guess there. This is how plain OTR failed in the study (docs/results.md): the
  match rate climbed to 0.88 while the targets' cross-entropy rose.

Both point to the same remedies (docs/loss.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from otr_cli.losses.objectives import UNREACHABLE_Q

REMEDIES = ("Try an SFT warm-up (loss.sft_warmup_steps=N), a lower loss.temperature, loss.beta=0 or "
            "loss.baseline=mean, or loss.sft_weight>0 (docs/loss.md, 'When OTR learns').")


@dataclass
class WeakSignalMonitor:
    """Feed it every optimizer step's record; ``observe`` returns a warning text at most once.

    Both rules look at the means over the last ``patience`` OTR steps in a row (a per-step value of
    a few hundred positions is noisy: one batch of easy targets must not reset the watch):
    threshold: a mean match rate (fraction of samples equal to the target) under this is weak.
    unreachable_threshold: a mean fraction of positions with q(y) < 1e-3 over this is weak
    (1.0 turns the rule off). SFT and DFT steps empty the window.
    """

    threshold: float = 0.01
    patience: int = 20
    unreachable_threshold: float = 0.04
    window: list[dict[str, Any]] = field(default_factory=list)
    # Which rule fired: None until the warning, then "match_rate" or "unreachable".
    fired_rule: Optional[str] = None

    @classmethod
    def from_config(cls, loss: Any) -> "WeakSignalMonitor":
        """The monitor a run with this ``LossConfig`` uses (loss.weak_signal_* and loss.unreachable_threshold)."""
        return cls(threshold=loss.weak_signal_threshold, patience=loss.weak_signal_steps,
                   unreachable_threshold=loss.unreachable_threshold)

    def observe(self, record: dict[str, Any]) -> Optional[str]:
        """Feed one step's record; returns the warning text the first time either rule fires."""
        if record.get("objective") not in ("otr", "otr_exact") or "match_rate" not in record:
            self.window.clear()
            return None
        self.window = (self.window + [record])[-self.patience:]
        if self.fired_rule or len(self.window) < self.patience:
            return None
        if _mean(self.window, "match_rate") < self.threshold:
            self.fired_rule = "match_rate"
            return self._low_match_message(record)
        if all("unreachable_frac" in r for r in self.window) and \
                _mean(self.window, "unreachable_frac") > self.unreachable_threshold:
            self.fired_rule = "unreachable"
            return self._unreachable_message(record)
        return None

    def _low_match_message(self, record: dict[str, Any]) -> str:
        return (
            f"weak OTR signal: match rate {100 * _mean(self.window, 'match_rate'):.2f}% (< "
            f"{100 * self.threshold:.0f}%) over the last {len(self.window)} steps (step {record['step']}), p(target) "
            f"{record.get('p_target', float('nan')):.4f}. The model rarely samples the target tokens, so OTR "
            f"mostly sharpens its own guesses. {REMEDIES}")

    def _unreachable_message(self, record: dict[str, Any]) -> str:
        first_ce, last_ce = _mean(self.window[:5], "ce"), _mean(self.window[-5:], "ce")
        return (
            f"weak OTR signal: {100 * _mean(self.window, 'unreachable_frac'):.1f}% of target tokens have rollout "
            f"probability q(target) < {UNREACHABLE_Q:g} (> {100 * self.unreachable_threshold:g}%) over the last "
            f"{len(self.window)} steps (step {record['step']}), while the match rate is "
            f"{100 * _mean(self.window, 'match_rate'):.0f}%; the targets' cross-entropy went from {first_ce:.3f} "
            f"to {last_ce:.3f} nats (first and last 5 of those steps). OTR weights each target's gradient by "
            f"q(target), so the model does not learn these tokens and mostly sharpens its own confident guesses "
            f"there. {REMEDIES}")


def _mean(records: list[dict[str, Any]], key: str) -> float:
    return sum(r.get(key, float("nan")) for r in records) / len(records)
