"""How big one checkpoint will be, from the model's config alone (for `otr train dry_run=true`).

A checkpoint (otr_cli/train/checkpoints.py) holds DeepSpeed's state and a Hugging Face export:

    ds/ model states   the module's weights in the training dtype, written by rank 0 (ZeRO 0-2);
                       under ZeRO-3 each rank writes its shard of the frozen weights only (LoRA)
    ds/ optimizer      fp32 master weights + Adam's two fp32 moments of the trainable weights:
                       12 bytes per trainable parameter, split over the ranks (ZeRO >= 1, and bf16/fp16
                       at stage 0); at stage 0 in fp32 the two moments only, in rank 0's file
    model.safetensors  the (merged) model in the training dtype, written by rank 0; LoRA runs also
                       write the adapter (none with trainer.export_every_save=false)
    tokenizer files    copied from the model's tokenizer
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from otr_cli.config import TrainConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
# Adam's fp32 state per trainable parameter: the master copy and two moments.
ADAM_BYTES = 4 * 3


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of the model a run trains (unique tensors: tied weights count once)."""

    parameters: int
    lora_parameters: int = 0  # adapter weights that LoRA adds (0: LoRA off)
    tokenizer_bytes: int = 0


@dataclass
class CheckpointEstimate:
    """Bytes one checkpoint takes: per part (what, bytes, who writes it), on rank 0 and on every other rank."""

    world_size: int
    parts: list[tuple[str, int, str]] = field(default_factory=list)
    rank0_bytes: int = 0
    other_rank_bytes: int = 0

    def add(self, what: str, rank0: int, each_other: int, who: str) -> None:
        self.rank0_bytes += rank0
        self.other_rank_bytes += each_other
        self.parts.append((what, rank0 + each_other * (self.world_size - 1), who))

    @property
    def total_bytes(self) -> int:
        return self.rank0_bytes + self.other_rank_bytes * (self.world_size - 1)


def estimate_checkpoint(size: ModelSize, *, dtype_bytes: int, zero_stage: int, world_size: int,
                        mixed_precision: bool, hf_export: bool = True) -> CheckpointEstimate:
    """The checkpoint of a model of `size` trained in a `dtype_bytes` dtype (2: bf16/fp16, 4: fp32).

    mixed_precision: bf16/fp16 training (DeepSpeed then keeps fp32 master weights, even at stage 0).
    hf_export: the checkpoint holds a Hugging Face export (trainer.export_every_save).
    """
    estimate = CheckpointEstimate(world_size)
    lora = size.lora_parameters
    module = size.parameters + lora
    trainable = lora or size.parameters
    frozen = size.parameters if lora else 0
    if zero_stage == 3:
        if frozen:  # else the module's files hold only placeholders of the partitioned weights
            shard = frozen * dtype_bytes // world_size
            estimate.add("DeepSpeed model states (frozen weights' shards)", shard, shard, "every rank, 1/world each")
    else:
        # Stage 2 also stores the frozen weights beside the module's (DeepSpeed's frozen_param_fragments).
        extra_frozen = frozen if zero_stage == 2 else 0
        estimate.add("DeepSpeed model states", (module + extra_frozen) * dtype_bytes, 0, "rank 0")
    if zero_stage == 0 and not mixed_precision:
        estimate.add("optimizer (Adam moments)", trainable * 8, 0, "rank 0")
    else:
        shard = trainable * ADAM_BYTES // world_size
        estimate.add("optimizer (fp32 master + Adam moments)", shard, shard, "every rank, 1/world each")
    if not hf_export:
        return estimate
    estimate.add("Hugging Face export (model.safetensors)", size.parameters * dtype_bytes, 0, "rank 0")
    if lora:
        estimate.add("LoRA adapter", lora * dtype_bytes, 0, "rank 0")
    if size.tokenizer_bytes:
        estimate.add("tokenizer files", size.tokenizer_bytes, 0, "rank 0")
    return estimate


def lora_parameter_count(model, target_modules: list[str], r: int) -> int:
    """Weights LoRA of rank `r` adds to `model`'s Linear layers named in `target_modules` (peft's matching)."""
    import torch

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            count += r * (module.in_features + module.out_features)
    return count


def model_size_from_config(cfg: TrainConfig) -> ModelSize:
    """Parameter counts without loading weights: the model is built from its config.json on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from otr_cli.models import BUILTIN_MODELS, _builtin_gguf, resolve_source

    model_cfg = cfg.model
    if model_cfg.name_or_path in BUILTIN_MODELS:
        # The GGUF's header has the config; resolve_source would dequantise the weights first.
        gguf = _builtin_gguf(model_cfg.name_or_path)
        path, gguf_file = str(gguf.parent), gguf.name
    else:
        source = resolve_source(model_cfg.name_or_path, model_cfg.gguf_file)
        path, gguf_file = source.path, source.gguf_file
    kwargs = {"trust_remote_code": model_cfg.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["revision"] = model_cfg.revision
    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    lora = 0
    if model_cfg.lora.enabled:
        lora = lora_parameter_count(model, list(model_cfg.lora.target_modules), model_cfg.lora.r)
    return ModelSize(parameters, lora, _tokenizer_bytes(Path(model_cfg.tokenizer or path)))


def _tokenizer_bytes(directory: Path) -> int:
    """Size of the tokenizer files a checkpoint copies (0 when they are not local: a hub id)."""
    if not directory.is_dir():
        return 0
    return sum((directory / name).stat().st_size for name in TOKENIZER_FILES if (directory / name).is_file())


def directory_bytes(path: Path) -> int:
    """Bytes of every file under `path`, as this host sees it (other nodes' shards only on a shared file system)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.3g} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.3g} TB"


def describe_estimate(estimate: CheckpointEstimate, save_total_limit: Optional[int]) -> list[str]:
    """Lines for the dry run: parts, per rank, in total, and on disk with the kept checkpoints."""
    lines = [f"  {what}: {format_bytes(size)} ({who})" for what, size, who in estimate.parts]
    lines.append(f"per rank: rank 0 writes {format_bytes(estimate.rank0_bytes)}" +
                 (f", each other rank {format_bytes(estimate.other_rank_bytes)}" if estimate.world_size > 1 else ""))
    lines.append(f"one checkpoint: {format_bytes(estimate.total_bytes)} in total over {estimate.world_size} rank(s)")
    if save_total_limit:
        lines.append(f"on disk: up to {save_total_limit} checkpoints kept (trainer.save_total_limit), "
                     f"{format_bytes(estimate.total_bytes * save_total_limit)}, plus final/")
    return lines


def estimate_for_run(cfg: TrainConfig, on_gpu: bool, world_size: int) -> CheckpointEstimate:
    """The estimate for this config, in the dtype build_engine (engine.py) will train in."""
    import torch

    from otr_cli.train.precision import choose_precision, native_bf16_matmul

    # A GPU run planned from a machine without one (launcher.gpus_per_node): assume a GPU with bf16.
    native_bf16 = native_bf16_matmul(on_gpu) if on_gpu == torch.cuda.is_available() else on_gpu
    precision = choose_precision(cfg.deepspeed.precision, cfg.model.dtype, on_gpu, native_bf16)
    dtype_bytes = getattr(torch, precision.weights_dtype).itemsize
    return estimate_checkpoint(model_size_from_config(cfg), dtype_bytes=dtype_bytes,
                               zero_stage=cfg.deepspeed.zero_stage, world_size=world_size,
                               mixed_precision=precision.mixed,
                               hf_export=cfg.trainer.export_every_save)
