"""`otr` as one rank of a multi-rank test (tests/ranks.py's default program): exits as `otr` does, but with
LEFT_UP_EXIT when the command ended without an error while its torch.distributed process groups were still
up, i.e. without otr_cli.process_groups.end_process_groups, where the interpreter's shutdown can abort the
rank after its work is saved (SIGABRT, "terminate called without an active exception")."""

from __future__ import annotations

import sys

import torch.distributed as dist

from otr_cli.cli import main

LEFT_UP_EXIT = 98


def run(argv: list[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sys.stderr.write(f"rank {dist.get_rank()}: process groups still up at exit (exit status was {code})\n")
        sys.exit(LEFT_UP_EXIT)
    sys.exit(code)


if __name__ == "__main__":
    run(sys.argv[1:])
