"""Process-group set-up for one process, torchrun, the deepspeed launcher and srun."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[003-005,9]' or 'a,b'."""
    head = nodelist.split(",")[0]
    if "[" in nodelist:
        prefix, rest = nodelist.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        return prefix + first
    return head


def populate_env_from_launcher() -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT when absent.

    torchrun and the deepspeed launcher set them; under ``srun`` SLURM's own variables are
    mapped; a plain single process gets a world of one on a free loopback port.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # Every task of a job must agree on the port without talking: derive it from the job id.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env:
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(timeout_min: float = 30.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPU, gloo on CPU.

    A collective waiting longer than `timeout_min` raises instead of hanging (a dead or stuck rank).
    """
    import deepspeed

    populate_env_from_launcher()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   timeout=timedelta(minutes=timeout_min))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def world_size_from_env() -> int:
    """World size a launch will have, without initialising anything (for dry runs)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
