"""One command-line style for otr's plain commands (`otr grade`, `otr eval compare`, `otr sweep summary`).

`otr train`, `otr eval` and `otr data` take Hydra overrides (`key=value`): they compose a config.
The plain commands take files and a few options, and use argparse flags (`--grader math`), with
`--help`. argparse reports a bad argument as usage plus a message over two lines; here it is one
line and exit 2, like every other user error (errors.fail).

The plain commands once took `key=value` too. That spelling still works for one release: it is
rewritten to the flags, with a deprecation note on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from otr_cli.errors import UserError


class CommandLineError(UserError, ValueError):
    """An argument a plain command cannot take; the message names it and points at --help."""


class CommandParser(argparse.ArgumentParser):
    """argparse with otr's error style: a bad argument raises CommandLineError (one line, exit 2 at the entry)."""

    def __init__(self, **kwargs):
        # allow_abbrev=False: `--out` must not silently mean `--output` in one release and something else later.
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise CommandLineError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def rewrite_deprecated_key_values(args: list[str], flags: dict[str, Optional[str]], prog: str) -> list[str]:
    """The old `key=value` arguments of `prog` as flags: flags[key] is the flag ("--grader") or None for a
    positional argument. Other arguments pass unchanged. One note on stderr names the new spelling."""
    rewritten, old, new = [], [], []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and key in flags:
            spelling = [value] if flags[key] is None else [flags[key], value]
            rewritten += spelling
            old.append(arg)
            new.append(" ".join(spelling))
        else:
            rewritten.append(arg)
    if old:
        print(f"note: `{prog} {' '.join(old)}` is the old key=value spelling, deprecated and removed in the next "
              f"release; write `{prog} {' '.join(new)}` (see `{prog} --help`)", file=sys.stderr)
    return rewritten
