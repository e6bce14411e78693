"""`otr train path/to/my_recipe.yaml` and `otr eval path/to/my_eval.yaml`: a recipe file from anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import read_jsonl, run_cli, tiny_overrides
from otr_cli.app import compose_config
from otr_cli.cli import main
from otr_cli.config import TrainConfig, validate
from otr_cli.errors import UserError
from otr_cli.eval.app import EvalRunConfig, register_eval_schema

DEMO_LONG = """\
# Starts from the packaged demo and changes only what differs.
defaults:
  - smollm2_demo
  - _self_
run:
  name: demo_long
trainer:
  max_steps: 80
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_recipe_file_starts_from_a_packaged_recipe_and_the_command_line_overrides_it(tmp_path):
    recipe = _write(tmp_path, "demo_long.yaml", DEMO_LONG)
    typed = validate(compose_config("train", "train", [str(recipe), "loss.beta=-0.2"], TrainConfig))
    assert typed.run.name == "demo_long" and typed.trainer.max_steps == 80  # the file's own keys
    assert typed.loss.objective == "otr" and typed.loss.sft_warmup_steps == 20 and typed.eval.limit == 30  # the demo's
    assert typed.loss.beta == -0.2  # the command line's


def test_recipe_file_changes_groups_and_keys_without_a_packaged_recipe(tmp_path):
    recipe = _write(tmp_path, "chats.yaml", "defaults:\n  - override /loss: dft\n  - override /deepspeed: zero2\n"
                                            "data:\n  source: my_chats.jsonl\n  format: messages\n"
                                            "optim:\n  lr: 1.0e-5\n")
    typed = validate(compose_config("train", "train", [str(recipe)], TrainConfig))
    assert typed.loss.objective == "dft" and typed.deepspeed.zero_stage == 2
    assert typed.data.source == "my_chats.jsonl" and typed.optim.lr == 1e-5
    assert typed.run.name == "smollm2-135m-instruct_my_chats_dft"


def test_recipe_file_named_like_a_packaged_recipe_is_still_the_users(tmp_path):
    recipe = _write(tmp_path, "smollm2_demo.yaml", "defaults:\n  - smollm2_demo\n  - _self_\ntrainer:\n  max_steps: 7\n")
    assert validate(compose_config("train", "train", [str(recipe)], TrainConfig)).trainer.max_steps == 7


def test_train_recipe_file_dry_run_and_help(tmp_path, capsys):
    recipe = _write(tmp_path, "demo_long.yaml", DEMO_LONG)
    main(["train", str(recipe), "dry_run=true"])
    out = capsys.readouterr().out
    assert "name: demo_long" in out and "max_steps: 80" in out and "objective: otr" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(recipe), "--help"])
    assert exit_info.value.code == 0
    assert "otr train: fine-tune a model from a recipe" in capsys.readouterr().out


def test_train_recipe_file_in_a_multirun_sweep(tmp_path, capsys):
    recipe = _write(tmp_path, "demo_long.yaml", DEMO_LONG)
    main(["train", "-m", str(recipe), "loss.beta=0,-0.1", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    out = capsys.readouterr().out
    assert out.count("dry run: nothing was loaded or written") == 2
    assert "beta: -0.1" in out and "name: demo_long" in out


def test_eval_recipe_file(tmp_path, capsys):
    recipe = _write(tmp_path, "my_eval.yaml", "defaults:\n  - override /eval: synthetic_arith\n"
                                              "model:\n  name_or_path: outputs/mine/final\neval:\n  limit: 5\n")
    register_eval_schema()
    cfg = compose_config("eval_main", "eval", [str(recipe), "eval.batch_size=2"], EvalRunConfig)
    assert cfg.model.name_or_path == "outputs/mine/final" and cfg.eval.limit == 5 and cfg.eval.batch_size == 2
    assert list(cfg.eval.benchmarks) == ["synthetic_arith", "synthetic_arith_ood"]
    main(["eval", str(recipe), "--cfg", "job"])
    assert "name_or_path: outputs/mine/final" in capsys.readouterr().out


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "holds a mapping of config keys"),
    ("", "this one is empty"),
    ("trainer:\n  max_steps: [1\n", "not valid YAML"),
])
def test_recipe_file_that_is_not_a_mapping_is_one_line(tmp_path, capsys, text, message):
    recipe = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(recipe), "dry_run=true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(recipe) in err and message in err


def test_missing_recipe_file_is_one_line_for_train_and_eval(tmp_path, capsys):
    for command in ("train", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, str(tmp_path / "nope.yaml")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"recipe file {tmp_path / 'nope.yaml'} not found" in err


def test_recipe_file_and_recipe_override_together_are_refused(tmp_path):
    recipe = _write(tmp_path, "demo_long.yaml", DEMO_LONG)
    with pytest.raises(UserError, match="both choose the recipe"):
        compose_config("train", "train", [str(recipe), "recipe=smollm2_gsm8k"], TrainConfig)


def test_recipe_file_with_a_typo_in_its_keys_names_the_key(tmp_path):
    recipe = _write(tmp_path, "typo.yaml", "defaults:\n  - smollm2_demo\n  - _self_\ntrainer:\n  max_stepz: 5\n")
    with pytest.raises(UserError, match=r"trainer.max_stepz.*Did you mean: trainer.max_steps"):
        compose_config("train", "train", [str(recipe)], TrainConfig)


@pytest.mark.slow
def test_otr_train_takes_a_recipe_file_from_another_directory(tmp_path):
    recipe = _write(tmp_path, "demo_long.yaml", DEMO_LONG)
    result = run_cli(["train", "demo_long.yaml", "trainer.max_steps=9", "dry_run=true"], cwd=tmp_path)
    assert "name: demo_long" in result.stdout and "max_steps: 9" in result.stdout
    assert recipe.is_file()


def _documented_file(name: str) -> str:
    """The YAML block of docs/configuration.md that starts with `# <name>`."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    for block in doc.split("```yaml\n")[1:]:
        text = block.split("```", 1)[0]
        if text.startswith(f"# {name}"):
            return text
    raise AssertionError(f"no `# {name}` block in docs/configuration.md")


def test_documented_recipe_files_compose_as_the_docs_say(tmp_path):
    mine = validate(compose_config("train", "train", [str(_write(tmp_path, "my_recipe.yaml",
                                                                 _documented_file("my_recipe.yaml")))], TrainConfig))
    assert mine.loss.objective == "otr" and mine.loss.sft_warmup_steps == 50 and mine.loss.beta == -0.1
    assert mine.model.name_or_path == "HuggingFaceTB/SmolLM2-360M-Instruct" and mine.data.source == "my_chats.jsonl"
    assert mine.trainer.epochs == 2 and mine.trainer.max_steps == -1 and mine.run.name == "my_chats_otr"
    long = validate(compose_config("train", "train", [str(_write(tmp_path, "demo_long.yaml",
                                                                 _documented_file("demo_long.yaml")))], TrainConfig))
    assert long.run.name == "demo_long" and long.trainer.max_steps == 80 and long.loss.objective == "otr"
    register_eval_schema()
    evaluation = compose_config("eval_main", "eval", [str(_write(tmp_path, "my_eval.yaml",
                                                                 _documented_file("my_eval.yaml")))], EvalRunConfig)
    assert evaluation.model.name_or_path == "outputs/my_chats_otr/final" and evaluation.eval.limit == 50


def test_run_without_a_recipe_is_named_after_model_data_and_objective():
    cfg = compose_config("train", "train", ["data.source=my_chats.jsonl",
                                            "model.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct"], TrainConfig)
    assert validate(cfg).run.name == "SmolLM2-360M-Instruct_my_chats_sft"


@pytest.mark.slow
def test_otr_train_trains_from_a_recipe_file(tiny_model_dir, tmp_path):
    recipe = _write(tmp_path, "tiny.yaml", "defaults:\n  - override /loss: dft\n  - _self_\n"
                                           "data:\n  source: synthetic_arith\ntrainer:\n  max_steps: 2\n")
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tiny_model_dir, out) if not o.startswith(("recipe=", "trainer.max_steps="))]
    run_cli(["train", str(recipe), *overrides])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert (out / "final" / "config.json").is_file()
