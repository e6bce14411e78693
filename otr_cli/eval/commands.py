"""Entry points of `otr grade`, `otr eval` and `otr eval compare` (wired in otr_cli/cli.py)."""

from __future__ import annotations


def grade_entry(args: list[str]) -> int:
    """`otr grade FILE --grader NAME ...`: user errors become one clear message and exit code 2."""
    from otr_cli.errors import UserError, fail
    from otr_cli.eval.predictions import grade_command

    try:
        return grade_command(args)
    except UserError as err:
        fail(str(err))


def eval_entry(args: list[str]) -> int:
    """`otr eval [overrides]` runs Hydra; `otr eval compare DIR_A DIR_B ...` compares finished evals."""
    from otr_cli.app import recipes_dir, run_hydra
    from otr_cli.errors import fail
    from otr_cli.eval.app import CONFIG_NAME, EvalRunConfig, eval_task, register_eval_schema, rewrite_model_override

    if args and args[0] == "compare":
        from otr_cli.errors import UserError
        from otr_cli.eval.compare import compare_command

        try:
            return compare_command(args[1:])
        except UserError as err:
            fail(str(err))
    register_eval_schema()
    return run_hydra(eval_task, CONFIG_NAME, "eval", rewrite_model_override(args, recipes_dir()), EvalRunConfig)
