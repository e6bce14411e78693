"""`otr` whose chosen ranks get SIGUSR1 once their first evaluation batch is cached, for the preemption
tests (run as a rank by tests/ranks.py): a signal that arrives in the middle of an evaluation.

OTR_SIGNAL_RANKS: the ranks to signal, comma-separated. OTR_SIGNAL: the signal's name (default SIGUSR1).
"""

from __future__ import annotations

import os
import signal
import sys

from otr_cli.eval.generation_cache import GenerationCache
from rank_main import run

original_put_many = GenerationCache.put_many
signalled = [False]


def put_many_then_signal(self, items):
    original_put_many(self, items)
    if not signalled[0] and os.environ.get("RANK", "0") in os.environ["OTR_SIGNAL_RANKS"].split(","):
        signalled[0] = True
        os.kill(os.getpid(), signal.Signals[os.environ.get("OTR_SIGNAL", "SIGUSR1")])


GenerationCache.put_many = put_many_then_signal

if __name__ == "__main__":
    run(sys.argv[1:])
