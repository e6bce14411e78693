"""`otr` whose rank OTR_FAULT_RANK is refused every write of checkpoint step OTR_FAULT_STEP's DeepSpeed files
(ENOSPC from torch.save, as a full disk or quota refuses it), for the disk-full tests (run as one rank of several)."""

from __future__ import annotations

import errno
import os
import sys

import torch

from otr_cli.cli import main

original_save = torch.save


def refusing_save(obj, f, *args, **kwargs):
    if (os.environ["RANK"] == os.environ["OTR_FAULT_RANK"]
            and f".tmp-checkpoint-{os.environ['OTR_FAULT_STEP']}" in str(f)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return original_save(obj, f, *args, **kwargs)


torch.save = refusing_save

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
