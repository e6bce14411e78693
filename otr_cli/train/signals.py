"""Warn when OTR has no on-policy signal to learn from.

OTR's expected gradient weights the target by q(y), the rollout probability of the target
token; when the model almost never samples the target (match rate near zero) the update mostly
sharpens the model's own guesses (docs/loss.md). This watches the match rate and says so once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class WeakSignalMonitor:
    threshold: float = 0.01
    patience: int = 20
    low_steps: list[float] = field(default_factory=list)
    warned: bool = False

    def observe(self, record: dict[str, Any]) -> Optional[str]:
        """Feed one step's record; returns the warning text the first time it fires."""
        if record.get("objective") not in ("otr", "otr_exact") or "match_rate" not in record:
            self.low_steps.clear()
            return None
        if record["match_rate"] >= self.threshold:
            self.low_steps.clear()
            return None
        self.low_steps.append(record["match_rate"])
        if self.warned or len(self.low_steps) < self.patience:
            return None
        self.warned = True
        mean_match = sum(self.low_steps) / len(self.low_steps)
        message = (
            f"weak OTR signal: match rate {100 * mean_match:.2f}% (< {100 * self.threshold:.0f}%) for the last "
            f"{len(self.low_steps)} steps (step {record['step']}), p(target) {record.get('p_target', float('nan')):.4f}. "
            "The model rarely samples the target tokens, so OTR mostly sharpens its own guesses. Try an SFT "
            "warm-up (loss.sft_warmup_steps=N), a lower loss.temperature, loss.beta=0 or loss.baseline=mean, "
            "or loss.sft_weight>0 (docs/loss.md).")
        return message
