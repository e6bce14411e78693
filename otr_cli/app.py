"""What every `otr` subcommand shares: the recipes, the version, logging, and running a Hydra task.

Below every room (train, eval, sweep) and above none of them: the rooms call ``run_hydra`` and
``configure_logging`` from here, and ``otr_cli/cli.py`` only wires subcommands to the rooms.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from otr_cli.errors import UserError, fail

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
    import importlib.util

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # datasets is only needed for hub-id sources (data/sources.py); a machine without it (the GPU
    # check's, docs/benchmarks/gpu.md) still trains on local or synthetic data.
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.disable_progress_bars()


def sources_line() -> str:
    """Which otr and which recipe directories composed this config (the user's come after otr's)."""
    from hydra.core.hydra_config import HydraConfig

    line = version_line()
    if HydraConfig.initialized() and HydraConfig.get().searchpath:
        line += f", then hydra.searchpath: {', '.join(HydraConfig.get().searchpath)}"
    return line


def default_run_name(model: str, source: str, objective: str, sources: Any = None) -> str:
    """`<model>_<data>_<objective>`, e.g. smollm2-135m-instruct_my_chats_sft: run.name of a run without a recipe.

    Each part is the last path component without its file extension, so a hub id, a directory and a
    file all give a short name that is safe as a directory name. A mixture (data.sources, not empty) is
    named `mixture`: data.source is not read then.
    """
    def stem(text: str) -> str:
        last = str(text).rstrip("/").rsplit("/", 1)[-1]
        last = re.sub(r"\.(jsonl|json|parquet|csv|tsv|gguf|ya?ml)$", "", last)
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", last).strip("_.") or "none"

    data = "mixture" if sources else stem(source)
    return f"{stem(model)}_{data}_{stem(objective)}"


def register_resolvers() -> None:
    """`${otr.version:}` and `${otr.recipes:}` (the `--help` headers), `${otr.run_name:...}` (train.yaml's run.name)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("otr.version", otr_version, replace=True)
    OmegaConf.register_new_resolver("otr.recipes", lambda: str(recipes_dir()), replace=True)
    OmegaConf.register_new_resolver("otr.run_name", default_run_name, replace=True)


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
                           "Hydra's search path. Give yours another name (docs/configuration.md, 'A directory of recipes').")
                if _launched_as_first_rank():  # one warning per job, not one per rank
                    Console(stderr=True).print(f"[bold yellow]warning:[/bold yellow] {message}", highlight=False,
                                               soft_wrap=True)
    return shadowed


def _launched_as_first_rank() -> bool:
    """Whether this process is rank 0 of its launch (torchrun/deepspeed set RANK, srun SLURM_PROCID)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


# Hydra's flags that take the next argument as their value (`--cfg job`): that value is no recipe file.
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun")
RECIPE_FILE_SUFFIXES = (".yaml", ".yml")
# The recipe group's option a recipe file is stored as: `file:<stem>` cannot clash with a packaged recipe.
RECIPE_FILE_PREFIX = "file:"


class RecipeFileError(UserError):
    """A recipe file given on the command line that is missing, unreadable or not a mapping."""


def take_recipe_file(args: list[str], command: str) -> list[str]:
    """`[path/to/my_recipe.yaml, overrides...]` -> the overrides and `recipe=file:my_recipe`.

    The file (anywhere on disk) becomes an option of the `recipe` group, stored in Hydra's ConfigStore,
    so it composes over the packaged groups exactly like recipes/recipe/*.yaml: its keys are top-level
    (as after `# @package _global_`), and its own `defaults:` list may start from a packaged recipe
    (`- smollm2_demo`) or change a group (`- override /loss: otr`). ConfigStore travels with a sweep's
    jobs (Hydra hands its state to each SLURM job), so `-m` works too. Any command that composes
    through run_hydra or compose_config gets this. Raises RecipeFileError for a missing file, a file that
    is not YAML or not a mapping, two files, or a file together with `recipe=`.
    """
    files, kept, after_flag = [], [], False
    for arg in args:
        if not after_flag and "=" not in arg and not arg.startswith("-") and arg.endswith(RECIPE_FILE_SUFFIXES):
            files.append(arg)
        else:
            kept.append(arg)
        after_flag = arg in _FLAGS_WITH_VALUE
    if not files:
        return list(args)
    if len(files) > 1:
        raise RecipeFileError(f"otr {command} takes one recipe file, got {len(files)}: {', '.join(files)}; start one "
                              f"from the other through its defaults list (docs/configuration.md)")
    chosen = [arg for arg in kept if arg.split("=", 1)[0].lstrip("+") == "recipe"]
    if chosen:
        raise RecipeFileError(f"{files[0]} and {chosen[0]} both choose the recipe: give one, or start the file from "
                              f"the packaged recipe with `defaults: [{chosen[0].split('=', 1)[1]}, _self_]`")
    name = _store_recipe_file(Path(files[0]), command)
    return kept + [f"recipe={name}"]


def _store_recipe_file(path: Path, command: str) -> str:
    """Read the recipe file at `path` and register it as a `recipe` option; returns the option's name."""
    import yaml
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    if not path.is_file():
        raise RecipeFileError(f"recipe file {path} not found{' (it is a directory)' if path.is_dir() else ''}: give "
                              f"the path of a .yaml file, e.g. `otr {command} path/to/my_recipe.yaml`")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeFileError(f"{where}: not valid YAML ({problem}); a recipe file is a mapping of keys, "
                              f"e.g. `trainer: {{max_steps: 100}}`") from err
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeFileError(f"recipe file {path} cannot be read: {err}") from err
    if not isinstance(node, DictConfig) or not node:
        kind = "empty" if isinstance(node, DictConfig) else f"a {type(node).__name__.replace('Config', '').lower()}"
        raise RecipeFileError(f"{path}: a recipe file holds a mapping of config keys (e.g. `trainer: {{max_steps: 100}}`), "
                              f"but this one is {kind}")
    name = RECIPE_FILE_PREFIX + (re.sub(r"[^A-Za-z0-9_]+", "_", path.stem) or "recipe")
    ConfigStore.instance().store(group="recipe", name=name, node=node, package="_global_")
    return name


class _Task:
    """The command's task, remembering whether an error came out of it.

    An error raised by it is the run's own (a user error it reports itself, or a bug: a
    traceback); one raised outside it comes from composing the config: a mistake the user can fix.
    A class, not a closure: a SLURM sweep pickles the task.
    """

    def __init__(self, task: Callable):
        functools.update_wrapper(self, task)
        self.task = task
        self.raised = False

    def __call__(self, cfg):
        try:
            return self.task(cfg)
        except BaseException:
            self.raised = True
            raise


def _prepare(command: str, overrides: list[str], schema: type) -> list[str]:
    """What every composition does first: the recipe file, the key check, the schemas and resolvers."""
    from otr_cli.config import GROUP_SCHEMAS, check_override_keys, register_configs

    overrides = take_recipe_file(overrides, command)
    check_override_keys(overrides, tuple(GROUP_SCHEMAS) + ("recipe",), schema, command)
    warn_shadowed_user_configs(overrides)
    register_configs()
    register_resolvers()
    return overrides


def _composition_error(err: BaseException, schema: type, config_name: str):
    """The ConfigError to report for a Hydra or OmegaConf error, or None for any other exception."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from otr_cli.composition_errors import describe
    from otr_cli.config import ConfigError, schema_keys

    if isinstance(err, (HydraException, OmegaConfBaseException)):
        return ConfigError(describe(err, schema_keys(schema), config_name))
    return None


def compose_config(config_name: str, command: str, overrides: list[str], schema: type):
    """The config `otr <command> <overrides>` composes (a recipe file first among them), without running it.

    The same steps as run_hydra, through Hydra's compose API; every mistake is a UserError with a
    one-line message. Returns the DictConfig.
    """
    from hydra import compose, initialize_config_dir

    overrides = _prepare(command, overrides, schema)
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
            return compose(config_name, overrides)
    except Exception as err:
        error = _composition_error(err, schema, config_name)
        if error is None:
            raise
        raise error from err


def run_hydra(task: Callable, config_name: str, command: str, overrides: list[str], schema: type = None) -> int:
    """Compose the config of `otr <command> <overrides>` with Hydra and call `task` with it (once per sweep point).

    overrides may start with a recipe file (take_recipe_file); schema is the dataclass of the composed
    config, for the key check and the messages (default: TrainConfig). A mistake in composing is one
    red line and exit 2; an error inside `task` that is not a UserError is a traceback and exit 1.
    """
    import hydra

    from otr_cli.config import TrainConfig

    schema = schema or TrainConfig
    try:
        overrides = _prepare(command, overrides, schema)
    except UserError as err:
        fail(str(err))
    guarded = _Task(task)
    main_fn = hydra.main(config_path=str(recipes_dir()), config_name=config_name, version_base="1.3")(guarded)
    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"otr {command}"] + overrides
    # Hydra prints its errors in its own words and exits 1; with HYDRA_FULL_ERROR it hands them to us.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main_fn()
    except Exception as err:
        # Outside the task (composing, a sweep's callbacks): a UserError or Hydra's word for a mistake.
        error = None if guarded.raised else (err if isinstance(err, UserError)
                                              else _composition_error(err, schema, config_name))
        if error is None:
            traceback.print_exc()
            sys.exit(1)
        fail(str(error))
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
    return 0
