"""Entry points of `otr grade`, `otr eval` and `otr eval compare` (wired in otr_cli/cli.py)."""

from __future__ import annotations

from typing import Optional


def grade_entry(args: list[str]) -> int:
    """`otr grade key=value ...`: user errors become one clear message and exit code 2."""
    from otr_cli.cli import fail
    from otr_cli.eval.predictions import GradeInputError, grade_command

    try:
        return grade_command(args)
    except (GradeInputError, ValueError, RuntimeError) as err:
        fail(str(err))
    return 2
