"""Model loading and the DeepSpeed engine for one run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from otr_cli.config import TrainConfig
from otr_cli.models import apply_lora, load_model
from otr_cli.train.ds_config import build_deepspeed_config
from otr_cli.train.lr_schedule import build_lr_scheduler
from otr_cli.train.host_memory import large_frees_return_to_os
from otr_cli.train.optimizer import build_torch_adamw, deepspeed_builds_optimizer
from otr_cli.train.packed_attention import prepare_for_packing
from otr_cli.train.precision import PrecisionChoice, precision_for
from otr_cli.train.token_loss_model import TokenLossLM


@dataclass
class TrainingEngine:
    """What ``build_engine`` makes: the DeepSpeed engine, the LM inside it, and how it was configured.

    deepspeed: the ``deepspeed.DeepSpeedEngine`` wrapping ``TokenLossLM(lm)`` (forward returns
    (loss, stats)); lm: the Hugging Face model (peft-wrapped with LoRA); ds_config: the DeepSpeed
    JSON it was built from; precision: "fp32" | "bf16" | "fp16" and why (train/precision.py).
    """

    deepspeed: Any
    lm: torch.nn.Module
    ds_config: dict[str, Any]
    precision: PrecisionChoice

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])


def build_engine(cfg: TrainConfig, total_steps: int, world_size: int, load_universal: bool = False) -> TrainingEngine:
    """Load the model and wrap it in DeepSpeed; what start-up frees goes back to the OS (host_memory).
    `load_universal`: the engine will resume from a universal checkpoint (train/reshard.py)."""
    with large_frees_return_to_os():
        return _build_engine(cfg, total_steps, world_size, load_universal)


def _build_engine(cfg: TrainConfig, total_steps: int, world_size: int, load_universal: bool) -> TrainingEngine:
    import deepspeed

    on_gpu = torch.cuda.is_available()
    precision = precision_for(cfg, on_gpu)
    # The weights load in the compute dtype; under bf16/fp16 DeepSpeed's optimizer keeps fp32 master copies.
    dtype = getattr(torch, precision.weights_dtype)
    ds_config = build_deepspeed_config(cfg, world_size=world_size, on_gpu=on_gpu, precision=precision.precision,
                                       load_universal=load_universal)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    # Under ZeRO-3 the model is partitioned as it loads: no rank ever holds all of it (models.partitioned_loading).
    lm = load_model(cfg.model.name_or_path, gguf_file=cfg.model.gguf_file, revision=cfg.model.revision, dtype=dtype,
                    trust_remote_code=cfg.model.trust_remote_code,
                    attn_implementation=cfg.model.attn_implementation, zero3_config=ds_config if zero3 else None)
    lm.config.use_cache = False
    if cfg.data.packing:
        # Refuses flex and other kernels now, not at the first step; sdpa goes per example.
        prepare_for_packing(lm)
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        lm = apply_lora(lm, cfg.model.lora)
    wrapper = TokenLossLM(lm, zero_stage=cfg.deepspeed.zero_stage)
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper,
        model_parameters=trainable,
        optimizer=None if deepspeed_builds_optimizer(cfg.deepspeed) else build_torch_adamw(trainable, cfg.optim, on_gpu),
        config=ds_config,
        lr_scheduler=lambda optimizer: build_lr_scheduler(optimizer, cfg.optim, total_steps),
    )
    if world_size == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # Alone there is nothing to average, but stage 0 would still copy every gradient into a
        # flat all-reduce buffer each step: a model-sized allocation for nothing.
        engine.enable_backward_allreduce = False
    return TrainingEngine(deepspeed=engine, lm=lm, ds_config=ds_config, precision=precision)
