"""What every `otr` subcommand shares: the recipes, the version, logging, and running a Hydra task.

Below every room (train, eval, sweep) and above none of them: the rooms call ``run_hydra`` and
``configure_logging`` from here, and ``otr_cli/cli.py`` only wires subcommands to the rooms.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

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


def run_hydra(task: Callable, config_name: str, command: str, overrides: list[str]) -> int:
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
