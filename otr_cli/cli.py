"""`otr` entry point: pops the subcommand and hands the rest to Hydra. Wiring only."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from otr_cli.errors import UserError, fail

USAGE = """usage: otr <command> [hydra overrides ...]

commands:
  train    fine-tune a model from a recipe:  otr train recipe=smollm2_demo loss.beta=-0.2
           multirun sweeps:                   otr train -m recipe=smollm2_demo loss.beta=0,-0.1
           ... as one SLURM job array:        otr train -m loss.beta=0,-0.1 launcher=slurm launcher.partition=P
           print the composed config:         otr train recipe=qwen8b_math dry_run=true
  eval     benchmark a model:                otr eval model=outputs/run/final eval.benchmarks=[gsm8k,humaneval]
           compare two evaluations:          otr eval compare outputs/a outputs/b
  grade    grade completions from anywhere:  otr grade predictions=preds.jsonl grader=math|choice|code
  sweep    summarise a sweep's points:       otr sweep summary multirun/smollm2_demo/2025-01-01_12-00-00

{version}. `otr train --help` lists every config group and option;
your own recipes: `otr train hydra.searchpath=[file:///path/to/my_recipes] recipe=mine` (docs/configuration.md).
"""

# The name pip knows otr by (pyproject.toml), for its version.
DISTRIBUTION = "otr-cli"


class RecipesNotFoundError(UserError, FileNotFoundError):
    """The recipes tree is missing: an installation made without it (a wheel built before they were packaged)."""


def recipes_dir() -> Path:
    """The recipes tree: packaged inside otr_cli/ (wheel, sdist, `pip install .`), else beside the package.

    A checkout and an editable install have no otr_cli/recipes/ on disk (pyproject.toml maps the
    top-level recipes/ into the package only when building), so they use the checkout's recipes/.
    The packaged copy is looked for first so that no stray site-packages/recipes/ can hijack an install.
    """
    package_dir = Path(__file__).resolve().parent
    candidates = (package_dir / "recipes", package_dir.parent / "recipes")
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RecipesNotFoundError(
        f"otr's recipes were not found (no train.yaml in {' or '.join(map(str, candidates))}): this "
        "installation of otr lacks its recipes. Reinstall it from a current checkout or wheel, e.g. "
        "`pip install --force-reinstall .` in the checkout (a wheel of the same version built before "
        "the recipes were packaged is otherwise kept).")


def otr_version() -> str:
    """The installed distribution's version (a checkout run without installing has none)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed)"


def version_line() -> str:
    """`otr 0.1.0 (recipes: /path/to/recipes)`: which otr runs, and which recipes it composes from."""
    return f"otr {otr_version()} (recipes: {recipes_dir()})"


def configure_logging() -> None:
    from rich.logging import RichHandler

    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = RichHandler(show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if "WORLD_SIZE" in os.environ
                                           and os.environ["WORLD_SIZE"] != "1" else "%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("otr").setLevel(level)
    logging.getLogger("otr_cli").setLevel(level)
    for noisy in ("transformers", "datasets", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Per-file "Loading weights" bars drown the training output; the progress bar is ours.
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def train_task(cfg) -> Optional[dict]:
    """Body of `otr train` (called by Hydra with the composed config)."""
    from omegaconf import OmegaConf

    from otr_cli.config import validate

    try:
        typed = validate(cfg)
        if typed.dry_run:
            print_dry_run(typed, OmegaConf.to_yaml(cfg))
            return None
        return _train(typed)
    except UserError as err:
        if os.environ.get("SUBMITIT_EXECUTOR"):
            raise  # a sweep point on SLURM: Hydra hands the error back to the submitting `otr train -m`
        fail(str(err))


def _train(typed) -> dict:
    """A training run that stops cleanly on preemption signals and takes every rank down on an error."""
    from otr_cli.train import faults, preemption
    from otr_cli.train.distributed import populate_env_from_launcher
    from otr_cli.train.loop import resolve_output_dir, run_training

    populate_env_from_launcher()  # first: under srun the rank comes from SLURM, and log lines name it
    configure_logging()
    run_state = resolve_output_dir(typed) / "run_state.json"
    with preemption.watching():
        try:
            with faults.stop_all_ranks_on_error(run_state, (UserError,)):
                return run_training(typed)
        except preemption.Preempted as stop:
            # Still inside watching(): requeuing makes SLURM send this job a SIGTERM, which must not kill it
            # before it has said what it did.
            status = preemption.after_preemption(stop, int(os.environ["RANK"]), typed.launcher.max_requeues)
    sys.exit(status)


def print_dry_run(typed, resolved_yaml: str) -> None:
    """Config, DeepSpeed JSON and batch arithmetic, without touching weights or data."""
    import torch
    from rich.console import Console
    from rich.syntax import Syntax

    from otr_cli.train.distributed import world_size_from_env
    from otr_cli.train.ds_config import BatchArithmetic, build_deepspeed_config

    console = Console()
    world_size = world_size_from_env()
    on_gpu = torch.cuda.is_available()
    console.print(_sources_line(), highlight=False, soft_wrap=True)
    console.rule("resolved config")
    console.print(Syntax(resolved_yaml, "yaml", theme="ansi_dark"))
    console.rule(f"DeepSpeed config (world size {world_size}, {'GPU' if on_gpu else 'CPU'})")
    console.print_json(json.dumps(build_deepspeed_config(typed, world_size=world_size, on_gpu=on_gpu)))
    console.rule("batch")
    arithmetic = BatchArithmetic(typed.trainer.micro_batch_size, typed.trainer.grad_accum, world_size)
    console.print(arithmetic.describe(), highlight=False)
    steps = (f"{typed.trainer.max_steps} optimizer steps" if typed.trainer.max_steps > 0
             else f"{typed.trainer.epochs} epoch(s); steps are derived from the data size at start-up")
    console.print(f"training length: {steps}", highlight=False)
    console.print("dry run: nothing was loaded or written.", highlight=False)


def _sources_line() -> str:
    """Which otr and which recipe directories composed this config (the user's come after otr's)."""
    from hydra.core.hydra_config import HydraConfig

    line = version_line()
    if HydraConfig.initialized() and HydraConfig.get().searchpath:
        line += f", then hydra.searchpath: {', '.join(HydraConfig.get().searchpath)}"
    return line


def _register_resolvers() -> None:
    """`${otr.version:}` and `${otr.recipes:}`, used by the `--help` headers in recipes/*.yaml."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("otr.version", otr_version, replace=True)
    OmegaConf.register_new_resolver("otr.recipes", lambda: str(recipes_dir()), replace=True)


def _override_value(override: str):
    """The parsed value of one override; None when malformed (Hydra reports it, in its own words)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_override(override).value()
    except OverrideParseException:
        return None


def _searchpath_dirs(overrides: list[str]) -> list[Path]:
    """Local directories of a `hydra.searchpath=[...]` override (pkg:// entries are not files)."""
    entries = []
    for override in overrides:
        if override.split("=", 1)[0] in ("hydra.searchpath", "+hydra.searchpath", "++hydra.searchpath"):
            value = _override_value(override)
            if isinstance(value, list):
                entries += value
    return [Path(str(entry).removeprefix("file://")) for entry in entries
            if "://" not in str(entry) or str(entry).startswith("file://")]


def warn_shadowed_user_configs(overrides: list[str]) -> list[Path]:
    """Warn about user files in hydra.searchpath that Hydra ignores for otr's own file of the same name.

    Hydra reads the primary config directory (otr's recipes) before hydra.searchpath, so a user's
    recipe/smollm2_demo.yaml is silently never used: name it differently (docs/configuration.md).
    """
    from rich.console import Console

    packaged, shadowed = recipes_dir(), []
    for directory in _searchpath_dirs(overrides):
        for user_file in sorted(directory.rglob("*.yaml")) if directory.is_dir() else ():
            name = user_file.relative_to(directory)
            if (packaged / name).is_file():
                shadowed.append(user_file)
                message = (f"{user_file} is not used: otr's own {name} has the same name and comes first in "
                           "Hydra's search path. Give yours another name (docs/configuration.md, 'Your own recipes').")
                if _launched_as_first_rank():  # one warning per job, not one per rank
                    Console(stderr=True).print(f"[bold yellow]warning:[/bold yellow] {message}", highlight=False,
                                               soft_wrap=True)
    return shadowed


def _launched_as_first_rank() -> bool:
    """Whether this process is rank 0 of its launch (torchrun/deepspeed set RANK, srun SLURM_PROCID)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _run_hydra(task: Callable, config_name: str, command: str, overrides: list[str]) -> int:
    import hydra

    from otr_cli.config import GROUP_SCHEMAS, ConfigError, check_override_keys, register_configs

    try:
        check_override_keys(overrides, tuple(GROUP_SCHEMAS) + ("recipe",))
    except ConfigError as err:
        fail(str(err))
    warn_shadowed_user_configs(overrides)
    register_configs()
    _register_resolvers()
    main_fn = hydra.main(config_path=str(recipes_dir()), config_name=config_name, version_base="1.3")(task)
    saved_argv = sys.argv
    sys.argv = [f"otr {command}"] + overrides
    try:
        main_fn()
    finally:
        sys.argv = saved_argv
    return 0


def _grade(args: list[str]) -> int:
    from otr_cli.eval.commands import grade_entry

    return grade_entry(args)


def _eval(args: list[str]) -> int:
    from otr_cli.eval.commands import eval_entry

    return eval_entry(args)


def _sweep(args: list[str]) -> int:
    from otr_cli.sweep.command import sweep_entry

    return sweep_entry(args)


# (Hydra task, primary config name), or a callable taking the raw arguments (commands that parse
# their own arguments, or dispatch to Hydra themselves).
COMMANDS = {"train": (train_task, "train"), "eval": _eval, "grade": _grade, "sweep": _sweep}


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
    if callable(COMMANDS[command]):
        return COMMANDS[command](overrides)
    task, config_name = COMMANDS[command]
    return _run_hydra(task, config_name, command, overrides)


if __name__ == "__main__":
    sys.exit(main())
