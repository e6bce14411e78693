"""trainer_state.json of a checkpoint: the fields of Hugging Face's TrainerState, and otr's own beside them.

Hugging Face's tools read `global_step`, `log_history`, `best_metric`, `best_model_checkpoint`, ... from a
checkpoint's trainer_state.json; otr reads its own keys (`step`, `data_order`, `data_fingerprint`, `topology`,
`save_time_s`, `checkpoint_bytes`, `best`) when it resumes. Both sets live in one file so that neither
ecosystem needs a file of its own.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

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
                  best: Optional[dict[str, Any]], otr_fields: dict[str, Any]) -> dict[str, Any]:
    """The contents of trainer_state.json. `best`: best_checkpoint.BestTracker.record() (None: no
    trainer.metric_for_best); `otr_fields`: otr's own keys, written beside Hugging Face's."""
    history = log_history(records, step)
    return {
        # Hugging Face's TrainerState.
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
        # otr's.
        "step": step,
        **({"best": best} if best else {}),
        **otr_fields,
    }
