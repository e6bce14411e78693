"""Typed schema of every config group, registered with Hydra's ConfigStore.

The YAML files under ``recipes/`` are merged onto these dataclasses, so a key that does not
exist or a value of the wrong type fails at start-up with the key's full path. Checks that
the type system cannot express (ranges, allowed names, combinations) live in ``validate``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from otr_cli.errors import UserError
from otr_cli.losses.objectives import LossOptionError, LossOptions, make_options

# loss.reduction: every supervised token weighs the same, or every sequence (the paper's 1/T).
LOSS_REDUCTIONS = ("token", "sequence")
# transformers.get_scheduler builds each (train/lr_schedule.py has the mapping).
SCHEDULERS = ("cosine", "linear", "constant", "cosine_with_min_lr", "warmup_stable_decay")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
# deepspeed.precision -> the model.dtype it trains (train/precision.py: the one key that decides).
DTYPE_OF_PRECISION = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TRUNCATIONS = ("truncate", "drop")
DATA_FORMATS = ("auto", "messages", "prompt_completion", "question_answer", "alpaca", "text")
# deepspeed.optimizer: who builds AdamW (otr_cli/train/optimizer.py).
DS_OPTIMIZERS = ("torch", "deepspeed")
NONFINITE_POLICIES = ("skip", "stop")
FLOAT32_MAX = 3.4028234663852886e38
# trainer.report_to: tracker -> (module to import, how to install it). "auto": tensorboard when installed.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'otr-cli[tensorboard]'  (or: pip install tensorboard)"),
    "wandb": ("wandb", "pip install 'otr-cli[wandb]'  (or: pip install wandb)"),
    "mlflow": ("mlflow", "pip install 'otr-cli[mlflow]'  (or: pip install mlflow-skinny)"),
}


class ConfigError(UserError, ValueError):
    """A config value that is well-typed but not usable; the message names the key."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    # A hub id, a local directory, a .gguf file, or the built-in name "smollm2-135m-instruct".
    name_or_path: str = "smollm2-135m-instruct"
    # File name inside name_or_path when it is a directory or hub repo holding a GGUF.
    gguf_file: Optional[str] = None
    revision: Optional[str] = None
    # Tokenizer source when it differs from the model (defaults to the model's).
    tokenizer: Optional[str] = None
    trust_remote_code: bool = False
    # The dtype the weights load in. "auto" follows deepspeed.precision, which decides how a run trains
    # (otr_cli/train/precision.py); a value that disagrees with an explicit deepspeed.precision is refused.
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SyntheticArithConfig:
    """Built-in arithmetic word problems; see ``otr_cli.data.synthetic_arith``."""

    num_train: int = 2000
    num_validation: int = 64
    num_test: int = 200
    # Number of operations per in-distribution problem (inclusive range).
    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 20
    # The out-of-distribution split: more steps, larger numbers.
    ood_steps: int = 5
    ood_max_operand: int = 99
    seed: int = 1234


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``); a field left null takes data.*'s value."""

    # A hub id, a local file or directory, or "synthetic_arith", as data.source.
    source: str = ""
    subset: Optional[str] = None
    split: Optional[str] = None
    format: Optional[str] = None
    messages_field: Optional[str] = None
    prompt_field: Optional[str] = None
    completion_field: Optional[str] = None
    question_field: Optional[str] = None
    answer_field: Optional[str] = None
    instruction_field: Optional[str] = None
    input_field: Optional[str] = None
    output_field: Optional[str] = None
    text_field: Optional[str] = None
    system_prompt: Optional[str] = None
    # This source's share of the examples drawn for the weighted sources (null and no examples: 1).
    weight: Optional[float] = None
    # Exactly this many examples from this source (its records repeated when it has fewer); not with weight.
    examples: Optional[int] = None


# SourceConfig fields that replace the data.* field of the same name for that source's records.
SOURCE_SETTING_KEYS = ("subset", "split", "format", "messages_field", "prompt_field", "completion_field",
                       "question_field", "answer_field", "instruction_field", "input_field", "output_field",
                       "text_field", "system_prompt")


@dataclass
class DataConfig:
    # "synthetic_arith", a hub id, or a local .json / .jsonl / .parquet file or directory.
    source: str = "synthetic_arith"
    # Hub subset / configuration name, e.g. "main" for openai/gsm8k.
    subset: Optional[str] = None
    split: str = "train"
    format: str = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    question_field: str = "question"
    answer_field: str = "answer"
    # alpaca: the user turn is instruction + "\n" + input (input optional), the reply is output.
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    # text: a document for language modelling, every token supervised, no chat template.
    text_field: str = "text"
    # System prompt added to question/answer and prompt/completion examples (None: none added).
    system_prompt: Optional[str] = None
    # Jinja chat template overriding the tokenizer's (a template string or a path to a file).
    chat_template: Optional[str] = None
    # Extra template variables for every rendering, e.g. {enable_thinking: false} (Qwen3's non-thinking mode).
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    max_length: int = 512
    truncation: str = "truncate"
    # Keep only the first N training examples after shuffling (None: all).
    max_examples: Optional[int] = None
    # Numeric field of each record multiplying its loss (0: no loss, kept in the data order); None: all 1.
    weight_field: Optional[str] = None
    # Validation: a separate split of the source, or a fraction / count held out of train.
    validation_split: Optional[str] = None
    validation_size: float = 0.0
    shuffle: bool = True
    # Padding-free training: each micro-batch's examples concatenated, attention confined to each
    # example (docs/data.md, "Packing"). pack_length: most tokens in a row (None: the whole micro-batch
    # in one row with sdpa and flash attention, which attend per example; max_length with eager).
    packing: bool = False
    pack_length: Optional[int] = None
    # Unpacked runs: micro-batches of examples of similar length (less padding), order still set by the seed.
    group_by_length: bool = False
    # Tokenized-data cache directory (None: $OTR_CACHE_DIR if set, else ~/.cache/otr/tokenized).
    cache_dir: Optional[str] = None
    # Reuse tokenized data from cache_dir across starts and ranks (false: always tokenize, write nothing).
    cache: bool = True
    synthetic: SyntheticArithConfig = field(default_factory=SyntheticArithConfig)
    # A mixture: [{source: a.jsonl, format: alpaca, weight: 2}, {source: b.jsonl, examples: 1000}]; replaces
    # data.source when not empty (docs/data.md, "Mixtures").
    sources: List[SourceConfig] = field(default_factory=list)


@dataclass
class PhaseConfig:
    """One phase of an objective schedule (``loss.phases``); unset fields inherit from ``loss``."""

    objective: str = "sft"
    # Optimizer steps in this phase; -1: until the end of the run (only the last phase).
    steps: int = -1
    k: Optional[int] = None
    temperature: Optional[float] = None
    beta: Optional[float] = None
    baseline: Optional[str] = None
    sft_weight: Optional[float] = None


@dataclass
class LossConfig:
    objective: str = "sft"
    # OTR: samples per position, rollout temperature, reward of a non-target sample.
    k: int = 256
    temperature: float = 1.0
    beta: float = 0.0
    baseline: str = "none"
    reduction: str = "token"
    # Rows of hidden states per chunk of the fused kernel (None: chosen from V and H).
    chunk_size: Optional[int] = None
    # "fused" (chunked, never materialises logits) or "reference" (naive, for checks).
    implementation: str = "fused"
    # Let the fused kernel's float32 matmuls use TF32 on CUDA (faster, ~1e-3 relative rounding
    # of the logits); false keeps full float32. No effect on CPU or bf16/fp16 models.
    allow_tf32: bool = True
    # Run SFT for this many optimizer steps before switching to `objective`.
    sft_warmup_steps: int = 0
    # Constant mix: loss = objective + sft_weight * CE.
    sft_weight: float = 0.0
    # General schedule: [{objective: sft, steps: 16}, {objective: otr, steps: -1}]; replaces
    # sft_warmup_steps. A phase may override k, temperature, beta, baseline and sft_weight.
    phases: List[PhaseConfig] = field(default_factory=list)
    # Warn once when, averaged over the last weak_signal_steps OTR steps, the match rate is under
    # weak_signal_threshold or the fraction of targets with rollout probability < 1e-3 is over
    # unreachable_threshold (1.0: off). See docs/loss.md, "When OTR learns".
    weak_signal_threshold: float = 0.01
    weak_signal_steps: int = 20
    unreachable_threshold: float = 0.04


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    # Final learning rate as a fraction of lr (all but constant).
    min_lr_ratio: float = 0.0
    # warmup_stable_decay: the final decay's share of the steps (rounded up); the rest after warm-up is stable.
    decay_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    # How the run trains: "fp32", or "bf16"/"fp16" mixed precision (fp32 master weights in the optimizer).
    # "auto": bf16 on a GPU with bf16, else fp32 (on every CPU); an explicit model.dtype sets it instead.
    precision: str = "auto"
    # "torch": torch.optim.AdamW (fused on GPU), nothing to compile; "deepspeed": DeepSpeed's FusedAdam, which
    # compiles with nvcc at start-up. ZeRO-Offload (offload_optimizer) always uses DeepSpeedCPUAdam.
    optimizer: str = "torch"
    # Extra keys merged into the generated DeepSpeed JSON (advanced).
    extra: Any = field(default_factory=dict)


@dataclass
class TrainerConfig:
    # -1: derive from epochs.
    max_steps: int = -1
    epochs: float = 1.0
    micro_batch_size: int = 4
    grad_accum: int = 1
    # With data.packing: fill each micro-batch with examples up to this many real tokens instead of
    # micro_batch_size examples (0: off). A step is still grad_accum micro-batches on every rank.
    max_tokens_per_batch: int = 0
    log_steps: int = 1
    save_steps: int = 0
    save_total_limit: Optional[int] = 2
    # Every checkpoint also holds a Hugging Face export (model.safetensors, config.json, tokenizer) that
    # from_pretrained loads. false: checkpoints hold DeepSpeed's state only, saves skip rank 0's export
    # of the whole model; final/ and the models that evaluations load are still exported.
    export_every_save: bool = True
    # "auto" | "never" | a checkpoint directory.
    resume: str = "auto"
    # Validation loss every N optimizer steps (0: only at the end, if there is a validation set).
    eval_steps: int = 0
    # Refuse to start in an output_dir that holds a finished run unless this is true.
    overwrite: bool = False
    # Resume although the training data differ from those the checkpoint was trained on (refused otherwise:
    # the remaining steps would see other examples); the resume is recorded in metrics.jsonl.
    resume_with_changed_data: bool = False
    progress: bool = True
    # Experiment trackers getting metrics.jsonl's scalars: tensorboard, wandb, mlflow; [none] for none;
    # [auto]: tensorboard when it is installed.
    report_to: List[str] = field(default_factory=lambda: ["auto"])
    # A step whose loss or gradient is not finite (NaN, inf): "skip" its update (weights and optimizer
    # state unchanged; the batch is consumed) or "stop" the run there (docs/checkpoints.md).
    on_nonfinite: str = "skip"
    # on_nonfinite=skip: the run stops at the first non-finite step after this many skipped in a row.
    max_nonfinite_skips: int = 3
    # The metric that picks the best checkpoint ("": none): val_ce (validation cross-entropy, every
    # trainer.eval_steps, lower is better) or eval/<benchmark> (every eval.every_steps, higher is
    # better). The best is never pruned and is named in trainer_state.json (best_model_checkpoint);
    # trainer.save_steps must be a multiple of the metric's evaluation interval.
    metric_for_best: str = ""
    # Override the direction of trainer.metric_for_best (null: lower for val_ce, higher for eval/*).
    greater_is_better: Optional[bool] = None
    # What final/ holds: the "last" checkpoint, or the "best" by trainer.metric_for_best.
    final_model: str = "last"
    # Stop after this many evaluations of trainer.metric_for_best without improvement (0: never); the
    # stop saves and finishes like the end of training (final/, evaluations).
    early_stopping_patience: int = 0
    # A new best by no more than this still counts as no improvement for early stopping.
    early_stopping_threshold: float = 0.0


@dataclass
class VllmConfig:
    # eval.backend=vllm runs vLLM in a child process that exits when done (its GPU memory is freed).
    # Fraction of each GPU's TOTAL memory vLLM may claim (weights + KV cache). None: computed on each
    # rank when the child starts, from what is free then (after the trainer returns its cached blocks)
    # less a margin; `otr train` checks at its start that enough is free. Ignored on CPU.
    gpu_memory_utilization: Optional[float] = None
    # GPUs one model is split over (tensor parallelism); > 1 only with one rank per node.
    tensor_parallel_size: int = 1
    # Longest prompt + completion in tokens (None: the model's own limit, whose KV cache may not fit).
    max_model_len: Optional[int] = None
    # The weights' dtype in vLLM: float32, bfloat16, float16 or auto (vLLM's choice). None: the dtype
    # the hf backend would use (model.dtype; auto there is bfloat16 on GPU, float32 on CPU).
    dtype: Optional[str] = None
    # Python interpreter of the vLLM child (None: otr's own); vLLM often lives in an environment of
    # its own. The child is a single file that needs only vLLM there, not otr.
    python: Optional[str] = None


@dataclass
class EvalConfig:
    benchmarks: List[str] = field(default_factory=list)
    # Also evaluate the model before training (shows the gain).
    before_training: bool = False
    # Also evaluate the checkpoint at the end of the SFT warm-up (loss.sft_warmup_steps).
    after_warmup: bool = False
    limit: Optional[int] = None
    batch_size: int = 16
    max_new_tokens: int = 256
    # Directory holding <benchmark>/test.jsonl (humaneval/HumanEval.jsonl.gz); None: hub ids.
    data_dir: Optional[str] = None
    # Explicit file per benchmark, e.g. {gsm8k: /data/gsm8k_test.jsonl}; beats data_dir and the hub.
    paths: Dict[str, str] = field(default_factory=dict)
    # The `custom` benchmark: a local .jsonl/.json/.parquet file, its field names and its grader.
    custom_path: Optional[str] = None
    custom_question_field: str = "question"
    custom_answer_field: str = "answer"
    custom_grader: str = "math"
    # "hf" (transformers generate) or "vllm" (GPU, when installed; settings in eval.vllm).
    backend: str = "hf"
    vllm: VllmConfig = field(default_factory=VllmConfig)
    # Completions per prompt: 1 with temperature 0 is greedy; more give pass@k.
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    # Generation stops at the first of these strings (the text is cut there too).
    stop: List[str] = field(default_factory=list)
    seed: int = 0
    # Worked examples from the benchmark's train split shown before each question (gsm8k only; 0: zero-shot).
    few_shot: int = 0
    # Template variables for the prompts, e.g. {enable_thinking: false}, over data.chat_template_kwargs:
    # prompts are rendered as the training text was unless a variable is set here. (A mapping, not
    # null-for-inherit: OmegaConf cannot merge a command-line mapping into a null node.)
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Reuse completions already generated for the same (model, prompt, settings).
    cache: bool = True
    # Code benchmarks: sandbox limits per sample and parallel sandboxes.
    sandbox_timeout_s: float = 10.0
    sandbox_memory_mb: int = 2048
    code_workers: int = 2
    # Training: evaluate every N optimizer steps on eval.every_steps_limit problems (0: off).
    every_steps: int = 0
    every_steps_limit: int = 20


@dataclass
class LauncherConfig:
    """Where `otr train -m` sweeps run, and how one run's processes coordinate and stop.

    The SLURM keys describe ONE sweep point (one array element); recipes/launcher/slurm.yaml
    hands them to Hydra's submitit launcher (docs/slurm.md).
    """

    # "local": the sweep's points run one after another in this process; "slurm": one job array.
    name: str = "local"
    partition: Optional[str] = None
    nodes: int = 1
    # None: request no GPUs. Runs use one process per GPU: set tasks_per_node to the same number.
    gpus_per_node: Optional[int] = None
    tasks_per_node: int = 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    timeout_min: int = 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # Most array elements running at once.
    array_parallelism: int = 256
    # SLURM sends `signal` this many seconds before the time limit; the run saves at the next step
    # boundary and requeues itself.
    signal: str = "USR1"
    signal_delay_s: int = 120
    # Shell lines run in the job before training (module load ..., source .venv/bin/activate).
    setup: List[str] = field(default_factory=list)
    # A preempted or timed-out SLURM job requeues itself at most this many times (0: never).
    max_requeues: int = 20
    # A collective that waits longer than this fails (a hung or dead rank stops the run instead of hanging
    # it). Rank 0 alone saves models and runs benchmarks while the others wait: keep it generous.
    dist_timeout_min: float = 30.0
    # The longest wait at start-up for one rank's solo work on the data (rank 0 reading and hashing the
    # records, then merging a first tokenization that every rank shared): those waits use a process group
    # of their own, so a large data set does not need a large dist_timeout_min.
    data_timeout_min: float = 360.0


@dataclass
class RunConfig:
    # None: outputs/<run.name> for a single run, the job's sweep subdirectory in a multirun.
    output_dir: Optional[str] = None
    name: str = "run"
    # One `otr train` per output_dir (train/run_lock.py): a lock whose holder on another host has not refreshed
    # it for this many minutes is taken over (its holder refreshes it every min(1, this/4) minutes).
    lock_stale_min: float = 10.0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 42
    dry_run: bool = False


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "deepspeed": DeepSpeedConfig,
    "trainer": TrainerConfig,
    "eval": EvalConfig,
    "launcher": LauncherConfig,
}


def register_configs() -> None:
    """Register the schema that ``recipes/train.yaml`` lists first, so every merge is typed."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)


def check_precision_keys(model_dtype: str, precision: str) -> None:
    """model.dtype and deepspeed.precision name one setting: refuse a pair that disagrees.

    Without this, model.dtype=bfloat16 with fp32 precision trained pure bf16 (bf16 weights updated
    in place, no fp32 master copy), and deepspeed.precision=bf16 silently overrode model.dtype=float32.
    """
    if model_dtype == "auto" or precision == "auto" or DTYPE_OF_PRECISION[precision] == model_dtype:
        return
    wanted = {dtype: name for name, dtype in DTYPE_OF_PRECISION.items()}[model_dtype]
    raise ConfigError(f"model.dtype={model_dtype} and deepspeed.precision={precision} disagree: deepspeed.precision "
                      f"decides how the run trains (bf16/fp16 keep fp32 master weights) and the weights load in "
                      f"its dtype; set model.dtype=auto, or deepspeed.precision={wanted}")


def _choice(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not one of {', '.join(allowed)}")


def _positive(path: str, value: float, strict: bool = True) -> None:
    if value is None or (value <= 0 if strict else value < 0):
        raise ConfigError(f"{path}={value!r} must be {'> 0' if strict else '>= 0'}")


def _check_learning_rate(lr: float, betas) -> None:
    """optim.lr: positive, and small enough that Adam's first update, lr / (1 - beta1), is a float32 number
    (beyond it torch's AdamW fails in the middle of a step: "value cannot be converted to type float")."""
    if lr is None or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optim.lr={lr!r} must be a finite number > 0")
    first_update = lr / (1.0 - float(betas[0])) if len(betas) == 2 and betas[0] < 1 else lr
    if not math.isfinite(first_update) or first_update > FLOAT32_MAX:
        raise ConfigError(f"optim.lr={lr!r} is too large: Adam's first update lr / (1 - beta1) = {first_update:.3g} "
                          f"exceeds float32's largest value ({FLOAT32_MAX:.3g}); use a learning rate like 1e-5")


def validate(cfg: TrainConfig | DictConfig) -> TrainConfig:
    """Range and combination checks; returns the config as a typed object."""
    if isinstance(cfg, DictConfig):
        cfg = typed_config(cfg, TrainConfig)
    loss, optim, trainer, data, ds = cfg.loss, cfg.optim, cfg.trainer, cfg.data, cfg.deepspeed
    loss_options(loss)
    _choice("loss.reduction", loss.reduction, LOSS_REDUCTIONS)
    _positive("loss.sft_warmup_steps", loss.sft_warmup_steps, strict=False)
    _validate_phases(loss)
    if trainer.max_steps > 0:  # else the length comes from the data, and build_schedule checks it
        check_phases_cover(loss, trainer.max_steps)
    if not 0.0 <= loss.weak_signal_threshold < 1.0:
        raise ConfigError(f"loss.weak_signal_threshold={loss.weak_signal_threshold} must be in [0, 1)")
    _positive("loss.weak_signal_steps", loss.weak_signal_steps)
    if not 0.0 <= loss.unreachable_threshold <= 1.0:
        raise ConfigError(f"loss.unreachable_threshold={loss.unreachable_threshold} must be in [0, 1] "
                          "(a fraction of positions; 1 turns the warning off)")
    _check_learning_rate(optim.lr, optim.betas)
    _choice("optim.scheduler", optim.scheduler, SCHEDULERS)
    if len(optim.betas) != 2:
        raise ConfigError(f"optim.betas={optim.betas} must have two values")
    if not 0.0 <= optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio={optim.warmup_ratio} must be in [0, 1)")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={optim.min_lr_ratio} must be in [0, 1]")
    if not 0.0 <= optim.decay_ratio <= 1.0:
        raise ConfigError(f"optim.decay_ratio={optim.decay_ratio} must be in [0, 1]")
    _choice("deepspeed.precision", ds.precision, PRECISIONS)
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={ds.zero_stage} must be 0, 1, 2 or 3")
    if ds.offload_param and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
    if ds.offload_optimizer and ds.zero_stage < 1:
        raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage>=1")
    _choice("deepspeed.optimizer", ds.optimizer, DS_OPTIMIZERS)
    if ds.optimizer == "torch" and not ds.offload_optimizer and "optimizer" in (ds.extra or {}):
        raise ConfigError("deepspeed.extra.optimizer declares DeepSpeed's optimizer, but deepspeed.optimizer=torch "
                          "passes torch's AdamW in: set deepspeed.optimizer=deepspeed to use the extra block")
    _positive("trainer.micro_batch_size", trainer.micro_batch_size)
    _choice("trainer.on_nonfinite", trainer.on_nonfinite, NONFINITE_POLICIES)
    _positive("trainer.max_nonfinite_skips", trainer.max_nonfinite_skips, strict=False)
    _positive("trainer.grad_accum", trainer.grad_accum)
    _positive("trainer.log_steps", trainer.log_steps)
    _positive("trainer.save_steps", trainer.save_steps, strict=False)
    if trainer.max_steps == 0 or trainer.max_steps < -1:
        raise ConfigError(f"trainer.max_steps={trainer.max_steps} must be > 0 (or -1: use trainer.epochs)")
    if trainer.max_steps == -1:
        _positive("trainer.epochs", trainer.epochs)
    if trainer.save_total_limit is not None:
        _positive("trainer.save_total_limit", trainer.save_total_limit)
    _positive("run.lock_stale_min", cfg.run.lock_stale_min)
    validate_data(data)
    _positive("trainer.max_tokens_per_batch", trainer.max_tokens_per_batch, strict=False)
    if trainer.max_tokens_per_batch:
        if not data.packing:
            raise ConfigError(f"trainer.max_tokens_per_batch={trainer.max_tokens_per_batch} fills micro-batches "
                              f"with packed rows: set data.packing=true (unpacked runs count examples with "
                              f"trainer.micro_batch_size; data.group_by_length=true cuts their padding)")
        if trainer.max_tokens_per_batch < data.max_length:
            raise ConfigError(f"trainer.max_tokens_per_batch={trainer.max_tokens_per_batch} is below "
                              f"data.max_length={data.max_length}: an example of that length would fit no "
                              f"micro-batch; raise it (several times data.max_length is typical)")
    _validate_best_checkpoint(cfg)
    resolve_report_to(trainer.report_to)
    # Checked now, not at the first evaluation hours later.
    check_chat_template_kwargs("eval.chat_template_kwargs", cfg.eval.chat_template_kwargs)
    _choice("model.dtype", cfg.model.dtype, MODEL_DTYPES)
    check_precision_keys(cfg.model.dtype, ds.precision)
    validate_launcher(cfg.launcher)
    return cfg


def typed_config(cfg: DictConfig, schema: type) -> Any:
    """`cfg` as the dataclass object `schema`; a key the schema lacks (added with `+key=value`), a value of the
    wrong type or an unset mandatory value raises ConfigError naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    from otr_cli.composition_errors import describe

    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(describe(err, schema_keys(schema), "")) from err


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_report_to(report_to: List[str]) -> List[str]:
    """The trackers trainer.report_to asks for; an unknown name or a missing package fails here, at start-up."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    allowed = ("auto", "none") + tuple(TRACKER_PACKAGES)
    for name in names:
        _choice("trainer.report_to", name, allowed)
    if ("none" in names or "auto" in names) and len(names) > 1:
        raise ConfigError(f"trainer.report_to={names}: 'none' and 'auto' stand alone; list trackers instead, "
                          f"e.g. trainer.report_to=[tensorboard,mlflow]")
    if names in (["none"], []):
        return []
    if names == ["auto"]:
        return ["tensorboard"] if _installed("tensorboard") else []
    for name in names:
        module, install = TRACKER_PACKAGES[name]
        if not _installed(module):
            raise ConfigError(f"trainer.report_to lists {name}, but the {module!r} package is not installed: "
                              f"{install}; or remove {name} from trainer.report_to")
    return list(dict.fromkeys(names))


def check_phases_cover(loss: LossConfig, total_steps: int) -> None:
    """A schedule whose phases all have a length must cover the run's `total_steps` optimizer steps."""
    if not loss.phases or loss.phases[-1].steps == -1:
        return
    covered = sum(phase.steps for phase in loss.phases)
    if covered < total_steps:
        raise ConfigError(f"loss.phases cover {covered} optimizer steps but the run has {total_steps}; "
                          f"give the last phase steps: -1 (until the end) or lower trainer.max_steps")


FINAL_MODELS = ("last", "best")


def _validate_best_checkpoint(cfg: TrainConfig) -> None:
    """trainer.metric_for_best and what depends on it: the metric must be measured at every checkpoint step
    (the best is a checkpoint: kept, named, put in final/), so trainer.save_steps is a multiple of its interval."""
    trainer = cfg.trainer
    metric = trainer.metric_for_best
    _choice("trainer.final_model", trainer.final_model, FINAL_MODELS)
    _positive("trainer.early_stopping_patience", trainer.early_stopping_patience, strict=False)
    if trainer.early_stopping_threshold < 0:
        raise ConfigError(f"trainer.early_stopping_threshold={trainer.early_stopping_threshold} must be >= 0")
    if not metric:
        for key, value, default in (("trainer.final_model", trainer.final_model, "last"),
                                    ("trainer.early_stopping_patience", trainer.early_stopping_patience, 0)):
            if value != default:
                raise ConfigError(f"{key}={value} needs trainer.metric_for_best (val_ce, or eval/<benchmark>) "
                                  f"to say which checkpoint is the best")
        return
    if metric == "val_ce":
        interval, interval_key = trainer.eval_steps, "trainer.eval_steps"
    elif metric.startswith("eval/") and metric[len("eval/"):] in cfg.eval.benchmarks:
        interval, interval_key = cfg.eval.every_steps, "eval.every_steps"
    else:
        raise ConfigError(f"trainer.metric_for_best={metric!r} must be val_ce or eval/<benchmark> with the benchmark "
                          f"in eval.benchmarks ({', '.join(cfg.eval.benchmarks) or 'none'})")
    if interval <= 0:
        raise ConfigError(f"trainer.metric_for_best={metric} is measured every {interval_key} steps, which is "
                          f"{interval}: set {interval_key} (e.g. to trainer.save_steps)")
    if trainer.save_steps <= 0 or trainer.save_steps % interval:
        raise ConfigError(f"trainer.save_steps={trainer.save_steps} must be a multiple of {interval_key}={interval} "
                          f"with trainer.metric_for_best={metric}: the best is chosen among checkpoints, and a "
                          f"checkpoint has the metric only at a step where it is measured")
    if trainer.final_model == "best" and not trainer.export_every_save:
        raise ConfigError("trainer.final_model=best needs trainer.export_every_save=true: final/ is the best "
                          "checkpoint's Hugging Face export, which checkpoints hold only with it")


def validate_data(data: DataConfig) -> None:
    """Every check of the data group that needs no data: run at start-up and again by build_datasets.

    What depends on the records (a hold-out larger than the set, nothing left after truncation)
    is checked where they are read (otr_cli/data/pipeline.py).
    """
    sources = source_entries(data)
    for index, entry in enumerate(sources):
        _validate_source(f"data.sources[{index}]", entry)
    if not data.source and not sources:
        raise ConfigError("data.source is empty: say what to train on with a recipe (recipe=smollm2_demo, or a file: "
                          "`otr train my_recipe.yaml`), a data group (data=gsm8k) or a file "
                          "(data.source=my_chats.jsonl, docs/data.md)")
    _choice("data.truncation", data.truncation, TRUNCATIONS)
    _choice("data.format", data.format, DATA_FORMATS)
    if data.max_length < 2:  # one input token and one target at least
        raise ConfigError(f"data.max_length={data.max_length} must be at least 2")
    if data.validation_size < 0 or (data.validation_size >= 1 and data.validation_size != int(data.validation_size)):
        raise ConfigError(f"data.validation_size={data.validation_size} must be a fraction below 1 or a whole count "
                          f"(0: none)")
    if data.validation_split and data.validation_size > 0:
        raise ConfigError(f"data.validation_split={data.validation_split!r} and data.validation_size="
                          f"{data.validation_size} both ask for a validation set; set data.validation_size=0 "
                          f"or data.validation_split=null")
    if data.pack_length is not None and data.pack_length < data.max_length:
        raise ConfigError(f"data.pack_length={data.pack_length} is below data.max_length={data.max_length}: "
                          f"packing never splits an example, so a row must hold the longest one; raise it "
                          f"or leave it null (= data.max_length)")
    if data.max_examples is not None and data.max_examples < 1:
        raise ConfigError(f"data.max_examples={data.max_examples} must be >= 1 (or null for all)")
    check_chat_template_kwargs("data.chat_template_kwargs", data.chat_template_kwargs)


def source_entries(data: Any) -> list[Any]:
    """data.sources as a list; plain dicts (DataConfig built in Python) become SourceConfig, unknown keys a ConfigError."""
    entries = []
    for index, entry in enumerate(getattr(data, "sources", None) or []):
        if isinstance(entry, Mapping) and not isinstance(entry, DictConfig):
            unknown = sorted(set(entry) - {item.name for item in fields(SourceConfig)})
            if unknown:
                raise ConfigError(f"data.sources[{index}] has unknown keys {unknown}; the keys are "
                                  f"{', '.join(item.name for item in fields(SourceConfig))}")
            entry = SourceConfig(**entry)
        entries.append(entry)
    return entries


def _validate_source(path: str, entry: Any) -> None:
    """One data.sources entry; errors name it by its index (data.sources[1].format)."""
    if not getattr(entry, "source", None):
        raise ConfigError(f"{path}.source is empty: give a file, directory or hub id, e.g. {{source: chats.jsonl}}")
    if getattr(entry, "format", None) is not None:
        _choice(f"{path}.format", entry.format, DATA_FORMATS)
    weight, examples = getattr(entry, "weight", None), getattr(entry, "examples", None)
    if weight is not None and examples is not None:
        raise ConfigError(f"{path} sets both weight={weight} and examples={examples}; set one: weight shares the "
                          f"drawn examples, examples takes exactly that many")
    if weight is not None and not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise ConfigError(f"{path}.weight={weight!r} must be a number above 0")
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
        raise ConfigError(f"{path}.examples={examples!r} must be a whole number >= 1")


# Arguments of tokenizer.apply_chat_template that otr sets (or that change what it returns): a template
# variable of the same name would replace them or clash with them.
RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "chat_template", "add_generation_prompt", "tokenize",
                            "continue_final_message", "return_dict", "return_tensors", "return_assistant_tokens_mask")


def check_chat_template_kwargs(key: str, value: Any) -> dict[str, Any]:
    """`value` (data. or eval.chat_template_kwargs) as a plain dict of template variables.

    Raises ConfigError naming `key` unless it is a mapping from variable names (strings) to values.
    """
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    example = f"{key}='{{enable_thinking: false}}'"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={value!r} must be a mapping of chat template variables to values, e.g. {example}")
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"{key} has the key {name!r} ({type(name).__name__}); template variable names are "
                              f"strings, e.g. {example}")
        if name in RESERVED_TEMPLATE_KWARGS:
            raise ConfigError(f"{key}.{name} is an argument otr passes to apply_chat_template itself, not a template "
                              f"variable; remove it")
    return dict(value)


def _validate_phases(loss: LossConfig) -> None:
    if loss.phases and loss.sft_warmup_steps > 0:
        raise ConfigError("loss.phases and loss.sft_warmup_steps are two ways to write a schedule: set one, "
                          "e.g. loss.sft_warmup_steps=0, or start loss.phases with {objective: sft, steps: N}")
    for i, phase in enumerate(loss.phases):
        path = f"loss.phases[{i}]"
        last = i == len(loss.phases) - 1
        if phase.steps == -1 and not last:
            raise ConfigError(f"{path}.steps=-1 (until the end) is only allowed in the last phase; "
                              f"give it a number of optimizer steps")
        if phase.steps != -1:
            _positive(f"{path}.steps", phase.steps)
        loss_options(loss, phase, path)


# Phase fields that default to the loss group's value when a phase leaves them unset.
PHASE_INHERITED = ("k", "temperature", "beta", "baseline", "sft_weight")


def loss_options(loss: LossConfig, phase: Optional[PhaseConfig] = None, path: Optional[str] = None) -> LossOptions:
    """The kernel's settings for the whole run (``loss``) or for one phase of its schedule.

    A phase's unset fields inherit from ``loss``; a plain SFT phase gets no CE mix (it would count
    the same term twice). Training sums weighted token losses (``reduction="sum"``): the row
    weights carry loss.reduction. Invalid knobs raise ConfigError with their key path (``path``:
    where the phase is written, e.g. ``loss.phases[1]``).
    """
    values = {key: getattr(loss, key) for key in PHASE_INHERITED}
    objective = loss.objective
    if phase is not None:
        objective = phase.objective
        values.update({key: getattr(phase, key) for key in PHASE_INHERITED if getattr(phase, key) is not None})
        if objective == "sft":
            values["sft_weight"] = 0.0
    try:
        return make_options(objective, reduction="sum", chunk_size=loss.chunk_size,
                            implementation=loss.implementation, allow_tf32=loss.allow_tf32, **values)
    except LossOptionError as err:
        # The key the user wrote: the phase's own value, else the loss group's that it inherited.
        own = phase is not None and err.field in PHASE_INHERITED + ("objective",) and getattr(phase, err.field) is not None
        key = f"{path}.{err.field}" if own else f"loss.{err.field}"
        value = getattr(phase if own else loss, err.field)
        raise ConfigError(f"{key}={value!r}: {err}") from err


def schema_keys(schema: type = TrainConfig, prefix: str = "") -> dict[str, type]:
    """Every dotted key path of the schema, mapped to its dataclass field type."""
    keys: dict[str, type] = {}
    for f in fields(schema):
        path = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        keys[path] = f.type
        if is_dataclass(default):
            keys.update(schema_keys(type(default), prefix=path + "."))
    return keys


# Keys below these are the user's own (DeepSpeed JSON, template variables), not schema fields.
FREE_FORM_PREFIXES = ("deepspeed.extra.", "hydra.", "hydra/", "recipe", "data.chat_template_kwargs.",
                      "eval.chat_template_kwargs.")


def check_override_keys(overrides: list[str], groups: tuple[str, ...], schema: type = None,
                        command: str = "train") -> None:
    """Fail fast, with a suggestion, on a command-line override whose key is not in the schema.

    Hydra alone says only "Key 'lrr' is not in struct", and `+key=value` would even add the key;
    this names the closest real key. schema: the dataclass `otr <command>` composes (default TrainConfig).
    Deletions (`~key`) and Hydra's flags are left to Hydra.
    """
    known = schema_keys(schema or TrainConfig)
    for override in overrides:
        if "=" not in override or override.startswith(("~", "-")):
            continue
        key = override.split("=", 1)[0].strip().lstrip("+")
        # key@package (a group placed elsewhere) is Hydra's business; the group name still has to exist.
        key = key.split("@", 1)[0]
        if key in known or key in groups or key.startswith(FREE_FORM_PREFIXES):
            continue
        candidates = list(known) + list(groups)
        close = difflib.get_close_matches(key, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key '{key}' in override '{override}'.{hint} "
                          f"`otr {command} --cfg job` prints every key.")


LAUNCHERS = ("local", "slurm")
PREEMPT_SIGNALS = ("USR1", "USR2", "TERM")


def validate_launcher(launcher: LauncherConfig) -> None:
    """Launcher checks; also run before a sweep is submitted (otr_cli/sweep/callbacks.py)."""
    _choice("launcher.name", launcher.name, LAUNCHERS)
    _positive("launcher.nodes", launcher.nodes)
    _positive("launcher.tasks_per_node", launcher.tasks_per_node)
    if launcher.gpus_per_node is not None:
        _positive("launcher.gpus_per_node", launcher.gpus_per_node, strict=False)
    _positive("launcher.timeout_min", launcher.timeout_min)
    _positive("launcher.array_parallelism", launcher.array_parallelism)
    _positive("launcher.signal_delay_s", launcher.signal_delay_s, strict=False)
    _positive("launcher.max_requeues", launcher.max_requeues, strict=False)
    _positive("launcher.dist_timeout_min", launcher.dist_timeout_min)
    _positive("launcher.data_timeout_min", launcher.data_timeout_min)
    _choice("launcher.signal", launcher.signal, PREEMPT_SIGNALS)
    if launcher.gpus_per_node and launcher.tasks_per_node != launcher.gpus_per_node:
        raise ConfigError(
            f"launcher.gpus_per_node={launcher.gpus_per_node} but launcher.tasks_per_node={launcher.tasks_per_node}: "
            f"otr trains with one process per GPU, so set launcher.tasks_per_node={launcher.gpus_per_node}")
    if launcher.signal_delay_s >= 60 * launcher.timeout_min:
        raise ConfigError(f"launcher.signal_delay_s={launcher.signal_delay_s} must be shorter than the time limit "
                          f"(launcher.timeout_min={launcher.timeout_min} minutes)")
