"""Which GPU a training process drives.

Launchers disagree on what a task sees. torchrun, the deepspeed launcher and plain `srun` on most
clusters show every task all of the node's GPUs and expect task LOCAL_RANK to drive GPU LOCAL_RANK.
Clusters that bind GPUs per task (`--gpus-per-task=1`, `--gpu-bind=single:1`, cgroup-constrained
devices) show each task only its own GPU, as device 0, while LOCAL_RANK still counts 0..7.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from otr_cli.errors import UserError

log = logging.getLogger("otr.train")


class PlacementError(UserError, RuntimeError):
    """The process cannot tell which of the GPUs it sees is its own."""


def cuda_device_index(local_rank: int, visible_devices: int, cuda_visible_devices: Optional[str] = None) -> int:
    """Index, among the GPUs this process sees, of the one it should drive.

    local_rank: this process's rank on its node (LOCAL_RANK); visible_devices: torch.cuda.device_count()
    (>= 1); cuda_visible_devices: the environment variable's value, only to explain an error.
    """
    if local_rank < visible_devices:
        return local_rank
    if visible_devices == 1:
        return 0  # the cluster gave this task exactly its own GPU
    raise PlacementError(
        f"LOCAL_RANK={local_rank} but this process sees {visible_devices} GPUs "
        f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}): otr drives one GPU per process, GPU LOCAL_RANK when a "
        f"process sees all of its node's GPUs, or the only one it sees. Start as many tasks per node as GPUs "
        f"(launcher.tasks_per_node = launcher.gpus_per_node, torchrun --nproc-per-node = GPUs per node) and let "
        f"each task see either all GPUs of its node or exactly one.")


def bind_cuda_device() -> int:
    """Make the current CUDA device this process's GPU; returns its index. Call before DeepSpeed starts.

    DeepSpeed reads LOCAL_RANK as a device index in several places (the engine, zero.Init, NCCL's
    device_id), so where each task sees only its own GPU, LOCAL_RANK is set to that index (0) too.
    """
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    index = cuda_device_index(local_rank, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if index != local_rank:
        log.info("this task sees only its own GPU (CUDA_VISIBLE_DEVICES=%s): local rank %d drives device %d",
                 os.environ.get("CUDA_VISIBLE_DEVICES"), local_rank, index)
        os.environ["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return index
