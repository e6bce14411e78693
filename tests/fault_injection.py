"""`otr` with a fault injected into one rank, for the fault tests (run under torchrun).

OTR_FAULT_RANK, OTR_FAULT_STEP: where (the rank, the optimizer step about to run);
OTR_FAULT: "raise" (an exception), "hang" (the rank stops answering collectives) or "wait" (the rank waits
until the file OTR_FAULT_GO exists, then trains on). OTR_FAULT_READY (optional): a file created when the rank
reaches the fault, so a test knows the steps before it are done (and saved).
"""

from __future__ import annotations

import os
import sys
import time

from otr_cli.cli import main
from otr_cli.train.loop import Trainer

original_step = Trainer.train_step


def faulty_step(self):
    if self.dist.rank == int(os.environ["OTR_FAULT_RANK"]) and self.step + 1 == int(os.environ["OTR_FAULT_STEP"]):
        if os.environ.get("OTR_FAULT_READY"):
            open(os.environ["OTR_FAULT_READY"], "w").close()
        if os.environ["OTR_FAULT"] == "wait":
            while not os.path.exists(os.environ["OTR_FAULT_GO"]):
                time.sleep(0.05)
            return original_step(self)
        if os.environ["OTR_FAULT"] == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected fault on rank {self.dist.rank} at step {self.step + 1}")
    return original_step(self)


Trainer.train_step = faulty_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
