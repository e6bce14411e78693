"""Experiment trackers (``trainer.report_to``): TensorBoard, Weights & Biases, MLflow.

Every record that goes to metrics.jsonl goes to each tracker too, at the same step, through the
tracker's own client: its numbers (loss, ce, lr, grad_norm, tokens_per_s, the OTR statistics,
val_ce, eval/<benchmark>) as scalars named by ``scalar_name``: where a Hugging Face Trainer (and so
TRL) logs the same quantity, under its name (``train/learning_rate``, ``eval/loss``), so that one
dashboard shows both kinds of run; metrics.jsonl keeps otr's names. Rank 0 only (``MetricsLog`` is
enabled there alone). Nothing needs a network:

- tensorboard: event files in ``<run>/tensorboard``.
- wandb: the mode the user chose (``wandb_mode``: WANDB_MODE, ``wandb offline``/``online``, or a
  login: WANDB_API_KEY or a key in ~/.netrc from ``wandb login``), else offline, files under
  ``<run>/wandb`` that ``wandb sync`` uploads later. Project: WANDB_PROJECT, else "otr"; a sweep's
  points share a group.
- mlflow: MLFLOW_TRACKING_URI, else a file store ``mlruns/`` next to the run directory (for a
  sweep, in the sweep's directory); experiment MLFLOW_EXPERIMENT_NAME, else "otr", or one per sweep.

The resolved config goes to each as run parameters (wandb config, MLflow params, a TensorBoard
text). A resumed run continues the same tracker run (ids in ``<run>/trackers.json``);
TensorBoard discards what was logged after the checkpoint it resumed from.
"""

from __future__ import annotations

import atexit
import configparser
import json
import logging
import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from otr_cli.atomic import write_json_atomic

log = logging.getLogger("otr.train")

IDS_FILE = "trackers.json"
DEFAULT_PROJECT = "otr"


# metrics.jsonl key -> the name a Hugging Face Trainer / TRL run logs the same quantity under.
TRANSFORMERS_NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
                      "epoch": "train/epoch", "val_ce": "eval/loss"}


def scalar_name(key: str) -> str:
    """The tracker name of a metrics.jsonl key: transformers' name where it has one (TRANSFORMERS_NAMES), else
    ``train/<key>``; other val_* and eval/<benchmark> keep their names."""
    if key in TRANSFORMERS_NAMES:
        return TRANSFORMERS_NAMES[key]
    return key if key.startswith("val") or "/" in key else f"train/{key}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, by tracker name (not the step, texts or flags)."""
    return {scalar_name(key): float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.name_or_path": "...", "loss.beta": "-0.1", ...} (MLflow params are flat text)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, path + "."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


class RunIdentity:
    """Who a run is to the trackers: its name, its sweep (None for a single run), its config."""

    def __init__(self, name: str, group: Optional[str], config: dict[str, Any]):
        self.name = name
        self.group = group
        self.config = config


def run_identity(cfg, run_root: Path) -> RunIdentity:
    """run.name for a single run; for a sweep point ``<run.name>-<job number>`` in group ``<run.name>/<sweep>``."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            sweep_dir = Path(HydraConfig.get().sweep.dir)
            return RunIdentity(f"{cfg.run.name}-{HydraConfig.get().job.num}", f"{cfg.run.name}/{sweep_dir.name}",
                               config)
    except ValueError:  # HydraConfig not set: a run started from Python
        pass
    return RunIdentity(cfg.run.name, None, config)


class TensorBoardTracker:
    def __init__(self, run_root: Path, identity: RunIdentity, start_step: int, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a preempted run wrote after its checkpoint are dropped, as in metrics.jsonl.
        self.writer = SummaryWriter(str(run_root / "tensorboard"), purge_step=start_step + 1)
        if start_step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(identity.config, indent=2) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True)
class WandbMode:
    """mode: what wandb.init gets ("online", "offline", "disabled", ...); reason: why, naming the source."""

    mode: str
    reason: str


def _wandb_settings(path: Path) -> dict[str, str]:
    """The [default] section of a wandb settings file (``wandb offline`` writes ``mode`` there); {} if none."""
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def _netrc_has_key(path: Path, host: str) -> bool:
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(environ: Mapping[str, str], home: Path, cwd: Path) -> WandbMode:
    """The mode a run's wandb uses, from the user's own wandb set-up (pure: reads only these files).

    In order: WANDB_MODE; a ``mode`` in wandb's settings files (``./wandb/settings``, then
    WANDB_CONFIG_DIR/settings or ~/.config/wandb/settings: ``wandb offline`` / ``wandb online``);
    a login (WANDB_API_KEY, or a key for the W&B host in the netrc file: NETRC, else ~/.netrc, which
    ``wandb login`` writes) means online; without any of these, offline (files for ``wandb sync``).
    """
    if environ.get("WANDB_MODE"):
        return WandbMode(environ["WANDB_MODE"], f"WANDB_MODE={environ['WANDB_MODE']}")
    config_dir = Path(environ["WANDB_CONFIG_DIR"]).expanduser() if environ.get("WANDB_CONFIG_DIR") \
        else home / ".config" / "wandb"
    settings: dict[str, str] = {}
    for path in (cwd / "wandb" / "settings", config_dir / "settings"):  # the local file overrides the global one
        found = _wandb_settings(path)
        if "mode" in found:
            return WandbMode(found["mode"], f"mode = {found['mode']} in {path} (wandb offline / online)")
        for key, value in found.items():
            settings.setdefault(key, value)
    if environ.get("WANDB_API_KEY"):
        return WandbMode("online", "WANDB_API_KEY is set")
    base_url = environ.get("WANDB_BASE_URL") or settings.get("base_url") or "https://api.wandb.ai"
    host = urlparse(base_url).hostname or base_url
    netrc_path = Path(environ["NETRC"]).expanduser() if environ.get("NETRC") else home / ".netrc"
    if _netrc_has_key(netrc_path, host):
        return WandbMode("online", f"{netrc_path} holds a key for {host} (wandb login)")
    return WandbMode("offline", "no WANDB_MODE, WANDB_API_KEY or wandb login; `wandb sync` uploads the run later")


class WandbTracker:
    def __init__(self, run_root: Path, identity: RunIdentity, start_step: int, ids: dict):
        import wandb

        run_id = ids.get("wandb") if start_step > 0 else None
        chosen = wandb_mode(os.environ, Path.home(), Path.cwd())
        log.info("wandb: %s mode (%s)", chosen.mode, chosen.reason)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=identity.name, group=identity.group,
            config=identity.config, dir=str(run_root), mode=chosen.mode,
            id=run_id, resume="allow" if run_id else None, reinit="create_new",
        )
        ids["wandb"] = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_root: Path, identity: RunIdentity, start_step: int, ids: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_root.resolve().parent / "mlruns").as_uri()
            # MLflow >= 3.7 asks for this to use a file store. We keep it: sweep points on many nodes write
            # one store on a shared file system, where SQLite's locking is unreliable.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        run_id = ids.get("mlflow") if start_step > 0 else None
        # Steps each metric already has: a preempted run logged some after its checkpoint, and MLflow cannot
        # delete them, so the resumed run skips those (resume is exact: the values would be the same).
        self.logged_through: dict[str, int] = {}
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # the store was moved or cleaned: start a new run rather than fail the training
                log.warning("mlflow: run %s of %s is not in %s; starting a new run", run_id, IDS_FILE, uri)
                run_id = None
        if run_id is not None:
            for name in run.data.metrics:
                self.logged_through[name] = max(m.step for m in self.client.get_metric_history(run_id, name))
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = identity.group or os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
            tags = {"mlflow.runName": identity.name, "otr.run_dir": str(run_root.resolve())}
            run = self.client.create_run(self._experiment_id(experiment), run_name=identity.name, tags=tags)
            run_id = run.info.run_id
            self._log_params(run_id, flat_params(identity.config))
        self.run_id = ids["mlflow"] = run_id
        log.info("mlflow: run %s in %s", run_id, uri)

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another sweep point created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # log_batch takes at most 100 params a call; MLflow caps a value's length (a 6000-character limit).
        items = [Param(key, value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in values.items()
                   if step > self.logged_through.get(name, 0)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


TRACKER_TYPES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers of trainer.report_to, opened at the first record (after a resume has set the step)."""

    def __init__(self, names: list[str], run_root: Path, identity: RunIdentity):
        self.names = names
        self.run_root = run_root
        self.identity = identity
        self.start_step = 0
        self._open: Optional[list] = None

    def start_at(self, step: int) -> None:
        """The run resumed at `step`: continue the tracker runs of trackers.json, drop what came later."""
        self.start_step = step

    def _opened(self) -> list:
        if self._open is None:
            ids_path = self.run_root / IDS_FILE
            ids = json.loads(ids_path.read_text()) if self.start_step > 0 and ids_path.is_file() else {}
            self._open = [TRACKER_TYPES[name](self.run_root, self.identity, self.start_step, ids)
                          for name in self.names]
            # A run that dies with an error never reaches close(): say so in the trackers that keep a status.
            atexit.register(self._close_failed)
            if ids:
                write_json_atomic(ids_path, ids)
        return self._open

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values and self.names:
            for tracker in self._opened():
                tracker.log(values, int(record["step"]))

    def close(self) -> None:
        for tracker in self._open or []:
            tracker.close()
        self._open = []
        atexit.unregister(self._close_failed)

    def _close_failed(self) -> None:
        for tracker in self._open or []:
            if isinstance(tracker, MlflowTracker):
                tracker.close(status="FAILED")
        self._open = []


def open_trackers(cfg, run_root: Path) -> Trackers:
    """The trackers trainer.report_to asks for (their packages were checked by config.validate)."""
    from otr_cli.config import resolve_report_to

    names = resolve_report_to(cfg.trainer.report_to)
    return Trackers(names, run_root, run_identity(cfg, run_root) if names else RunIdentity(cfg.run.name, None, {}))
