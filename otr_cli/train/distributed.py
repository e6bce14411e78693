"""Process-group set-up for one process, torchrun, the deepspeed launcher and srun."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


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


# SLURM's step ids from 0xFFFFFFF0 up name no launched step (slurm.h: the batch script's shell, the extern
# step, the interactive step, pending): a process there is no task of an srun.
FIRST_RESERVED_STEP_ID = 0xFFFFFFF0
# Steps of one job that may run at once and get distinct rendezvous ports; jobs whose ids are less than
# 20000 / STEPS_PER_JOB_PORTS apart (a sweep's array elements sharing a node) never collide either.
STEPS_PER_JOB_PORTS = 16


@dataclass(frozen=True)
class SlurmTask:
    """This process as one task of an srun job step: its rank among the step's tasks, not the job's."""

    job_id: int
    step_id: int
    rank: int
    num_tasks: int
    local_rank: int
    nodelist: str  # the step's hosts (SLURM host-list form); rank 0 runs on the first


def slurm_task(env=os.environ) -> SlurmTask | None:
    """The srun task this process is, from the variables srun sets for its tasks; None when SLURM did not
    start it as a task (no SLURM, a batch script's shell, an salloc shell, a reserved step)."""
    try:
        step_id = int(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "")))
        job_id = int(env["SLURM_JOB_ID"])
        rank = int(env["SLURM_PROCID"])
    except (KeyError, ValueError):
        return None
    if step_id >= FIRST_RESERVED_STEP_ID:
        return None
    # srun also sets SLURM_NTASKS / SLURM_NODELIST to the step's values; the STEP_ names are unambiguous.
    num_tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    return SlurmTask(job_id, step_id, rank, num_tasks, int(env.get("SLURM_LOCALID", "0")), nodelist)


def slurm_rendezvous_port(job_id: int, step_id: int) -> int:
    """The port every task of one job step computes without talking, distinct for the job's other steps."""
    return 20000 + (job_id * STEPS_PER_JOB_PORTS + step_id % STEPS_PER_JOB_PORTS) % 20000


def check_not_a_shell_of_several_tasks(env=os.environ) -> None:
    """Refuse a process in a SLURM allocation of several tasks that srun did not start.

    A batch script's shell (or salloc's) sees SLURM_NTASKS of the whole job; run there, otr would be one
    process using one task's share of the allocation, with a global batch 1/N of the one asked for.
    """
    from otr_cli.errors import UserError

    tasks = int(env.get("SLURM_NTASKS", "1") or "1")
    if "RANK" in env or "SLURM_JOB_ID" not in env or tasks <= 1 or slurm_task(env) is not None:
        return
    raise UserError(f"otr was not started by srun but runs in the shell of SLURM job {env['SLURM_JOB_ID']}, which "
                    f"has {tasks} tasks: it would train alone on one task's share. Launch it as `srun otr train ...` "
                    f"(one rank per task), or `srun --ntasks=1 otr train ...` for a single process.")


def populate_env_from_launcher() -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT when absent.

    torchrun and the deepspeed launcher set them; a task that ``srun`` started gets its rank among its
    job step's tasks, the step's first host and a port of the step's own; a plain single process gets
    a world of one on a free loopback port. Raises UserError in the shell of a SLURM allocation of
    several tasks (srun was forgotten), rather than training on a fraction of it.
    """
    env = os.environ
    task = None if "RANK" in env else slurm_task(env)
    if task is not None and task.num_tasks > 1:
        env["RANK"] = str(task.rank)
        env["WORLD_SIZE"] = str(task.num_tasks)
        env["LOCAL_RANK"] = str(task.local_rank)
        env.setdefault("MASTER_ADDR", first_slurm_host(task.nodelist))
        env.setdefault("MASTER_PORT", str(slurm_rendezvous_port(task.job_id, task.step_id)))
    if "RANK" not in env:
        check_not_a_shell_of_several_tasks(env)
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
    task = slurm_task()
    if task is not None:
        return task.num_tasks
    # A batch script's shell: the tasks `srun otr train` would start there.
    return int(os.environ.get("SLURM_NTASKS", "1") or "1")


def decide_on_main(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone, its result (or the error it raised) on every rank.

    For decisions read from a shared file system (which checkpoint to resume, whether a run directory
    may be used): each rank's own listing can differ on NFS, and ranks that decide differently enter
    different collectives and hang. The result and error must be picklable.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("result", decide())]
        except Exception as exc:  # raised on every rank below
            outcome = [("error", exc)]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_from_all(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank: [value] in a single process.

    For agreements (did any rank's write fail?) where each rank knows something the others must hear
    before any of them takes the next step.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
