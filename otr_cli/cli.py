"""`otr` entry point: pops the subcommand and hands the rest to its room. Wiring only."""

from __future__ import annotations

import os
import sys
from typing import Optional

from otr_cli.app import RecipesNotFoundError, version_line
from otr_cli.errors import fail

USAGE = """usage: otr <command> [hydra overrides ...]

commands:
  train    fine-tune a model from a recipe:  otr train recipe=smollm2_demo loss.beta=-0.2
           ... from a recipe file of yours:   otr train path/to/my_recipe.yaml trainer.max_steps=100
           ... plain SFT on your data:        otr train data.source=my_chats.jsonl model.name_or_path=ID
           multirun sweeps:                   otr train -m recipe=smollm2_demo loss.beta=0,-0.1
           ... as one SLURM job array:        otr train -m recipe=smollm2_demo loss.beta=0,-0.1 launcher=slurm
           print the composed config:         otr train recipe=qwen8b_math dry_run=true
  data     look at the data before training: otr data recipe=smollm2_gsm8k [--examples N] [--ranks N] [--json]
  eval     benchmark a model:                otr eval model=outputs/run/final eval.benchmarks=[gsm8k,humaneval]
           compare two evaluations:          otr eval compare outputs/a outputs/b
  export   a Hugging Face model of a checkpoint: otr export outputs/run/checkpoints/checkpoint-40 --out DIR [--adapter]
  grade    grade completions from anywhere:  otr grade preds.jsonl --grader math|choice|code
  sweep    summarise a sweep's points:       otr sweep summary multirun/smollm2_demo/2025-01-01_12-00-00

{version}. `otr train --help` lists every config group and option; `otr grade`, `otr eval compare`
and `otr sweep summary` take flags (`otr grade --help`);
your own recipe: `otr train my_recipe.yaml`, `otr eval my_eval.yaml` (docs/configuration.md).
"""


def _train(args: list[str]) -> int:
    from otr_cli.train.command import train_entry

    return train_entry(args)


def _data(args: list[str]) -> int:
    from otr_cli.train.data_command import data_entry

    return data_entry(args)


def _export(args: list[str]) -> int:
    from otr_cli.train.export_command import export_entry

    return export_entry(args)


def _grade(args: list[str]) -> int:
    from otr_cli.eval.commands import grade_entry

    return grade_entry(args)


def _eval(args: list[str]) -> int:
    from otr_cli.eval.commands import eval_entry

    return eval_entry(args)


def _sweep(args: list[str]) -> int:
    from otr_cli.sweep.command import sweep_entry

    return sweep_entry(args)


# Each subcommand's entry in its room, taking the arguments after the subcommand's name; imported
# on use, so `otr --version` and `otr grade` do not pay for torch and DeepSpeed.
COMMANDS = {"train": _train, "data": _data, "eval": _eval, "export": _export, "grade": _grade, "sweep": _sweep}


def _take_local_rank_argument(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher puts before the command (it also sets LOCAL_RANK)."""
    kept = []
    for arg in argv:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            kept.append(arg)
    return kept


def main(argv: Optional[list[str]] = None) -> int:
    argv = _take_local_rank_argument(list(sys.argv[1:] if argv is None else argv))
    try:
        return _dispatch(argv)
    except RecipesNotFoundError as err:
        fail(str(err))


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(version=version_line()))
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}; available: {', '.join(COMMANDS)}. See `otr --help`.")
    return COMMANDS[command](overrides)


if __name__ == "__main__":
    sys.exit(main())
