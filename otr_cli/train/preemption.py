"""Preemption: on SIGUSR1, SIGUSR2 or SIGTERM, save at the next step boundary, leave, requeue; Ctrl-C too.

SLURM warns a job before its time limit (``sbatch --signal=USR1@120``) and on preemption
(SIGTERM, then SIGKILL after a grace time). Stopping in the middle of a step or of a
checkpoint write would lose work or leave a half-written directory, so the signal handler
only records the request; the training loop asks ``stop_requested()`` after every optimizer
step and before each evaluation, all ranks agree on the answer (an all-reduce), save a checkpoint
together and raise ``Preempted``. During an evaluation each rank looks at its own flag between
batches (``stop_received``) and the ranks agree once at its end (eval/runner.py StopCheck). ``otr train`` then requeues the SLURM job (``scontrol requeue``) and exits; the
requeued job runs the same command, which resumes from that checkpoint (trainer.resume=auto).

Later signals only log: a second SIGTERM while the checkpoint is being written must not
interrupt it. The handlers replace submitit's own (which would checkpoint and requeue at once,
wherever the program happens to be) for as long as ``watching()`` is active.

Ctrl-C (SIGINT) is a person asking the run to stop: the first one is a stop request like SIGTERM
(save at the step boundary, leave) but the run is never requeued, on any rank, whatever the other
ranks received (the ranks agree on that in the same all-reduce as on the stop). The second Ctrl-C
raises KeyboardInterrupt wherever the program is: `otr train` exits with INTERRUPTED_EXIT (130, the
shell's status for Ctrl-C). A checkpoint being written then is never published: its hidden
``.tmp-checkpoint-N`` folder is removed (checkpoints.py; a process killed there leaves it for the next
start to remove).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("otr.preemption")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# `otr train` exits with this status when it stopped early and was not requeued: the run is not
# finished; running the same command again resumes it.
PREEMPTED_EXIT = 3
# A second Ctrl-C: stopped at once, like a shell reports a process that SIGINT ended (128 + 2).
INTERRUPTED_EXIT = 130


@dataclass
class _State:
    received: Optional[int] = None  # the first stop signal
    count: int = 0
    ctrl_c: int = 0  # SIGINTs received
    step: Optional[int] = None  # the optimizer step in progress (note_step), for the Ctrl-C message
    agreed_ctrl_c: bool = False  # stop_requested: some rank's stop came from a Ctrl-C, so none requeues


_state = _State()


class Preempted(BaseException):
    """Raised by the training loop after it saved a checkpoint because a stop was requested.

    A BaseException, like KeyboardInterrupt: a request to stop, not an error, so handlers of
    errors (Hydra's job runner, otr_cli.train.faults) let it through.
    """

    def __init__(self, step: int, checkpoint: Optional[Path]):
        self.step = step
        self.checkpoint = checkpoint
        signame = signal.Signals(_state.received).name if _state.received else "a stop request"
        super().__init__(f"stopped at step {step} on {signame}; checkpoint {checkpoint}")


def _rank_prefix() -> str:
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '0')}] " if world != "1" else ""


def note_step(step: int) -> None:
    """The loop says which optimizer step (1-based) it is running: a stop request saves at its end."""
    _state.step = step


def _on_ctrl_c() -> None:
    _state.ctrl_c += 1
    if _state.ctrl_c > 1:
        os.write(2, (_rank_prefix() + "Ctrl-C again: stopping at once\n").encode())
        raise KeyboardInterrupt
    if _state.received is None:
        _state.received = signal.SIGINT
    boundary = f"the end of step {_state.step}" if _state.step is not None else "the next step boundary"
    os.write(2, (_rank_prefix() + f"Ctrl-C: saving at {boundary} and stopping; press Ctrl-C again to stop "
                 "at once\n").encode())


def _on_signal(signum: int, frame) -> None:
    # Only async-signal-safe work here: the signal may arrive inside a logging call or a write.
    _state.count += 1
    if signum == signal.SIGINT:
        _on_ctrl_c()
        return
    name = signal.Signals(signum).name
    if _state.received is None:
        _state.received = signum
        message = f"{name} received: saving a checkpoint at the end of this step, then stopping\n"
    else:
        message = f"{name} received again: already stopping; ignored, so that no checkpoint write is interrupted\n"
    os.write(2, (_rank_prefix() + message).encode())


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Turn stop signals into a request checked at step boundaries; restore the old handlers after."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _state.received, _state.count, _state.ctrl_c, _state.step, _state.agreed_ctrl_c = None, 0, 0, None, False
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_received() -> bool:
    """Whether this rank got a stop signal; no collective, so a rank may ask it at points of its own
    (between its evaluation batches). Ranks act on it together only after `stop_requested`."""
    return _state.received is not None


def stopped_on_ctrl_c() -> bool:
    """Whether the ranks agreed to stop and one of them had a Ctrl-C (the last `stop_requested`)."""
    return _state.agreed_ctrl_c


def stop_requested(device) -> bool:
    """True on every rank when any rank got a stop signal. Call it at the same point on all ranks."""
    import torch
    import torch.distributed as dist

    local = 0.0 if _state.received is None else 2.0 if _state.ctrl_c else 1.0
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        agreed = local
    else:
        # Ranks get the signal at slightly different times; the maximum makes them stop at the same step,
        # and 2 (a Ctrl-C somewhere) wins over 1, so that every rank knows the run is not to be requeued.
        flag = torch.tensor([local], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = flag.item()
    _state.agreed_ctrl_c = agreed == 2.0
    return agreed > 0


def slurm_job_id() -> Optional[str]:
    """The id `scontrol requeue` takes: ARRAYID_INDEX for an array element, else the job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue(max_requeues: int) -> Optional[str]:
    """Requeue this SLURM job; returns why it was not requeued, or None when it was."""
    job = slurm_job_id()
    if job is None:
        return "not running under SLURM"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if max_requeues == 0:
        return "launcher.max_requeues=0"
    if restarts >= max_requeues:
        return f"it was requeued {restarts} times already (launcher.max_requeues={max_requeues})"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`scontrol requeue {job}` failed: {err}"
    if result.returncode != 0:
        return f"`scontrol requeue {job}` failed: {result.stderr.strip() or result.returncode}"
    return None


def after_preemption(stop: Preempted, rank: int, max_requeues: int) -> int:
    """Requeue (rank 0 only, once every rank has saved) and return the exit status of `otr train`.

    After a Ctrl-C on any rank nothing is requeued and every rank returns PREEMPTED_EXIT: the person
    who pressed it resumes with the same command when they choose to.
    """
    if _state.agreed_ctrl_c:
        if rank == 0:
            log.warning("Stopped at step %d on Ctrl-C: checkpoint %s saved; not requeued. Run the same command "
                        "again to resume (trainer.resume=auto).", stop.step, stop.checkpoint)
        return PREEMPTED_EXIT
    if rank != 0:
        return 0 if slurm_job_id() else PREEMPTED_EXIT
    not_requeued = requeue(max_requeues)
    if not_requeued is None:
        log.warning("Preempted at step %d: checkpoint %s saved, job %s requeued; it will resume from there.",
                    stop.step, stop.checkpoint, slurm_job_id())
        return 0
    log.warning("Stopped at step %d: checkpoint %s saved; not requeued (%s). Run the same command again to "
                "resume (trainer.resume=auto).", stop.step, stop.checkpoint, not_requeued)
    return PREEMPTED_EXIT
