"""The one exception type of the data package."""

from __future__ import annotations

from otr_cli.errors import UserError


class DataError(UserError, ValueError):
    """Bad data or data settings.

    Every message says where (``file:line`` for JSON lines, the file and record index, or the
    source and split), what is wrong (the field, the message), and which ``data.*`` key to set.
    """
