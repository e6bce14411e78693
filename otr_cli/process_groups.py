"""The orderly end of a command that ran on several ranks."""

from __future__ import annotations

import logging

log = logging.getLogger("otr.process_groups")


def end_process_groups() -> None:
    """Every rank: wait for the others, then destroy every torch.distributed process group.

    Called once per rank after its last collective, by `otr train` (finished, or stopped on a preemption
    signal after rank 0's requeue) and `otr eval`. PyTorch asks for destroy_process_group before exit: left
    to the interpreter's shutdown, a Gloo worker thread can still hold work while the interpreter is torn
    down, and the rank aborts with "terminate called without an active exception" (SIGABRT, exit -6) after
    its checkpoint was saved (seen 3 times in about 60 two-rank preemption tests here;
    pytorch/pytorch#190489); NCCL's communicators are released rather than torn down at exit. The barrier
    first, so that no rank destroys its groups while another is still in a collective with it.

    Never raises: everything the command writes is written before this, so a rank that has gone (killed
    after a requeue) gives a warning here, not a failed run. No-op in one process or before set-up.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - the run's outcome is decided; only the exit is left
        log.warning("rank %d: the process groups did not end cleanly (%s); the run's files are complete",
                    dist.get_rank() if dist.is_initialized() else -1, str(err).splitlines()[0] if str(err) else
                    type(err).__name__)
