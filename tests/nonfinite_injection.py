"""`otr` with a non-finite value injected into chosen micro-batches, for the non-finite step tests.

OTR_NONFINITE: "loss" (the micro-batch's loss is NaN, and so its gradients) or "grad" (the loss stays
finite, its gradients are NaN); OTR_NONFINITE_STEPS: the optimizer steps (1-based, comma-separated);
OTR_NONFINITE_RANK: the rank (default 0); OTR_NONFINITE_MICRO: the micro-step (default 0).
Run as a script (ranks started by tests/ranks.py), or `install(monkeypatch.setattr)` in the test's process.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch

from otr_cli.cli import main
from otr_cli.train.loop import Trainer
from otr_cli.train.token_loss_model import TokenLossLM

_poison: list[Optional[str]] = [None]  # the kind to inject into the forward now running, if any


class NanGradient(torch.autograd.Function):
    """Identity forward; NaN backward: a finite loss whose gradients are not finite."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def install(patch: Callable = setattr) -> None:
    kind = os.environ["OTR_NONFINITE"]
    steps = {int(s) for s in os.environ["OTR_NONFINITE_STEPS"].split(",")}
    rank = int(os.environ.get("OTR_NONFINITE_RANK", "0"))
    micro = int(os.environ.get("OTR_NONFINITE_MICRO", "0"))
    forward_backward, forward = Trainer.forward_backward, TokenLossLM.forward

    def poisoned_forward_backward(self, batch, micro_step, *args, **kwargs):
        hit = self.dist.rank == rank and self.step + 1 in steps and micro_step == micro
        _poison[0] = kind if hit else None
        try:
            return forward_backward(self, batch, micro_step, *args, **kwargs)
        finally:
            _poison[0] = None

    def poisoned_forward(self, *args, **kwargs):
        loss, stats = forward(self, *args, **kwargs)
        if _poison[0] == "loss":
            loss = loss * float("nan")
        elif _poison[0] == "grad":
            loss = NanGradient.apply(loss)
        return loss, stats

    patch(Trainer, "forward_backward", poisoned_forward_backward)
    patch(TokenLossLM, "forward", poisoned_forward)


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
