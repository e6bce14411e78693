"""`otr` with one rank's view of checkpoints/ stale, as NFS can show it (run under torchrun or tests/ranks.py).

OTR_STALE_RANK: the rank whose listing of checkpoints/ never shows a checkpoint written during this run
(those present when the run started are still seen, as a client's cache would keep them).
OTR_STALE_EMPTY=1: that rank's listing shows no checkpoint at all, not even those present at the start.
"""

from __future__ import annotations

import os
import sys

from otr_cli.cli import main
from otr_cli.train.checkpoints import RunDirectory

original_listing = RunDirectory.complete_checkpoints
seen_at_start: dict[str, list] = {}


def stale_listing(self):
    if self.dist.rank != int(os.environ["OTR_STALE_RANK"]):
        return original_listing(self)
    if os.environ.get("OTR_STALE_EMPTY") == "1":
        return []
    key = str(self.checkpoints)
    if key not in seen_at_start:
        seen_at_start[key] = original_listing(self)
    return list(seen_at_start[key])


RunDirectory.complete_checkpoints = stale_listing

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
