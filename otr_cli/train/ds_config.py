"""Build the DeepSpeed JSON config from the typed recipe (pure: no torch, no devices)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from otr_cli.config import TrainConfig
from otr_cli.train.optimizer import deepspeed_builds_optimizer


@dataclass(frozen=True)
class BatchArithmetic:
    """How many sequences one optimizer step sees."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    max_tokens_per_batch: int = 0  # packed runs with a token budget (trainer.max_tokens_per_batch)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        if self.max_tokens_per_batch:
            return (f"global batch = micro-batches of up to {self.max_tokens_per_batch} tokens x grad accumulation "
                    f"{self.grad_accum} x world size {self.world_size} = up to "
                    f"{self.max_tokens_per_batch * self.grad_accum * self.world_size} tokens per step "
                    f"(whole examples; trainer.micro_batch_size sets only the validation batch)")
        return (f"global batch = micro batch {self.micro_batch_size} x grad accumulation "
                f"{self.grad_accum} x world size {self.world_size} = {self.global_batch} sequences per step")


def build_deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool, precision: str,
                           load_universal: bool = False) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize(config=...)``.

    The optimizer is declared here only when DeepSpeed builds it (deepspeed.optimizer=deepspeed:
    torch AdamW on CPU, its FusedAdam on GPU; DeepSpeedCPUAdam with offload); by default engine.py
    passes torch's AdamW in (otr_cli/train/optimizer.py). The learning-rate schedule is passed to
    ``initialize`` as a callable (see engine.py). `load_universal`: the engine will resume from a
    universal checkpoint (train/reshard.py: the checkpoint was saved by another number of ranks).
    `precision`: "fp32" | "bf16" | "fp16", what train/precision.py chose (never "auto").
    """
    ds, optim, trainer = cfg.deepspeed, cfg.optim, cfg.trainer
    adam: dict[str, Any] = {
        "type": "AdamW",
        "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                   "weight_decay": optim.weight_decay},
    }
    if not on_gpu and not ds.offload_optimizer:
        # DeepSpeed's FusedAdam needs CUDA; torch's AdamW is the CPU path.
        adam["params"]["torch_adam"] = True
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": on_gpu, "contiguous_gradients": True})
    if ds.zero_stage == 3:
        # Lets rank 0 write one consolidated Hugging Face model at each checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "train_batch_size": BatchArithmetic(trainer.micro_batch_size, trainer.grad_accum, world_size).global_batch,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if deepspeed_builds_optimizer(ds):
        config["optimizer"] = adam
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    extra = OmegaConf.to_container(ds.extra, resolve=True) if OmegaConf.is_config(ds.extra) else dict(ds.extra or {})
    return _deep_merge(config, extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
