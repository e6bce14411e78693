"""A throw-away one-node SLURM cluster on loopback, for the scale-out tests.

Everything lives in one directory: slurm.conf, state, spool, logs and pid files; the daemons
listen on free ports of their own, so the cluster cannot collide with another one on the
machine. The settings are the ones verified in DESIGN.md section 4 (no auth, no cgroups,
processes tracked by /proc). Jobs run as the user who started the daemons.

Also usable by hand:  python tests/slurm_cluster.py start DIR   (prints `export SLURM_CONF=...`)
                      python tests/slurm_cluster.py stop DIR
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SLURMCTLD = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
SLURMD = shutil.which("slurmd") or "/usr/sbin/slurmd"


def slurm_available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    for tool in (SLURMCTLD, SLURMD):
        if not os.access(tool, os.X_OK):
            return f"{Path(tool).name} is not installed (apt-get install slurmctld slurmd slurm-client)"
    for tool in ("sbatch", "squeue", "scontrol", "srun"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (apt-get install slurm-client)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SlurmCluster:
    """slurmctld + slurmd for one node named after this host, configured under `root`."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname()
        # At least 2: the 2-task test needs them; config_overrides below lets a 1-core machine pretend.
        self.cpus = cpus or max(2, os.cpu_count() or 1)

    @property
    def env(self) -> dict[str, str]:
        """Variables that point the SLURM client tools at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _pid_file(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=otrtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job waits cred_expire seconds (default 120) before it may start again.
            "AuthInfo=cred_expire=5",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # Short timers: the tests wait on job state changes.
            "SchedulerParameters=sched_interval=1",
            "MessageTimeout=30",
            "KillWait=10",
            "InactiveLimit=0",
            "MinJobAge=300",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self._pid_file('slurmctld')}",
            f"SlurmdPidFile={self._pid_file('slurmd')}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        env = os.environ | self.env
        # -i: ignore state left by an earlier cluster in this directory; both daemons fork into the background.
        subprocess.run([SLURMCTLD, "-f", str(self.conf), "-i"], env=env, check=True)
        subprocess.run([SLURMD, "-f", str(self.conf)], env=env, check=True)
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            state = result.stdout.strip()
            if result.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"the test SLURM node did not become idle in {timeout:.0f} s (state {state!r}):\n{logs}")

    def stop(self) -> None:
        """Stop both daemons by their pid files (never by name: other clusters may run here)."""
        for daemon in ("slurmd", "slurmctld"):
            pid_file = self._pid_file(daemon)
            if not pid_file.is_file():
                continue
            pid = int(pid_file.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    action, directory = sys.argv[1], Path(sys.argv[2]).resolve()
    cluster = SlurmCluster(directory)
    if action == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    elif action == "stop":
        cluster.stop()
    else:
        raise SystemExit("usage: slurm_cluster.py start|stop DIR")
