"""The methods the study compares, each a set of `loss.*` overrides of `otr train`.

Every method trains for the same optimizer steps, batch, learning rate and seeds; they differ
only in the objective (and, for the warm-up methods, in when it takes over). OTR settings are
the paper's: K=256 samples, rollout temperature 1.3, beta -0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from otr_cli.errors import UserError

# The paper's OTR settings (arXiv 2509.26313): the defaults the ablations vary one at a time.
OTR_DEFAULTS = {"k": 256, "temperature": 1.3, "beta": -0.1}

# Ablation grid: each axis is varied alone, the others stay at OTR_DEFAULTS.
ABLATION_GRID: dict[str, tuple[float, ...]] = {"k": (1, 8, 64, 256), "temperature": (1.0, 1.3),
                                               "beta": (0.0, -0.1, -0.5)}


@dataclass(frozen=True)
class Method:
    """One compared method.

    objective: `loss.objective` after the warm-up (the `loss` config group of the same name).
    warmup: SFT for the study's warm-up steps first (`loss.sft_warmup_steps`), then `objective`.
    baseline: `loss.baseline` of the OTR objectives (none, mean, loo).
    """

    name: str
    objective: str
    warmup: bool
    baseline: str
    label: str

    @property
    def uses_otr_settings(self) -> bool:
        return self.objective in ("otr", "otr_exact")

    def overrides(self, warmup_steps: int, otr: Optional[dict[str, float]] = None) -> list[str]:
        """`otr train` overrides for this method; `otr` replaces some of OTR_DEFAULTS (ablations).

        The `loss` group is chosen on the command line, and the schedule keys are always set,
        because the base recipes set their own warm-up (smollm2_demo: 16 steps) and it would
        otherwise leak into methods that must not have one.
        """
        values = {**OTR_DEFAULTS, **(otr or {})}
        result = [f"loss={self.objective}", f"loss.sft_warmup_steps={warmup_steps if self.warmup else 0}",
                  "loss.phases=[]"]
        if self.uses_otr_settings:
            if self.objective == "otr":  # otr_exact sums over the vocabulary: no samples
                result.append(f"loss.k={int(values['k'])}")
            result += [f"loss.temperature={values['temperature']}", f"loss.beta={values['beta']}",
                       f"loss.baseline={self.baseline}"]
        return result


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "sft", warmup=False, baseline="none", label="SFT"),
    Method("otr", "otr", warmup=False, baseline="none", label="OTR"),
    Method("warmup_otr", "otr", warmup=True, baseline="none", label="SFT warm-up, then OTR"),
    Method("warmup_otr_loo", "otr", warmup=True, baseline="loo", label="SFT warm-up, then OTR (loo baseline)"),
    Method("dft", "dft", warmup=False, baseline="none", label="DFT"),
    Method("otr_exact", "otr_exact", warmup=False, baseline="none", label="OTR-exact"),
)}

# Methods the ablations may vary (K only matters for the sampled objective).
ABLATION_METHODS = tuple(name for name, m in METHODS.items() if m.objective == "otr")


class StudyError(UserError, ValueError):
    """Bad study options or an inconsistent cache; the message names the option or directory."""


def check_methods(names: list[str]) -> list[str]:
    """The names in study order; raises StudyError naming --methods for an unknown one."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise StudyError(f"--methods: unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    return [n for n in METHODS if n in names]
