"""The learning-rate schedule: ``optim.scheduler`` and its knobs as a ``transformers.get_scheduler`` call.

transformers builds the schedule, so a run has the learning rate at every step that a Trainer or
TRL run with the same settings has (warm-up from 0, ``warmup_ratio`` rounded up). The result is a
torch ``LambdaLR``: DeepSpeed steps it after each optimizer step and saves it in checkpoints.

optim.scheduler (min_lr_ratio)   transformers name       scheduler_specific_kwargs
constant                         constant_with_warmup    -
linear (0)                       linear                  -
linear (> 0)                     warmup_stable_decay     no stable part, linear decay to min_lr_ratio
cosine (0)                       cosine                  -
cosine (> 0), cosine_with_min_lr cosine_with_min_lr      min_lr_rate=min_lr_ratio
warmup_stable_decay              warmup_stable_decay     num_decay_steps=ceil(decay_ratio * steps),
                                                         min_lr_ratio
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from otr_cli.config import OptimConfig


@dataclass(frozen=True)
class TransformersSchedule:
    """The arguments of ``transformers.get_scheduler`` (all but the optimizer)."""

    name: str
    num_warmup_steps: int
    num_training_steps: int
    scheduler_specific_kwargs: dict[str, Any] = field(default_factory=dict)


def warmup_steps_for(optim: OptimConfig, total_steps: int) -> int:
    """optim.warmup_steps if set, else warmup_ratio of the steps rounded up (as transformers rounds it)."""
    if optim.warmup_steps > 0:
        return optim.warmup_steps
    return math.ceil(optim.warmup_ratio * total_steps)


def transformers_schedule(optim: OptimConfig, total_steps: int) -> TransformersSchedule:
    warmup = warmup_steps_for(optim, total_steps)
    name, kwargs = optim.scheduler, {}
    if name == "constant":
        name = "constant_with_warmup"
    elif name == "linear" and optim.min_lr_ratio > 0:
        # transformers' linear schedule ends at 0; its linear decay to a floor is a WSD with no stable part.
        name = "warmup_stable_decay"
        # (transformers makes the stable part the steps left after warm-up and decay: none here.)
        kwargs = {"num_decay_steps": max(0, total_steps - warmup), "decay_type": "linear",
                  "min_lr_ratio": optim.min_lr_ratio}
    elif name == "cosine_with_min_lr" or (name == "cosine" and optim.min_lr_ratio > 0):
        name, kwargs = "cosine_with_min_lr", {"min_lr_rate": optim.min_lr_ratio}
    elif name == "warmup_stable_decay":
        decay = min(math.ceil(optim.decay_ratio * total_steps), max(0, total_steps - warmup))
        kwargs = {"num_decay_steps": decay, "min_lr_ratio": optim.min_lr_ratio}
    return TransformersSchedule(name, warmup, total_steps, kwargs)


def build_lr_scheduler(optimizer: Any, optim: OptimConfig, total_steps: int) -> Any:
    """The torch LR scheduler of `optim` for a run of `total_steps` optimizer steps."""
    from transformers import get_scheduler

    schedule = transformers_schedule(optim, total_steps)
    return get_scheduler(schedule.name, optimizer, num_warmup_steps=schedule.num_warmup_steps,
                         num_training_steps=schedule.num_training_steps,
                         scheduler_specific_kwargs=schedule.scheduler_specific_kwargs or None)
