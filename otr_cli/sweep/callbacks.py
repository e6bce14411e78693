"""Hydra callback of `launcher=slurm`, in the submitting process: checks before sbatch, then news.

Inside the job the full config is validated again (otr_cli.config.validate); the checks here
catch the launcher mistakes that would otherwise only show after the array waited in the queue.
It also fills in the memory and CPUs a GPU point needs and prints what each point requests
(otr_cli/sweep/slurm_request.py). Hydra's own launcher logging is off in otr, so this also says
where the sweep goes and, once submitit has submitted it, the SLURM job id: the command then
waits for the whole array.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from otr_cli.config import ConfigError, validate_launcher
from otr_cli.errors import fail
from otr_cli.sweep.slurm_request import SlurmRequest, print_request, resolve_request

# How long to look for submitit's folder of the submitted job before giving up (sbatch is quick).
ANNOUNCE_TIMEOUT_S = 600


def _announce_job_id(submitit_dir: Path) -> None:
    deadline = time.time() + ANNOUNCE_TIMEOUT_S
    while time.time() < deadline:
        if submitit_dir.is_dir():
            # submitit names a folder after the job (arrays: <id>, then <id>_<index> per element).
            ids = sorted((c.name for c in submitit_dir.iterdir() if re.fullmatch(r"\d+", c.name)), key=int)
            if ids:
                print(f"submitted SLURM job {ids[-1]}; its logs: {submitit_dir}/{ids[-1]}*/ (a folder per array "
                      f"element). Waiting for the jobs: Ctrl-C stops waiting, not the jobs.", flush=True)
                return
        time.sleep(0.5)


def apply_request_defaults(config: DictConfig) -> SlurmRequest:
    """Fill otr's GPU defaults (memory, CPUs) into hydra.launcher, which submitit reads next; print the request."""
    request = resolve_request(config.hydra.launcher)
    with read_write(config.hydra), open_dict(config.hydra.launcher):
        config.hydra.launcher.cpus_per_task = request.cpus_per_task
        config.hydra.launcher.mem_gb = request.mem_gb
    print_request(request)
    return request


class CheckLauncher(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:

        try:
            validate_launcher(OmegaConf.to_object(config.launcher))
        except ConfigError as err:
            fail(str(err))
        if shutil.which("sbatch") is None:
            fail("launcher=slurm submits with SLURM's `sbatch`, which is not on PATH here. Run the command on a "
                 "login node of your cluster, or use launcher=local to run the sweep on this machine.")
        apply_request_defaults(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"sweep directory: {sweep_dir} (one run directory per point: 0, 1, ...)", flush=True)
        threading.Thread(target=_announce_job_id, args=(sweep_dir / ".submitit",), daemon=True).start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(f"sweep finished; summary: otr sweep summary {config.hydra.sweep.dir}", flush=True)
