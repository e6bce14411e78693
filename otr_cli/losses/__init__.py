"""Token losses for LM fine-tuning: sft, dft, otr (One-Token Rollout) and otr_exact.

``fused_token_loss`` is the chunked kernel used for training (never holds N x V logits);
``reference_token_loss`` is the naive autograd definition used by tests and benchmarks.
See docs/loss.md for the formulas and knobs.
"""

from otr_cli.losses.fused import default_chunk_rows, fused_token_loss
from otr_cli.losses.objectives import (
    BASELINES,
    KERNEL_REDUCTIONS,
    OBJECTIVES,
    LossOptionError,
    LossOptions,
    make_options,
)
from otr_cli.losses.reference import reference_token_loss

__all__ = [
    "BASELINES",
    "OBJECTIVES",
    "KERNEL_REDUCTIONS",
    "LossOptionError",
    "LossOptions",
    "default_chunk_rows",
    "fused_token_loss",
    "make_options",
    "reference_token_loss",
]
