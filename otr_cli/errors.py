"""The one user-error type, and how every entry point reports it.

An error the user can fix (a wrong key, a missing file, a malformed data line) derives from
:class:`UserError`: entry points print its message as one red line and exit with code 2. Anything
else is a bug or an environment failure (CUDA out of memory, a grader crash) and must reach the
user as a real traceback with exit code 1, so entry points catch ``UserError`` and nothing wider.
"""

from __future__ import annotations

import sys
from typing import NoReturn

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong, where, and what to do."""


def fail(message: str) -> NoReturn:
    """Print `message` as one red line on stderr and exit with code 2."""
    from rich.console import Console
    from rich.markup import escape

    # escape: a message's own brackets ("pip install 'otr-cli[wandb]'", "report_to=[a,b]") are text, not markup.
    # soft_wrap: one line whatever the width; without it rich breaks the message at 80 columns when stderr is
    # not a terminal (a log file, a SLURM job's output), and a reader or a grep sees pieces of it.
    Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(USER_ERROR_EXIT)
