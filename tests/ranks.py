"""Start N ranks of `otr` as plain processes with the rendezvous variables set (what srun and torchrun
provide), so a test controls each rank: signal one of them, or see who stops whom."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, subprocess_env


def start_ranks(args: list[str], log_dir: Path, world: int = 2, extra_env: dict[str, str] | None = None,
                script: str | None = None, one_process_group: bool = False) -> list[subprocess.Popen]:
    """`python tests/rank_main.py ARGS` (`otr` that also fails a rank leaving its process groups up) or
    `python SCRIPT ARGS` once per rank; output in log_dir/rank<N>.log.

    one_process_group: the ranks share a process group of their own (rank 0's pid), as the processes of a
    terminal's foreground job do, so that `os.killpg(ranks[0].pid, SIGINT)` is what a Ctrl-C there sends.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    program = [sys.executable, script or str(Path(__file__).parent / "rank_main.py")]
    processes = []
    for rank in range(world):
        env = subprocess_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} | (extra_env or {})
        with (log_dir / f"rank{rank}.log").open("w") as log:
            group = {} if not one_process_group else {"process_group": processes[0].pid if processes else 0}
            processes.append(subprocess.Popen([*program, *args], cwd=REPO, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, **group))
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes once all have exited or the time is up (None: still running)."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in processes):
        time.sleep(0.2)
    return [p.poll() for p in processes]
