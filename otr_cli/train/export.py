"""Hugging Face exports of the model being trained, written into a checkpoint folder.

    <dir>/model.safetensors, config.json, tokenizer files     what AutoModelForCausalLM.from_pretrained loads
                                                               (LoRA runs: the base model with the adapter merged);
                                                               the tokenizer carries the run's chat template and
                                                               generation_config.json its end-of-turn token
                                                               (train/chat_export.py)
    <dir>/adapter/adapter_config.json, adapter_model.safetensors
                                                               LoRA runs only: what peft.PeftModel.from_pretrained loads

The adapter has a folder of its own: transformers treats a folder holding adapter_config.json as an
adapter and would load the base model named inside it instead of the merged model next to it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch

from otr_cli.atomic import write_text_atomic
from otr_cli.train.chat_export import ChatExport, add_stop_token, save_tokenizer_with_template

ADAPTER_DIR = "adapter"


def export_hf_model(engine, target_dir, tokenizer, is_main: bool, chat: Optional[ChatExport] = None) -> None:
    """Write a Hugging Face model (safetensors) + tokenizer that ``from_pretrained`` loads; a collective.

    Under ZeRO-3 the parameters are partitioned: every rank joins the gather and rank 0 writes
    the consolidated state dict. LoRA runs write the merged model and the adapter, both made on
    rank 0's CPU from one full state dict, so the model being trained is neither copied on its
    device nor touched. chat: the run's chat template and end-of-turn token, saved with the model.
    """
    target_dir = Path(target_dir)
    lm = engine.lm
    state_dict: Optional[dict[str, torch.Tensor]] = None
    if engine.zero_stage == 3:
        # Collective: all ranks must call it. Rank 0 gets every parameter, whole, on the CPU.
        full = engine.deepspeed._zero3_consolidated_16bit_state_dict()
        if is_main:
            state_dict = {key.removeprefix("lm."): value for key, value in full.items()}
    if not is_main:
        return
    if is_lora_model(lm):
        if state_dict is None:
            # A host copy: the merge adds to the base weights in place, and they must stay the engine's.
            state_dict = {key: value.detach().to("cpu", copy=True) for key, value in lm.state_dict().items()}
        export_lora(lm, state_dict, target_dir)
    else:
        lm.save_pretrained(target_dir, state_dict=state_dict, safe_serialization=True)
    save_chat_files(target_dir, tokenizer, lm.config, chat)


def save_chat_files(target_dir: Path, tokenizer, model_config, chat: Optional[ChatExport]) -> None:
    """The tokenizer with the run's chat template, the template's stop token in generation_config.json, and
    the KV cache switched back on in config.json."""
    save_tokenizer_with_template(tokenizer, target_dir, chat)
    add_stop_token(target_dir, model_config, tokenizer, chat)
    enable_generation_cache(target_dir)


def enable_generation_cache(target_dir: Path) -> None:
    """config.json's use_cache back to true: training switches the KV cache off (it only costs memory there),
    and an export that kept false would make every `generate` of its users recompute the whole prefix."""
    config_file = Path(target_dir) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    if config.get("use_cache") is False:
        config["use_cache"] = True
        write_text_atomic(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_lora_model(lm: torch.nn.Module) -> bool:
    return hasattr(lm, "merge_and_unload") and hasattr(lm, "peft_config")


def export_lora(lm, state_dict: dict[str, Any], target_dir: Path) -> None:
    """The adapter (``target_dir/adapter``) and the merged model (``target_dir``) from a full state dict.

    lm: the live ``PeftModel`` (only its class, config and peft config are read: under ZeRO-3 its
    parameters are empty partitions). state_dict: every tensor of ``lm.state_dict()``, whole, on the
    CPU, with peft's key names; its base weights are modified (the merge adds B @ A * scale to them).
    peft rebuilds the model around these tensors on the meta device and merges with its own
    arithmetic, so no second copy of the weights is made.
    """
    skeleton = lora_skeleton(lm, state_dict)
    save_adapter(skeleton, target_dir / ADAPTER_DIR)
    merged = skeleton.merge_and_unload()
    merged.save_pretrained(target_dir, safe_serialization=True)


def lora_skeleton(lm, state_dict: dict[str, Any]):
    """A ``PeftModel`` of `lm`'s class, config and peft config whose tensors are `state_dict`'s (no copy)."""
    from peft import get_peft_model

    base = lm.get_base_model()
    adapter_name = lm.active_adapter
    with torch.device("meta"):
        skeleton = get_peft_model(type(base)(copy.deepcopy(base.config)), copy.deepcopy(lm.peft_config[adapter_name]),
                                  adapter_name=adapter_name)
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    skeleton.get_base_model().tie_weights()  # assign=True gives tied keys separate Parameters
    return skeleton


def save_adapter(skeleton, target_dir: Path) -> None:
    """The adapter alone: what ``peft.PeftModel.from_pretrained(base_model, target_dir)`` loads."""
    skeleton.save_pretrained(target_dir, safe_serialization=True, save_embedding_layers=False)
