"""`otr eval`: the Hydra task (config schema + body) and the `model=PATH` convenience."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from otr_cli.config import DataConfig, EvalConfig, ModelConfig, RunConfig

CONFIG_NAME = "eval_main"


@dataclass
class EvalRunConfig:
    """What `otr eval` composes: the same model, data and eval groups as a training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="eval"))
    seed: int = 42


def register_eval_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="eval_schema", node=EvalRunConfig)


def rewrite_model_override(overrides: list[str], recipes: Path) -> list[str]:
    """`model=outputs/run/final` (not a recipes/model/*.yaml option) -> `model.name_or_path=...`.

    Hydra reads `model=X` as "pick config group option X"; users mean "evaluate this model".
    """
    rewritten = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if key == "model" and sep and not (recipes / "model" / f"{value}.yaml").is_file():
            override = f"model.name_or_path={value}"
        rewritten.append(override)
    return rewritten


def output_dir(cfg: EvalRunConfig) -> Path:
    """run.output_dir, else outputs/eval/<model name>; results go to its eval/ subdirectory."""
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model.name_or_path.strip("/")).strip("_") or "model"
    return Path("outputs") / "eval" / name


def check_eval_run(cfg) -> EvalRunConfig:
    """Every start-up check of a composed `otr eval` config; returns it typed. Raises ConfigError naming the key."""
    from otr_cli.config import ConfigError, typed_config, validate_data
    from otr_cli.eval.runner import check_eval_config

    typed: EvalRunConfig = typed_config(cfg, EvalRunConfig)
    if not typed.eval.benchmarks:
        raise ConfigError("eval.benchmarks is empty; e.g. eval.benchmarks=[gsm8k,svamp] or eval=math")
    check_eval_config(typed.eval)
    if typed.eval.backend == "vllm":
        from otr_cli.eval.generation import check_vllm_placement, ranks_per_node

        check_vllm_placement(typed.eval.vllm.tensor_parallel_size, ranks_per_node())
    # The data keys mean what they mean in training (the prompts are rendered as the training text was).
    validate_data(typed.data)
    return typed


def eval_task(cfg) -> Optional[dict]:
    """Body of `otr eval` (called by Hydra with the composed config)."""
    from otr_cli.app import configure_logging
    from otr_cli.errors import UserError, fail
    from otr_cli.eval.runner import evaluate_model
    from otr_cli.eval.sharding import shard_from_environment
    from otr_cli.process_groups import end_process_groups

    try:
        typed = check_eval_run(cfg)
        configure_logging()
        out = output_dir(typed) / "eval"
        shard = shard_from_environment()
        scores = evaluate_model(typed.model.name_or_path, typed.eval, typed.data, out, model_cfg=typed.model,
                                print_table=shard.is_main, shard=shard)
        end_process_groups()
        return scores
    except UserError as err:
        fail(str(err))
    return None
