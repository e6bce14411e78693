"""Runs inside the sandbox process (never imported by otr itself): limits, then the program.

Protocol: one JSON object on stdin with keys
    program (str): the source to execute (prompt + completion + tests, say),
    call (str): a statement run after the program, e.g. "check(add)",
    nonce (str): written to stdout only after `call` returned,
    limits (dict): memory_bytes, cpu_seconds, output_bytes, max_processes, open_files,
    private_tmp (bool): /tmp is a fresh tmpfs, so work in a directory made there.
The nonce is read from stdin and kept in this function's locals, never in the program's source,
so a program that exits early (os._exit(0), sys.exit(0), a signal) cannot fake a pass.
"""

import json
import os
import resource
import sys
import tempfile
import traceback


def _limit(kind: int, value: int) -> None:
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError) as err:  # a hard limit already lower than ours: keep it
        print(f"sandbox: cannot set limit {kind}: {err}", file=sys.stderr)


def _tasks_of(uid: int) -> int:
    """Threads owned by `uid` right now (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue  # the process ended while we looked
    return count


def _refuse_network() -> None:
    """A second line behind the network namespace: Python-level sockets refuse to connect."""
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the otr sandbox")

    for name in ("connect", "connect_ex", "bind", "sendto"):
        setattr(socket.socket, name, refuse)
    socket.create_connection = refuse
    socket.getaddrinfo = refuse


def main() -> None:
    spec = json.loads(sys.stdin.read())
    sys.stdin.close()
    nonce, limits = spec["nonce"], spec["limits"]
    _limit(resource.RLIMIT_AS, limits["memory_bytes"])
    _limit(resource.RLIMIT_CPU, limits["cpu_seconds"])
    _limit(resource.RLIMIT_FSIZE, limits["output_bytes"])
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, limits["open_files"])
    if spec.get("private_tmp"):
        os.chdir(tempfile.mkdtemp(prefix="otr-", dir="/tmp"))
    # RLIMIT_NPROC counts every task of the real user, so allow what the user already runs plus ours.
    _limit(resource.RLIMIT_NPROC, _tasks_of(os.getuid()) + limits["max_processes"])
    os.environ["HOME"] = os.getcwd()
    _refuse_network()
    result_fd = os.dup(1)
    namespace = {"__name__": "__sandbox__"}
    try:
        exec(compile(spec["program"], "program.py", "exec"), namespace)
        exec(compile(spec["call"], "<check>", "exec"), namespace)
    except BaseException:  # noqa: BLE001 - SystemExit included: leaving early is a failure
        traceback.print_exc(limit=5)
        sys.stderr.flush()
        os._exit(1)
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the program may have closed or replaced sys.stdout
        pass
    os.write(result_fd, f"\n{nonce}\n".encode())
    # Skip atexit handlers and non-daemon threads the program may have left behind.
    os._exit(0)


if __name__ == "__main__":
    main()
