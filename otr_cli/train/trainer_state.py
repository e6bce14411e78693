"""A checkpoint's state files: trainer_state.json (Hugging Face's TrainerState) and otr_state.json (otr's).

Hugging Face's tools read `global_step`, `log_history`, `best_metric`, `best_model_checkpoint`, ... from a
checkpoint's trainer_state.json, and ``TrainerState.load_from_json`` refuses a key it does not know, so that
file holds Hugging Face's fields alone. otr's own keys (`step`, `data_order`, `data_fingerprint`, `topology`,
`save_time_s`, `checkpoint_bytes`, `best`, ...) sit beside it in otr_state.json;
``checkpoints.read_trainer_state`` merges the two (older checkpoints kept otr's keys inside
trainer_state.json, and still resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

TRAINER_STATE = "trainer_state.json"
OTR_STATE = "otr_state.json"

# metrics.jsonl's names for what Hugging Face's log_history names otherwise.
HF_NAMES = {"lr": "learning_rate", "val_ce": "eval_loss"}


def hf_log_entry(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """One metrics.jsonl record as a log_history entry (Hugging Face's key names: learning_rate, eval_loss,
    eval_<benchmark>); None for a record without numbers (a warning)."""
    entry: dict[str, Any] = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = HF_NAMES.get(key) or (f"eval_{key[len('eval/'):]}" if key.startswith("eval/") else key)
        entry[name] = value
    if not entry or "step" not in record:
        return None
    return {**entry, "step": record["step"]}


def log_history(records: Iterable[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The log_history of a checkpoint of `step`: every record up to it, as Hugging Face logs them."""
    return [entry for record in records if int(record.get("step", step + 1)) <= step
            if (entry := hf_log_entry(record)) is not None]


def best_fields(best: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Hugging Face's best_* fields of trainer_state.json from best_checkpoint.BestTracker.record() (None: none)."""
    return {"best_metric": best["metric_value"] if best else None,
            "best_global_step": best["step"] if best else None,
            "best_model_checkpoint": best["checkpoint"] if best else None}


def trainer_state(*, step: int, epoch: float, max_steps: int, num_train_epochs: float, micro_batch_size: int,
                  logging_steps: int, save_steps: int, eval_steps: int, records: Iterable[dict[str, Any]],
                  best: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The contents of trainer_state.json: Hugging Face's TrainerState fields, and no other.
    `best`: best_checkpoint.BestTracker.record() (None: no trainer.metric_for_best)."""
    history = log_history(records, step)
    return {
        "global_step": step,
        "epoch": epoch,
        "max_steps": max_steps,
        "num_train_epochs": num_train_epochs,
        "logging_steps": logging_steps,
        "eval_steps": eval_steps,
        "save_steps": save_steps,
        "train_batch_size": micro_batch_size,
        "num_input_tokens_seen": sum(int(entry.get("tokens", 0)) for entry in history),
        "total_flos": 0,
        "log_history": history,
        **best_fields(best),
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "is_hyper_param_search": False,
        "trial_name": None,
        "trial_params": None,
        "stateful_callbacks": {},
    }


def otr_state(*, step: int, best: Optional[dict[str, Any]], otr_fields: dict[str, Any]) -> dict[str, Any]:
    """The contents of otr_state.json: the step, the best record (when trainer.metric_for_best is set) and
    `otr_fields` (what a resume checks: data order, topology, data fingerprint, ...)."""
    return {"step": step, **({"best": best} if best else {}), **otr_fields}


def otr_state_file(checkpoint: Path) -> Path:
    """Where `checkpoint` keeps otr's fields: otr_state.json, or trainer_state.json in a checkpoint saved
    before otr_state.json existed (the rewrites after a save then go where the fields already are)."""
    own = checkpoint / OTR_STATE
    return own if own.is_file() or not (checkpoint / TRAINER_STATE).is_file() else checkpoint / TRAINER_STATE
