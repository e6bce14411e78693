"""Objective schedules: which loss is in force at each optimizer step.

A run is a list of phases, each one objective for a number of optimizer steps. The schedule
is a pure function of the step, so a resumed run lands in the right phase at the right step
without storing anything. Three spellings of the same thing:

- ``loss.objective=otr`` alone: one phase for the whole run;
- ``loss.sft_warmup_steps=N``: SFT for the first N steps, then ``loss.objective``;
- ``loss.phases=[{objective: sft, steps: 16}, {objective: otr}]``: the general form, where a
  phase may also override ``k``, ``temperature``, ``beta``, ``baseline`` and ``sft_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

from otr_cli.config import LossConfig, PhaseConfig, check_phases_cover, loss_options
from otr_cli.losses import LossOptions


@dataclass(frozen=True)
class Phase:
    """Steps [start, end) of the run (optimizer steps, 0-based) trained with the loss `options`."""

    index: int
    start: int
    end: int
    options: LossOptions

    @property
    def label(self) -> str:
        return f"{self.options.objective} (steps {self.start + 1}-{self.end})"


def build_schedule(loss: LossConfig, total_steps: int) -> list[Phase]:
    """The phases of a run of `total_steps` optimizer steps; raises ConfigError if they do not fit."""
    check_phases_cover(loss, total_steps)
    phases: list[Phase] = []
    start = 0
    for index, spec in enumerate(schedule_phases(loss)):
        end = total_steps if spec.steps == -1 else min(start + spec.steps, total_steps)
        if start >= total_steps:
            break  # later phases are never reached in this run
        phases.append(Phase(index, start, end, loss_options(loss, spec, f"loss.phases[{index}]")))
        start = end
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase of optimizer step `step` (0-based: the step about to be taken)."""
    for phase in phases:
        if phase.start <= step < phase.end:
            return phase
    return phases[-1]


def objective_at(phases: list[Phase], step: int) -> LossOptions:
    """Loss settings for optimizer step `step` (0-based: the step about to be taken)."""
    return phase_at(phases, step).options


def phase_boundaries(phases: list[Phase]) -> dict[int, Phase]:
    """Steps (counted after the step, 1-based) at which a phase ends and another begins."""
    return {phase.end: phase for phase in phases[:-1]}


def schedule_phases(loss: LossConfig) -> list[PhaseConfig]:
    """The schedule as phases, whichever of the three spellings wrote it."""
    if loss.phases:
        return list(loss.phases)
    if loss.sft_warmup_steps > 0:
        return [PhaseConfig(objective="sft", steps=loss.sft_warmup_steps), PhaseConfig(objective=loss.objective)]
    return [PhaseConfig(objective=loss.objective)]
