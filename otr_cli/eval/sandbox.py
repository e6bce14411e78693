"""Run untrusted generated code in a separate, limited process and say whether it finished.

Each run: a fresh process in its own session, a fresh working directory, a wall-clock timeout,
rlimits on memory (address space), CPU time, output/file size, open files and processes, a
scrubbed environment, and (when the machine allows) Linux namespaces: no network, a private PID
namespace (everything the program spawned dies with it) and a private /tmp. In namespaces every
mount is read-only except a fresh /tmp, and the program holds no capabilities.

A run passes only if the harness printed the random nonce it received on stdin, which it does
after the program *and* the check call returned: exiting early with status 0, killing itself or
never reaching the check all count as failures. See ``docs/eval.md`` for the threat model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from otr_cli.errors import UserError

log = logging.getLogger("otr.eval.sandbox")

HARNESS = Path(__file__).with_name("sandbox_harness.py")


def sandbox_python_command() -> list[str]:
    """How the sandbox starts the harness, with nothing that must be visible inside it.

    The namespaces hide /tmp behind a private tmpfs, and a virtual environment or checkout may
    live under /tmp (CI clones there): so run the interpreter the venv links to, and hand over the
    harness as source (it uses the standard library only).
    """
    return [os.path.realpath(sys.executable), "-I", "-c", HARNESS.read_text()]
ISOLATIONS = ("auto", "namespaces", "user_namespaces", "rlimits")
# Mounted fresh inside the mount namespace, so files written there vanish with the run.
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


class IsolationError(UserError, RuntimeError):
    """The requested sandbox isolation is unknown or not available on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. memory_mb bounds the address space (RLIMIT_AS)."""

    timeout_s: float = 10.0
    memory_mb: int = 2048
    cpu_s: int = 10
    output_bytes: int = 1_000_000
    max_processes: int = 64
    open_files: int = 64


@dataclass(frozen=True)
class Isolation:
    """How runs are isolated on this machine.

    name: "namespaces" (root: unshare net+pid+mount; the program keeps uid 0 but holds no
        capabilities and sees every mount read-only, see ``_unshare_prefix``), "user_namespaces"
        (non-root unshare with --map-root-user), or "rlimits" (resource limits and an in-process
        network guard only). In every mode the program runs as the user otr runs as.
    prefix: the command that wraps the harness (empty for rlimits).
    """

    name: str
    prefix: tuple[str, ...]
    private_tmp: bool
    read_only_fs: bool = False

    def describe(self) -> str:
        parts = {"namespaces": "network, PID and mount namespaces (unshare), read-only filesystem with a "
                               "private /tmp, no capabilities",
                 "user_namespaces": "user, network, PID and mount namespaces (unshare --map-root-user), private /tmp",
                 "rlimits": "resource limits, own session and an in-process network guard only "
                            "(no namespaces available)"}[self.name]
        if self.private_tmp and not self.read_only_fs:
            parts += " (but the filesystem outside /tmp is NOT read-only here: the remount was refused)"
        if pids_cgroup_root():
            parts += "; a pids cgroup caps processes per run"
        return f"{self.name}: {parts}"


@dataclass
class SandboxResult:
    """Outcome of one run.

    status: "passed", "failed" (exited without finishing the check), "timeout",
        "output_limit" (stdout/stderr or a file exceeded limits.output_bytes) or "killed" (a signal).
    """

    status: str
    returncode: Optional[int]
    seconds: float
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _unshare_prefix(*flags: str) -> tuple[str, ...]:
    """unshare + a setup script: every mount read-only, fresh tmpfs on PRIVATE_DIRS, capabilities dropped.

    The interpreter may live under /root (pyenv), unreadable by `nobody`, so instead of switching
    user the program keeps uid 0 but with an empty capability bounding set and no_new_privs: it
    cannot remount, change owners or bypass permissions, and every mount it sees is read-only.
    sh stays PID 1 of the namespace (no exec): PID 1 ignores signals it sent itself, and the
    program must be able to kill itself like anywhere else. When sh ends, the kernel kills every
    process left in the namespace.
    """
    private = " ".join(d for d in PRIVATE_DIRS if os.path.isdir(d))
    script = ("for m in $(findmnt -rn -o TARGET); do mount -o remount,bind,ro \"$m\" 2>/dev/null; done; "
              f"for d in {private}; do mount -t tmpfs -o size=256m,mode=1777 tmpfs \"$d\" || exit 97; done; "
              "setpriv --bounding-set=-all --inh-caps=-all --no-new-privs \"$@\"")
    return ("unshare", *flags, "--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh")


_PROBE = """
import errno, sys
open('/tmp/otr-probe', 'w').close()
try:
    open('/otr-read-only-probe', 'w').close()
except OSError as err:
    sys.exit(0 if err.errno == errno.EROFS else 3)
sys.exit(3)
"""


def _probe(prefix: tuple[str, ...]) -> Optional[bool]:
    """None if the wrapper does not run here; else whether the filesystem really is read-only in it."""
    try:
        code = subprocess.run([*prefix, os.path.realpath(sys.executable), "-I", "-c", _PROBE], capture_output=True,
                              timeout=20).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: True, 3: False}.get(code)


@functools.lru_cache(maxsize=None)
def detect_isolation(requested: str = "auto") -> Isolation:
    """The strongest isolation this machine allows (or `requested`, failing if unavailable)."""
    if requested not in ISOLATIONS:
        raise IsolationError(f"sandbox isolation {requested!r} is not one of {', '.join(ISOLATIONS)}")
    is_root = os.geteuid() == 0
    candidates = []
    if shutil.which("unshare") and shutil.which("setpriv") and shutil.which("findmnt"):
        if is_root:
            candidates.append(Isolation("namespaces", _unshare_prefix(), True))
        candidates.append(Isolation("user_namespaces", _unshare_prefix("--user", "--map-root-user"), True))
    candidates.append(Isolation("rlimits", RLIMITS_PREFIX, False))
    for candidate in candidates:
        if requested not in ("auto", candidate.name):
            continue
        if candidate.name == "rlimits":
            return candidate
        read_only = _probe(candidate.prefix)
        if read_only is not None:
            # Locked mounts (user namespaces) may refuse the read-only remount: say so, keep the rest.
            return dataclasses.replace(candidate, read_only_fs=read_only)
    raise IsolationError(f"sandbox isolation {requested!r} is not available on this machine "
                       f"(needs unshare{' as root' if requested == 'namespaces' else ''}); use 'auto'")


# Without namespaces the program's parent would be the grader itself (os.kill(os.getppid(), 9)):
# a shell in between takes that hit instead. Not `exec`: the shell must stay the parent.
RLIMITS_PREFIX = ("sh", "-c", '"$@"; status=$?; exit $status', "sh")

PIDS_CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"),)


@functools.lru_cache(maxsize=None)
def pids_cgroup_root() -> Optional[Path]:
    """A writable cgroup-v1 pids hierarchy, which caps the processes of one run (fork bombs)."""
    for root in PIDS_CGROUP_ROOTS:
        probe = root / f"otr-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
            return root
        except OSError:
            continue
    return None


class _PidsCgroup:
    """A per-run pids cgroup; `wrap` makes the command join it before it starts anything."""

    def __init__(self, root: Path, max_processes: int):
        self.path = root / f"otr-sandbox-{secrets.token_hex(6)}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(max_processes))

    def wrap(self, command: list[str]) -> list[str]:
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *command]

    def remove(self) -> None:
        for _ in range(50):
            try:
                for pid in (self.path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)  # tasks still exiting
        log.warning("could not remove sandbox cgroup %s", self.path)


def scrubbed_env(home: str) -> dict[str, str]:
    """A minimal environment: no tokens, proxies or paths of the caller leak into the program."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _tail(path: Path, limit: int = 2000) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - limit))
        return handle.read().decode("utf-8", "replace")


def run_program(program: str, call: str, limits: SandboxLimits = SandboxLimits(),
                isolation: Optional[Isolation] = None) -> SandboxResult:
    """Execute `program`, then the statement `call` (e.g. "check(add)"), in a fresh sandbox.

    Never raises for anything the program does; returns how the run ended.
    """
    isolation = isolation or detect_isolation()
    nonce = secrets.token_hex(16)
    spec = {"program": program, "call": call, "nonce": nonce, "private_tmp": isolation.private_tmp,
            "limits": {"memory_bytes": limits.memory_mb * 2**20, "cpu_seconds": max(1, int(limits.cpu_s)),
                       "output_bytes": limits.output_bytes, "max_processes": limits.max_processes,
                       "open_files": limits.open_files}}
    workdir = Path(tempfile.mkdtemp(prefix="otr-sandbox-"))
    started = time.monotonic()
    try:
        with (workdir / ".stdout").open("wb") as out, (workdir / ".stderr").open("wb") as err:
            command = [*isolation.prefix, *sandbox_python_command()]
            cgroup_root = pids_cgroup_root()
            cgroup = _PidsCgroup(cgroup_root, limits.max_processes) if cgroup_root else None
            if cgroup:
                command = cgroup.wrap(command)
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir,
                                       env=scrubbed_env(str(workdir)), start_new_session=True)
            timed_out = False
            try:
                process.communicate(json.dumps(spec).encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(process)
                if cgroup:
                    cgroup.remove()
        seconds = time.monotonic() - started
        stdout_tail = _tail(workdir / ".stdout", 200)
        stderr_tail = _tail(workdir / ".stderr")
        output_size = (workdir / ".stdout").stat().st_size + (workdir / ".stderr").stat().st_size
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    code = process.returncode
    if timed_out:
        status = "timeout"
    elif code == 0 and stdout_tail.rstrip().endswith(nonce):
        status = "passed"
    elif _signal_of(code) == signal.SIGXFSZ or output_size >= limits.output_bytes:
        status = "output_limit"
    elif _signal_of(code) is not None:
        status = "killed"
    else:
        status = "failed"
    return SandboxResult(status, code, seconds, stderr_tail)


def _signal_of(code: Optional[int]) -> Optional[int]:
    """The signal that ended the run: negative codes from Popen, 128+N from sh in namespaces."""
    if code is None:
        return None
    if code < 0:
        return -code
    if 128 < code < 160:
        return code - 128
    return None


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the run's whole session (its children included) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
