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

from otr_cli.config import ConfigError, LossConfig
from otr_cli.train.token_loss_model import ObjectiveSettings

# Phase fields that default to the loss group's value when a phase leaves them unset.
INHERITED = ("k", "temperature", "beta", "baseline", "sft_weight")


@dataclass(frozen=True)
class Phase:
    """Steps [start, end) of the run (optimizer steps, 0-based) trained with `settings`."""

    index: int
    start: int
    end: int
    settings: ObjectiveSettings

    @property
    def label(self) -> str:
        return f"{self.settings.objective} (steps {self.start + 1}-{self.end})"


def build_schedule(loss: LossConfig, total_steps: int) -> list[Phase]:
    """The phases of a run of `total_steps` optimizer steps; raises ConfigError if they do not fit."""
    specs = _phase_specs(loss)
    phases: list[Phase] = []
    start = 0
    for index, spec in enumerate(specs):
        last = index == len(specs) - 1
        steps = spec["steps"]
        end = total_steps if steps == -1 else min(start + steps, total_steps)
        if last and steps != -1 and start + steps < total_steps:
            raise ConfigError(
                f"loss.phases cover {start + steps} optimizer steps but the run has {total_steps}; "
                f"give the last phase steps: -1 (until the end) or lower trainer.max_steps")
        if start >= total_steps:
            break  # later phases are never reached in this run
        phases.append(Phase(index, start, end, _settings(loss, spec)))
        start = end
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase of optimizer step `step` (0-based: the step about to be taken)."""
    for phase in phases:
        if phase.start <= step < phase.end:
            return phase
    return phases[-1]


def objective_at(phases: list[Phase], step: int) -> ObjectiveSettings:
    """Loss settings for optimizer step `step` (0-based: the step about to be taken)."""
    return phase_at(phases, step).settings


def phase_boundaries(phases: list[Phase]) -> dict[int, Phase]:
    """Steps (counted after the step, 1-based) at which a phase ends and another begins."""
    return {phase.end: phase for phase in phases[:-1]}


def _phase_specs(loss: LossConfig) -> list[dict]:
    if loss.phases:
        return [{"steps": phase.steps, "objective": phase.objective,
                 **{key: getattr(phase, key) for key in INHERITED}} for phase in loss.phases]
    unset = dict.fromkeys(INHERITED)
    if loss.sft_warmup_steps > 0:
        return [{"steps": loss.sft_warmup_steps, "objective": "sft", **unset},
                {"steps": -1, "objective": loss.objective, **unset}]
    return [{"steps": -1, "objective": loss.objective, **unset}]


def _settings(loss: LossConfig, spec: dict) -> ObjectiveSettings:
    values = {key: getattr(loss, key) if spec[key] is None else spec[key] for key in INHERITED}
    if spec["objective"] == "sft":
        values["sft_weight"] = 0.0  # plain SFT: the CE mix would count the same term twice
    return ObjectiveSettings(objective=spec["objective"], chunk_size=loss.chunk_size,
                             implementation=loss.implementation, **values)
