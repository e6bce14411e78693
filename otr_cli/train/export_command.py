"""`otr export CHECKPOINT --out DIR`: a Hugging Face model directory from any checkpoint of a run.

The weights come from the checkpoint's DeepSpeed state (ds/), so a checkpoint saved with
trainer.export_every_save=false exports too: ZeRO 1-3 shards are merged by DeepSpeed's own
``zero_to_fp32`` (the fp32 master weights; no GPU, no process group), ZeRO-0 keeps the whole
module in its model-states file. The architecture, the tokenizer, LoRA's settings and the chat
template come from the run's config.yaml (found above the checkpoint, or --config), else from the
Hugging Face export the checkpoint itself may hold (config.json, tokenizer files, adapter/).

The output is what a checkpoint's own export holds (train/export.py): model.safetensors in the
training dtype (or --dtype), config.json, generation_config.json with the chat template's
end-of-turn token, the tokenizer with the template; LoRA runs the merged model and adapter/, or
with --adapter the adapter alone. It is written beside DIR and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from otr_cli.errors import UserError, fail

USAGE = "otr export CHECKPOINT --out DIR [--dtype float32|bfloat16|float16] [--adapter] [--config RUN/config.yaml]"

DTYPES = ("float32", "bfloat16", "float16")
# How far above a checkpoint its run's config.yaml may be: RUN/checkpoints/step-N, RUN/checkpoints/abandoned-*/step-N.
CONFIG_SEARCH_DEPTH = 3


class ExportError(UserError):
    """A checkpoint otr export cannot read, or an output it must not write."""


@dataclass
class RunSettings:
    """What the export needs besides the weights. model_cfg: the run's ModelConfig (None: no config.yaml);
    chat_template, chat_template_kwargs: data.chat_template and data.chat_template_kwargs."""

    model_cfg: Any
    chat_template: Optional[str]
    chat_template_kwargs: dict[str, Any]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otr export", usage=USAGE,
                                     description="A Hugging Face model directory (from_pretrained, vLLM) from a "
                                                 "checkpoint of an otr run, also one that holds DeepSpeed's state "
                                                 "only (trainer.export_every_save=false, ZeRO-3 shards); runs on a "
                                                 "machine without GPUs.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory of a run (it holds ds/ and "
                                                      "trainer_state.json), e.g. outputs/mine/checkpoints/checkpoint-40")
    parser.add_argument("--out", type=Path, required=True, help="the new model directory (must not exist, or be "
                                                                "empty)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the weights written (default: the dtype the run "
                                                        "trained in)")
    parser.add_argument("--adapter", action="store_true", help="LoRA runs: write the adapter alone (peft), not "
                                                               "the merged model")
    parser.add_argument("--config", type=Path, help="the run's config.yaml (default: found above CHECKPOINT)")
    return parser


def export_entry(args: list[str]) -> int:
    options = _parser().parse_args(args)
    try:
        written = export_checkpoint(options.checkpoint, options.out, dtype=options.dtype, adapter_only=options.adapter,
                                    config_file=options.config)
    except UserError as err:
        fail(str(err))
    print(f"exported {options.checkpoint} to {options.out} ({written})")
    return 0


def export_checkpoint(checkpoint: Path, out: Path, dtype: Optional[str] = None, adapter_only: bool = False,
                      config_file: Optional[Path] = None) -> str:
    """Write the Hugging Face model of `checkpoint` to `out`; returns what was written, in words."""
    import torch

    from otr_cli.train.checkpoints import DS_TAG

    checkpoint = Path(checkpoint)
    _check_checkpoint(checkpoint, DS_TAG)
    _check_out(Path(out))
    settings = _run_settings(checkpoint, config_file)
    module, trained_dtype = _module_states(checkpoint / DS_TAG)
    lora = any(".lora_A." in key for key in module)
    if adapter_only and not lora:
        raise ExportError(f"--adapter: {checkpoint} is not of a LoRA run (its weights hold no LoRA adapter); "
                          f"leave --adapter out to export the model")
    state_dict = _training_state_dict(checkpoint / DS_TAG, checkpoint, module)
    target_dtype = getattr(torch, dtype) if dtype else trained_dtype
    state_dict = {key.removeprefix("lm."): value.to(target_dtype) if value.is_floating_point() else value
                  for key, value in state_dict.items()}
    model = _model_skeleton(checkpoint, settings, lora, target_dtype)
    tokenizer = _tokenizer(checkpoint, settings)
    staging = Path(out).parent / f".tmp-{Path(out).name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        written = _write(model, state_dict, staging, lora, adapter_only)
        _save_chat(staging, tokenizer, settings, model.config, adapter_only)
        if Path(out).exists():
            Path(out).rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"{written}, {str(target_dtype).removeprefix('torch.')}"


def _check_checkpoint(checkpoint: Path, ds_tag: str) -> None:
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: no such checkpoint directory; give a checkpoint of a run "
                          f"(e.g. outputs/mine/checkpoints/checkpoint-40)")
    if not (checkpoint / ds_tag).is_dir():
        if (checkpoint / "config.json").is_file() and any(checkpoint.glob("*.safetensors")):
            raise ExportError(f"{checkpoint} is already a Hugging Face model (no DeepSpeed state {ds_tag}/ to "
                              f"export): load it with from_pretrained as it is")
        raise ExportError(f"{checkpoint} holds no DeepSpeed state ({checkpoint / ds_tag}/ is missing): not an otr "
                          f"checkpoint; give a checkpoint directory of a run (e.g. outputs/mine/checkpoints/checkpoint-40)")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty directory; give a new directory")


def _find_run_config(checkpoint: Path) -> Optional[Path]:
    for folder in list(checkpoint.resolve().parents)[:CONFIG_SEARCH_DEPTH]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _run_settings(checkpoint: Path, config_file: Optional[Path]) -> RunSettings:
    from omegaconf import OmegaConf

    from otr_cli.config import TrainConfig, check_chat_template_kwargs

    config_file = config_file or _find_run_config(checkpoint)
    if config_file is None:
        if not (checkpoint / "config.json").is_file():
            raise ExportError(
                f"{checkpoint}: otr export needs the model's architecture and tokenizer, from the run's config.yaml "
                f"(otr train writes it in the run's directory, above checkpoints/; none found in the "
                f"{CONFIG_SEARCH_DEPTH} folders above) or from a Hugging Face export in the checkpoint (config.json, "
                f"missing: trainer.export_every_save=false). Pass --config RUN/config.yaml")
        return RunSettings(model_cfg=None, chat_template=None, chat_template_kwargs={})
    if not Path(config_file).is_file():
        raise ExportError(f"--config {config_file}: no such file; give the run's config.yaml")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(config_file)))
    except Exception as err:  # OmegaConf's validation and YAML errors: the file is not a run's config
        raise ExportError(f"{config_file} is not the config.yaml of an otr run: {str(err).splitlines()[0]}") from err
    return RunSettings(model_cfg=cfg.model, chat_template=cfg.data.chat_template,
                       chat_template_kwargs=check_chat_template_kwargs("data.chat_template_kwargs",
                                                                       cfg.data.chat_template_kwargs))


def _module_states(ds_dir: Path):
    """Rank 0's module state dict as DeepSpeed saved it (under ZeRO-3 its tensors are empty, but named and typed),
    and the dtype the run trained in."""
    import torch

    model_files = sorted(ds_dir.glob("*model_states.pt"))
    if not model_files:
        raise ExportError(f"{ds_dir} holds no DeepSpeed model states (*model_states.pt): the checkpoint is "
                          f"incomplete; export another checkpoint of the run")
    # mmap: ZeRO-0's file holds the whole model; only the tensors read are paged in.
    module = torch.load(model_files[0], map_location="cpu", mmap=True, weights_only=False)["module"]
    trained_dtype = next((value.dtype for value in module.values() if value.is_floating_point()), torch.float32)
    return module, trained_dtype


def _training_state_dict(ds_dir: Path, checkpoint: Path, module: dict) -> dict:
    """Every weight of the model, whole, on the CPU, keyed as DeepSpeed saved them."""
    if _zero_stage(checkpoint, ds_dir) == 0:
        return dict(module)
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # DeepSpeed's prints and progress bars; what went wrong it raises
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            # The fp32 master weights, merged from every rank's shard; frozen weights (LoRA's base) included.
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ds_dir.name)
    except (ValueError, FileNotFoundError) as err:
        raise ExportError(f"{checkpoint}: DeepSpeed could not merge the ZeRO shards in {ds_dir}: {err}") from err


def _zero_stage(checkpoint: Path, ds_dir: Path) -> int:
    """The ZeRO stage that saved ds/: otr_state.json's topology, else whether there are per-rank shards."""
    from otr_cli.train.checkpoints import read_trainer_state

    try:
        return int(read_trainer_state(checkpoint)["topology"]["zero_stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 if any(ds_dir.glob("*optim_states.pt")) else 0


def _model_skeleton(checkpoint: Path, settings: RunSettings, lora: bool, dtype):
    """The model (peft-wrapped for LoRA) on the meta device: its architecture, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from otr_cli.models import apply_lora, resolve_source

    cfg = settings.model_cfg
    trust = bool(cfg and cfg.trust_remote_code)
    if (checkpoint / "config.json").is_file():
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust)
    else:
        source = resolve_source(cfg.name_or_path, cfg.gguf_file)
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        config = AutoConfig.from_pretrained(source.path, revision=cfg.revision, trust_remote_code=trust, **kwargs)
        config._name_or_path = cfg.name_or_path  # what the adapter names as its base model
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    if not lora:
        return model
    if cfg is not None:
        return apply_lora(model, cfg.lora)
    adapter_dir = checkpoint / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(f"{checkpoint}: a LoRA checkpoint without its run's config.yaml or "
                          f"{adapter_dir}/adapter_config.json; pass --config RUN/config.yaml")
    from peft import PeftConfig, get_peft_model

    return get_peft_model(model, PeftConfig.from_pretrained(adapter_dir))


def _tokenizer(checkpoint: Path, settings: RunSettings):
    from otr_cli.models import load_run_tokenizer, load_tokenizer

    if settings.model_cfg is not None:
        return load_run_tokenizer(settings.model_cfg)
    return load_tokenizer(str(checkpoint))


def _write(model, state_dict: dict, target: Path, lora: bool, adapter_only: bool) -> str:
    from otr_cli.train.export import export_lora, lora_skeleton, save_adapter

    if lora:
        if adapter_only:
            save_adapter(lora_skeleton(model, state_dict), target)
            return "the LoRA adapter"
        export_lora(model, state_dict, target)
        return "the merged model and adapter/"
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()  # a tied LM head is not in the state dict; assign=True left it apart
    still_empty = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if still_empty or unexpected:
        raise ExportError(f"the checkpoint's weights do not fit the run's model {type(model).__name__}: missing "
                          f"{still_empty[:3]}, unexpected {unexpected[:3]}; is --config the config.yaml of this run?")
    model.save_pretrained(target, safe_serialization=True)
    return "the model"


def _save_chat(target: Path, tokenizer, settings: RunSettings, model_config, adapter_only: bool) -> None:
    from otr_cli.data.errors import DataError
    from otr_cli.train.chat_export import chat_export_for, save_tokenizer_with_template
    from otr_cli.train.export import save_chat_files

    try:
        chat = chat_export_for(tokenizer, settings.chat_template, settings.chat_template_kwargs)
    except DataError:
        if settings.model_cfg is not None:
            raise  # the run's data.chat_template cannot be read now (a template file moved): say which
        chat = None  # a checkpoint's own tokenizer without a template: the run trained with none to save
    if adapter_only:
        save_tokenizer_with_template(tokenizer, target, chat)
    else:
        save_chat_files(target, tokenizer, model_config, chat)
