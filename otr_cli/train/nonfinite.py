"""A step whose loss or gradient is not finite (NaN, inf): trainer.on_nonfinite and trainer.max_nonfinite_skips.

Who sees what, before the update it decides on:

- the loss: the step's summed loss, all-reduced with the step's statistics (the loop's one host read,
  made before the optimizer step rather than after it);
- the gradients under ZeRO-0 with a plain torch optimizer (fp32): nothing in DeepSpeed looks at them,
  so the loop puts their norm (rank 0's copy; every rank holds the same averaged gradients) into the
  same all-reduce;
- the gradients everywhere else (ZeRO 1-3, bf16, fp16): DeepSpeed's optimizer computes the global
  norm over the partitions, all-reduced, and skips its update when it is not finite (fp16: the
  loss-scale overflow). ``engine.was_step_applied()`` tells afterwards, the same on every rank.

A skip leaves the weights and the optimizer state (Adam moments, step counts) as they were: when
DeepSpeed skips, it clears the gradients before its update; when this module decides (the loss, or
ZeRO-0's gradients), the inner torch optimizer's ``step`` is replaced by a no-op for that one call,
so DeepSpeed's own bookkeeping (clearing gradients, counters) runs as for any step. The learning-rate
schedule advances on a skipped step like on any other: it stays a function of the step counter, as
the data order does (when DeepSpeed skipped, its engine held the schedule back: stepped here).
fp16's loss-scale overflow stays DeepSpeed's: it skips and lowers the scale; it is reported, not
counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from otr_cli.errors import UserError

log = logging.getLogger("otr.train")

# Example ids named in the one-line message; metrics.jsonl's record of the step holds all of them.
IDS_IN_MESSAGE = 16


class NonFiniteStop(UserError):
    """The run stopped at a step whose loss or gradient was not finite (on_nonfinite=stop, or too many skips)."""


def inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers that update the weights inside DeepSpeed's wrapper (ZeRO, bf16, fp16 optimizers
    hold theirs in ``.optimizer``; ZeRO-3 with offload may also step a ``backup_optimizer``)."""
    found = []
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        backup = getattr(optimizer, "backup_optimizer", None)
        if isinstance(backup, torch.optim.Optimizer):
            found.append(backup)
        optimizer = optimizer.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        found.append(optimizer)
    return found


def _no_update(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def updates_skipped(optimizers: list[torch.optim.Optimizer]) -> Iterator[None]:
    """Within: each optimizer's ``step`` does nothing (weights, moments and step counts stay as they are).

    An instance attribute shadows the class's method; the LR scheduler may have put a wrapper of its own
    there (it counts optimizer steps), which is put back afterwards.
    """
    previous = [optimizer.__dict__.get("step") for optimizer in optimizers]
    for optimizer in optimizers:
        optimizer.step = _no_update
    try:
        yield
    finally:
        for optimizer, step in zip(optimizers, previous):
            if step is None:
                del optimizer.step
            else:
                optimizer.step = step


@dataclass
class StepOutcome:
    """What happened to one optimizer step's update; `fields` go into the step's metrics record."""

    skipped: bool
    cause: Optional[str] = None  # "loss" | "gradient" when skipped for a non-finite value
    fields: dict[str, Any] = field(default_factory=dict)


class NonFiniteGuard:
    """trainer.on_nonfinite for one run: decides, skips and counts consecutive skips on every rank alike.

    engine: ``train/engine.TrainingEngine``. Every decision is made from numbers every rank holds alike
    (an all-reduced loss and gradient norm, DeepSpeed's all-reduced overflow flag), so every rank skips
    or stops at the same step without another collective.
    """

    def __init__(self, policy: str, max_skips: int, engine, is_main: bool):
        self.policy = policy
        self.max_skips = max_skips
        self.engine = engine
        self.is_main = is_main
        self.optimizers = inner_optimizers(engine.deepspeed.optimizer)
        # DeepSpeed's wrappers carry an `overflow` flag and check the gradient norm; a plain torch optimizer
        # (ZeRO-0, fp32) does not, and its gradients sit in the parameters' .grad for the loop to measure.
        self.loop_checks_gradients = not hasattr(engine.deepspeed.optimizer, "overflow")
        self.consecutive = 0
        self._decided: Optional[str] = None

    def gradient_norm_on_device(self, rank: int) -> torch.Tensor:
        """ZeRO-0, plain optimizer: the global gradient norm as a float64 scalar on the device, on rank 0 (0 on
        the others, so that a sum over ranks gives rank 0's; all ranks hold the same averaged gradients)."""
        module = self.engine.deepspeed.module
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        device = self.engine.deepspeed.device
        if rank != 0 or not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        return torch.linalg.vector_norm(norms).to(torch.float64)

    @contextlib.contextmanager
    def update(self, loss: float, gradient_norm: Optional[float]) -> Iterator[None]:
        """Around the engine's optimizer step: skips the update when the all-reduced loss or (ZeRO-0) the
        gradient norm is not finite."""
        self._decided = ("loss" if not math.isfinite(loss)
                         else "gradient" if gradient_norm is not None and not math.isfinite(gradient_norm)
                         else None)
        if self._decided is None:
            yield
            return
        with updates_skipped(self.optimizers):
            yield

    def conclude(self, step: int, example_ids: Callable[[], list[int]], last_checkpoint: Optional[Path],
                 write_metrics: Callable[[dict], None]) -> StepOutcome:
        """After the engine's step of optimizer step `step` (1-based): what happened, logged and recorded;
        raises NonFiniteStop when the policy says stop. Same result on every rank."""
        deepspeed = self.engine.deepspeed
        cause, self._decided = self._decided, None
        deepspeed_skipped = not deepspeed.was_step_applied()
        if cause is None and deepspeed_skipped:
            if self.engine.precision == "fp16":
                return self._loss_scale_overflow(step, write_metrics)
            cause = "gradient"  # DeepSpeed found the global gradient norm not finite
        if cause is None:
            self.consecutive = 0
            return StepOutcome(skipped=False)
        if deepspeed_skipped and deepspeed.lr_scheduler is not None:
            deepspeed.lr_scheduler.step()  # the schedule follows the step counter (see the module's docstring)
        self.consecutive += 1
        ids = example_ids()
        what = "loss" if cause == "loss" else "gradient norm"
        if self.policy == "stop" or self.consecutive > self.max_skips:
            reason = ("trainer.on_nonfinite=stop" if self.policy == "stop" else
                      f"{self.consecutive} non-finite steps in a row, more than trainer.max_nonfinite_skips="
                      f"{self.max_skips}")
            shown = ", ".join(str(i) for i in ids[:IDS_IN_MESSAGE]) + (
                f", ... ({len(ids)} in all, listed in metrics.jsonl)" if len(ids) > IDS_IN_MESSAGE else "")
            resume = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None
                      else "no checkpoint was saved before it")
            message = (f"step {step}: the {what} is not finite ({reason}); the step's training examples "
                       f"(indices into the training set): [{shown}]; nothing was saved after it, {resume}. "
                       f"Look at these examples or lower optim.lr, then resume (trainer.resume=auto).")
            write_metrics({"step": step, "nonfinite": cause, "stopped": True, "example_ids": ids, "error": message})
            raise NonFiniteStop(message)
        warning = (f"step {step}: the {what} is not finite; skipped the update (weights and optimizer state "
                   f"unchanged), {self.consecutive} in a row of at most trainer.max_nonfinite_skips={self.max_skips}")
        if self.is_main:
            log.warning(warning)
        write_metrics({"step": step, "nonfinite": cause, "skipped": True, "consecutive_skips": self.consecutive,
                       "example_ids": ids, "warning": warning})
        return StepOutcome(skipped=True, cause=cause, fields={"skipped": True, "nonfinite": cause})

    def _loss_scale_overflow(self, step: int, write_metrics: Callable[[dict], None]) -> StepOutcome:
        """fp16: DeepSpeed skipped the update and lowered its loss scale; neither counted nor a reason to stop."""
        scale = getattr(self.engine.deepspeed.optimizer, "loss_scale", None)
        scale = float(scale) if scale is not None else None
        if self.is_main:
            log.info("step %d: fp16 loss-scale overflow; DeepSpeed skipped the update and lowered the loss scale "
                     "to %s", step, scale)
        return StepOutcome(skipped=True, fields={"skipped": True, "loss_scale_overflow": True, "loss_scale": scale})
