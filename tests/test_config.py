"""Config composition, the typed schema and start-up validation (no weights are loaded)."""

from __future__ import annotations

import re

import pytest

from otr_cli.cli import main
from otr_cli.config import ConfigError, TrainConfig, check_override_keys, schema_keys, validate
from otr_cli.train.ds_config import build_deepspeed_config


def dry_run(capsys, *overrides: str) -> str:
    """The dry run's output; the demo recipe unless the overrides choose one."""
    recipe = [] if any(o.startswith("recipe=") for o in overrides) else ["recipe=smollm2_demo"]
    main(["train", "dry_run=true", *recipe, *overrides])
    return capsys.readouterr().out


def test_dry_run_prints_config_deepspeed_json_and_batch_arithmetic(capsys):
    out = dry_run(capsys, "trainer.micro_batch_size=3", "trainer.grad_accum=5")
    assert "resolved config" in out and "DeepSpeed config" in out
    assert "micro batch 3 x grad accumulation 5 x world size 1 = 15 sequences" in out.replace("\n", " ")
    assert '"train_batch_size": 15' in out


def test_demo_recipe_is_smollm2_with_otr(capsys):
    out = dry_run(capsys)
    assert "name_or_path: smollm2-135m-instruct" in out
    assert "objective: otr" in out and "name: smollm2_demo" in out


def test_train_without_a_recipe_is_plain_sft_over_epochs_named_after_model_data_and_objective():
    from otr_cli.app import compose_config

    cfg = compose_config("train", "train", ["data.source=my_chats.jsonl", "data.format=messages", "trainer.epochs=3"],
                         TrainConfig)
    typed = validate(cfg)
    assert typed.loss.objective == "sft" and typed.loss.sft_warmup_steps == 0
    assert typed.trainer.max_steps == -1 and typed.trainer.epochs == 3
    assert typed.optim.lr == 2e-5 and typed.optim.scheduler == "cosine" and typed.optim.warmup_ratio == 0.03
    assert typed.data.max_length == 512 and typed.eval.benchmarks == [] and not typed.eval.before_training
    assert typed.run.name == "smollm2-135m-instruct_my_chats_sft"


def test_train_without_a_recipe_or_data_is_one_line_naming_what_to_give(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "dry_run=true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.source is empty" in err and "recipe=smollm2_demo" in err and "data.source=" in err


def test_command_line_group_choice_beats_the_recipe(capsys):
    out = dry_run(capsys, "loss=sft", "optim.lr=3e-6")
    assert "objective: sft" in out and "lr: 3.0e-06" in out


def test_qwen8b_math_recipe_passes_dry_run_with_zero3_bf16(capsys):
    out = dry_run(capsys, "recipe=qwen8b_math")
    assert "Qwen/Qwen3-8B" in out
    assert '"stage": 3' in out and '"stage3_gather_16bit_weights_on_model_save": true' in out
    assert "k: 256" in out and "temperature: 1.3" in out and "beta: -0.1" in out
    assert "precision: bf16" in out


def test_unknown_key_is_named_with_the_closest_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "optim.lrr=1e-5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err


def test_unknown_recipe_lists_the_available_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "recipe=nope", "dry_run=true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "recipe=nope" in err and "smollm2_demo" in err and "qwen8b_math" in err


def test_wrong_type_names_the_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "trainer.max_steps=abc", "dry_run=true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "trainer.max_steps" in err


def test_out_of_range_value_names_the_key_and_allowed_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "loss.objective=ppo", "dry_run=true"])
    assert exit_info.value.code == 2
    assert "loss.objective='ppo': objective must be one of sft, dft, otr, otr_exact" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("loss.beta=1.5", "loss.beta"),
    ("loss.temperature=0", "loss.temperature"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("data.truncation=cut", "data.truncation"),
    ("loss.unreachable_threshold=1.5", "loss.unreachable_threshold"),
    # The data group's checks run at start-up, with the same limits build_datasets applies.
    ("data.max_length=1", "data.max_length=1 must be at least 2"),
    ("data.validation_size=2.5", "data.validation_size=2.5 must be a fraction below 1 or a whole count"),
    ("data.max_examples=0", "data.max_examples"),
    ("loss.chunk_size=0", "loss.chunk_size"),
])
def test_validate_rejects_bad_values(override, message):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_offload_param_requires_zero3():
    cfg = TrainConfig()
    cfg.deepspeed.offload_param = True
    with pytest.raises(ConfigError, match="zero_stage=3"):
        validate(cfg)


def test_every_issue_key_exists_in_the_schema():
    keys = schema_keys()
    for key in ["trainer.max_steps", "trainer.epochs", "trainer.micro_batch_size", "trainer.grad_accum",
                "trainer.save_steps", "trainer.save_total_limit", "trainer.resume", "data.max_length", "optim.lr",
                "loss.k", "loss.temperature", "loss.beta", "loss.reduction", "seed", "run.output_dir",
                "eval.benchmarks", "dry_run"]:
        assert key in keys


def test_override_check_accepts_groups_and_sweeps():
    check_override_keys(["loss=otr", "recipe=smollm2_demo", "loss.beta=-0.1,-0.3", "hydra.verbose=true",
                         "+data.chat_template_kwargs.enable_thinking=false", "~eval.limit"], ("loss", "recipe"))


def test_override_check_refuses_a_key_added_with_plus_that_the_schema_lacks():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step' .*Did you mean: trainer.max_steps"):
        check_override_keys(["+trainer.max_step=3"], ("trainer",))


def test_deepspeed_config_for_cpu_uses_torch_adamw_and_offload_uses_cpu_adam():
    cfg = TrainConfig()
    cfg.deepspeed.optimizer = "deepspeed"  # the default, torch, declares no optimizer (tests/test_placement.py)
    assert build_deepspeed_config(cfg, 1, on_gpu=False, precision="fp32")["optimizer"]["params"]["torch_adam"] is True
    cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer = 2, True
    ds = build_deepspeed_config(cfg, 2, on_gpu=False, precision="fp32")
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["train_batch_size"] == cfg.trainer.micro_batch_size * cfg.trainer.grad_accum * 2


@pytest.mark.parametrize("overrides, message", [
    (["trainer.metric_for_best=val_ce", "trainer.save_steps=3", "trainer.eval_steps=2"],
     "trainer.save_steps=3 must be a multiple of trainer.eval_steps=2 with trainer.metric_for_best=val_ce"),
    (["trainer.metric_for_best=val_ce", "trainer.save_steps=2"], "measured every trainer.eval_steps steps, which is 0"),
    (["trainer.metric_for_best=eval/gsm8k", "trainer.save_steps=2"],
     "trainer.metric_for_best='eval/gsm8k' must be val_ce or eval/<benchmark> with the benchmark in eval.benchmarks"),
    (["eval.benchmarks=[gsm8k]", "trainer.metric_for_best=eval/gsm8k", "trainer.save_steps=4", "eval.every_steps=3"],
     "trainer.save_steps=4 must be a multiple of eval.every_steps=3"),
    (["trainer.final_model=best"], "trainer.final_model=best needs trainer.metric_for_best"),
    (["trainer.early_stopping_patience=2"], "trainer.early_stopping_patience=2 needs trainer.metric_for_best"),
    (["trainer.final_model=newest"], "trainer.final_model='newest' is not one of last, best"),
    (["trainer.metric_for_best=val_ce", "trainer.save_steps=2", "trainer.eval_steps=2", "trainer.final_model=best",
      "trainer.export_every_save=false"], "trainer.final_model=best needs trainer.export_every_save=true"),
])
def test_metric_for_best_settings_are_checked_naming_the_keys(overrides, message):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(["data.source=x.jsonl", *overrides]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_save_steps_a_multiple_of_the_metrics_interval_is_accepted():
    from omegaconf import OmegaConf

    validate(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist([
        "data.source=x.jsonl", "trainer.metric_for_best=val_ce", "trainer.eval_steps=2", "trainer.save_steps=4",
        "trainer.final_model=best", "trainer.early_stopping_patience=3"])))
