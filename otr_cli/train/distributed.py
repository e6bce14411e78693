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


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _expand_ranges(ranges: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; zero padding follows the range's first bound."""
    values = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        if not high:
            values.append(low)
            continue
        width = len(low) if low.startswith("0") else 0
        values += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return values


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM host list, in order, as ``scontrol show hostnames`` prints them.

    Forms: 'a,b', 'gpu[01-04]', 'gpu[1,3-5]', 'a[1-2],b[3]', and several bracket groups in one name
    ('rack[1-2]-n[08-10]', the leftmost varying slowest).
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        expansions = [""]
        rest = name
        while "[" in rest:
            prefix, _, tail = rest.partition("[")
            ranges, _, rest = tail.partition("]")
            expansions = [done + prefix + value for done in expansions for value in _expand_ranges(ranges)]
        hosts += [done + rest for done in expansions if done + rest]
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """The job's first host, where rank 0 runs: from `scontrol show hostnames` where it works, else parsed."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            # A local parse, no controller involved; but with a broken SLURM_CONF scontrol retries for a
            # minute, so give up early and parse.
            shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   timeout=5, check=True).stdout.split()
            if shown:
                return shown[0]
        except (OSError, subprocess.SubprocessError):
            pass  # no SLURM configuration on this machine: parse it ourselves
    hosts = expand_hostlist(nodelist)
    return hosts[0] if hosts else "127.0.0.1"


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
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
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

    from otr_cli.placement import bind_cuda_device

    populate_env_from_launcher()
    local_rank = int(os.environ["LOCAL_RANK"])  # the rank on this node, before bind_cuda_device may remap it
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        bind_cuda_device()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   timeout=timedelta(minutes=timeout_min))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


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
