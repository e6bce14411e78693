"""Which AdamW runs: torch's (the default) or DeepSpeed's own.

DeepSpeed's FusedAdam is JIT-compiled with nvcc when the engine starts, which fails on compute
nodes without a CUDA toolkit; torch's fused AdamW ships compiled. ZeRO-Offload keeps DeepSpeed's
DeepSpeedCPUAdam (compiled with the host's C++ compiler): DeepSpeed refuses a client optimizer there.
"""

from __future__ import annotations

from typing import Iterable

from otr_cli.config import DeepSpeedConfig, OptimConfig


def deepspeed_builds_optimizer(ds: DeepSpeedConfig) -> bool:
    """True when the DeepSpeed JSON declares the optimizer; False when otr passes torch's AdamW in."""
    return ds.optimizer == "deepspeed" or ds.offload_optimizer


def describe_optimizer(ds: DeepSpeedConfig, on_gpu: bool) -> str:
    """The implementation a run will use, for the dry run and the logs."""
    if ds.offload_optimizer:
        return "DeepSpeedCPUAdam (deepspeed.offload_optimizer=true: the update runs on the CPU)"
    if ds.optimizer == "deepspeed":
        return ("DeepSpeed FusedAdam (deepspeed.optimizer=deepspeed; compiled with nvcc at start-up)" if on_gpu
                else "torch.optim.AdamW, built by DeepSpeed (FusedAdam needs CUDA)")
    return "torch.optim.AdamW(fused=True)" if on_gpu else "torch.optim.AdamW"


def build_torch_adamw(parameters: Iterable, optim: OptimConfig, on_gpu: bool):
    """torch's AdamW with the recipe's settings, handed to deepspeed.initialize as the client optimizer.

    On CPU it is the same AdamW (no fused, no foreach) that DeepSpeed builds for `torch_adam`, so CPU
    runs and their checkpoints are unchanged.
    """
    import torch

    kwargs = {"fused": True} if on_gpu else {}
    return torch.optim.AdamW(parameters, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, **kwargs)
