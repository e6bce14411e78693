"""What one sweep point asks SLURM for: defaults a GPU job needs, and the summary printed before sbatch.

Left unset, `--mem` and `--cpus-per-task` fall back to the cluster's defaults, which on clusters that
allot memory per CPU give each rank one core and a few GB: an 8B model's rank is killed while it
loads. So when GPUs are requested and the user set neither, a point asks for all of each node's
memory (`--mem=0`) and an equal share of its CPUs per task. CPU-only points keep SLURM's defaults.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Optional

# How long to wait for `sinfo` (it asks the controller) before submitting without a CPU default.
SINFO_TIMEOUT_S = 15


@dataclass(frozen=True)
class SlurmRequest:
    """One sweep point's request, as submitit turns it into #SBATCH lines (None: not asked, SLURM's default).

    mem_gb: per node, 0 meaning all of the node's memory; timeout_min: minutes; cpus_note: where an
    automatic cpus_per_task came from, or why there is none.
    """

    nodes: int
    tasks_per_node: int
    gpus_per_node: Optional[int]
    cpus_per_task: Optional[int]
    mem_gb: Optional[float]
    timeout_min: int
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    cpus_note: str = ""
    mem_note: str = ""


def parse_sinfo_cpus(text: str, partition: Optional[str]) -> Optional[int]:
    """CPUs per node from `sinfo --noheader --format='%P %c'`: the fewest among the partition's nodes.

    Lines are '<partition>[*] <cpus>[+]' ('*' marks the default partition, '+' nodes with more); without
    a partition the default one counts. Partitions may be a comma list, as sbatch takes them.
    """
    wanted = set(partition.split(",")) if partition else None
    counts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        name, cpus = fields
        is_default = name.endswith("*")
        if (name.rstrip("*") in wanted) if wanted else is_default:
            digits = cpus.rstrip("+")
            if digits.isdigit():
                counts.append(int(digits))
    return min(counts) if counts else None


def sinfo_node_cpus(partition: Optional[str]) -> Optional[int]:
    """CPUs per node of `partition` (None: the default partition) as SLURM reports them; None if unknown."""
    command = ["sinfo", "--noheader", "--format=%P %c"] + ([f"--partition={partition}"] if partition else [])
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_sinfo_cpus(result.stdout, partition)


def resolve_request(launcher: Any, node_cpus: Callable[[Optional[str]], Optional[int]] = sinfo_node_cpus
                    ) -> SlurmRequest:
    """The request with otr's GPU defaults filled in; `launcher` is the hydra.launcher node (submitit's keys).

    node_cpus(partition) gives the CPUs per node (called only when a default is needed).
    """
    get = launcher.get
    gpus = get("gpus_per_node") or get("gpus_per_task")
    tasks = int(get("tasks_per_node") or 1)
    cpus, cpus_note = get("cpus_per_task"), ""
    mem, mem_note = get("mem_gb"), ""
    if gpus and cpus is None and get("cpus_per_gpu") is None:
        total = node_cpus(get("partition"))
        if total:
            cpus = max(1, total // tasks)
            cpus_note = f"{total} CPUs per node / {tasks} tasks; launcher.cpus_per_task sets another"
        else:
            cpus_note = ("SLURM's default: sinfo did not say how many CPUs the partition's nodes have; "
                         "set launcher.cpus_per_task")
    if gpus and mem is None and get("mem_per_gpu") is None and get("mem_per_cpu") is None:
        mem, mem_note = 0, "all of each node's (--mem=0); launcher.mem_gb sets another"
    return SlurmRequest(nodes=int(get("nodes") or 1), tasks_per_node=tasks, gpus_per_node=gpus, cpus_per_task=cpus,
                        mem_gb=mem, timeout_min=int(get("timeout_min")), partition=get("partition"),
                        account=get("account"), qos=get("qos"), constraint=get("constraint"), cpus_note=cpus_note,
                        mem_note=mem_note)


def _minutes(timeout_min: int) -> str:
    days, rest = divmod(timeout_min, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return (f"{days}-" if days else "") + f"{hours:02d}:{minutes:02d}:00"


def request_rows(request: SlurmRequest) -> list[tuple[str, str]]:
    """(what, requested) rows of the summary, in sbatch's terms."""
    ranks = request.nodes * request.tasks_per_node
    rows = [("nodes", str(request.nodes)),
            ("tasks", f"{request.tasks_per_node} per node, {ranks} in all (one rank each)"),
            ("GPUs", f"{request.gpus_per_node} per node" if request.gpus_per_node else "none")]
    if request.cpus_per_task is None:
        rows.append(("CPUs", "SLURM's default per task" + (f" ({request.cpus_note})" if request.cpus_note else "")))
    else:
        rows.append(("CPUs", f"{request.cpus_per_task} per task, {request.cpus_per_task * request.tasks_per_node} "
                             f"per node" + (f" ({request.cpus_note})" if request.cpus_note else "")))
    if request.mem_gb is None:
        rows.append(("memory", "SLURM's default"))
    elif request.mem_gb == 0:
        rows.append(("memory", request.mem_note or "all of each node's (--mem=0)"))
    else:
        rows.append(("memory", f"{request.mem_gb:g} GB per node"))
    rows.append(("time", f"{_minutes(request.timeout_min)} ({request.timeout_min} min)"))
    rows.append(("partition", request.partition or "the cluster's default"))
    for key in ("account", "qos", "constraint"):
        value = getattr(request, key)
        if value:
            rows.append((key, str(value)))
    return rows


def print_request(request: SlurmRequest) -> None:
    """The request as a table on stdout, before anything is submitted."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SLURM request of each sweep point", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("requested")
    for what, value in request_rows(request):
        table.add_row(what, value)
    Console().print(table)
