"""Hydra callback of `launcher=slurm`: checks run in the submitting process, before sbatch.

Inside the job the full config is validated again (otr_cli.config.validate); this catches the
launcher mistakes that would otherwise only show after the array waited in the queue.
"""

from __future__ import annotations

import shutil
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class CheckLauncher(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from otr_cli.cli import fail
        from otr_cli.config import ConfigError, validate_launcher

        try:
            validate_launcher(OmegaConf.to_object(config.launcher))
        except ConfigError as err:
            fail(str(err))
        if shutil.which("sbatch") is None:
            fail("launcher=slurm submits with SLURM's `sbatch`, which is not on PATH here. Run the command on a "
                 "login node of your cluster, or use launcher=local to run the sweep on this machine.")
