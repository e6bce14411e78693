"""otr as an installed package: the wheel and sdist carry the recipes, and an install finds them anywhere.

The builds run offline (`--no-build-isolation`, the test environment's setuptools) in a copy of the
checkout, so nothing is written into the checkout itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, subprocess_env
from otr_cli import app, cli

# Build outputs, caches and virtual environments are no part of what `pip install .` sees in a clone.
COPY_IGNORED = {".git", "outputs", "multirun", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".cache"}


def _ignore_for_copy(directory: str, names: list[str]) -> set[str]:
    return {name for name in names
            if name in COPY_IGNORED or name.endswith(".egg-info")
            or (Path(directory, name) / "pyvenv.cfg").is_file()}


def _copy_checkout(destination: Path) -> Path:
    shutil.copytree(REPO, destination, ignore=_ignore_for_copy)
    return destination


def _build(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, env=subprocess_env(), check=False, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def _pip_wheel(source: Path, out_dir: Path) -> Path:
    """`pip wheel --no-deps .` as a user would build it, offline."""
    _build([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
            "-w", str(out_dir), "."], cwd=source)
    (wheel,) = out_dir.glob("otr_cli-*.whl")
    return wheel


def _files_under(root: Path, suffix: str = "") -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob(f"*{suffix}")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel-build")
    return _pip_wheel(_copy_checkout(work / "src"), work / "dist")


def test_the_wheel_carries_every_module_and_every_recipe_inside_the_package(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    recipes = {f"otr_cli/recipes/{name}" for name in _files_under(REPO / "recipes")}
    modules = {f"otr_cli/{name}" for name in _files_under(REPO / "otr_cli", ".py")}
    assert len(recipes) >= 30 and recipes <= names, sorted(recipes - names)
    assert modules <= names, sorted(modules - names)
    # Nothing else but the metadata: no top-level recipes/ or tests/ in site-packages.
    assert {name.split("/")[0] for name in names - recipes - modules} == {built_wheel.name.split("-py")[0]
                                                                          + ".dist-info"}


def test_the_sdist_carries_the_recipes_and_builds_a_complete_wheel(tmp_path):
    source = _copy_checkout(tmp_path / "src")
    _build([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_sdist('dist')"], cwd=source)
    (sdist,) = (source / "dist").glob("otr_cli-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {f"recipes/{name}" for name in _files_under(REPO / "recipes")} <= names
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    wheel = _pip_wheel(unpacked, tmp_path / "dist")
    assert "otr_cli/recipes/recipe/smollm2_demo.yaml" in zipfile.ZipFile(wheel).namelist()


def test_a_checkout_uses_its_own_recipes_and_says_which_otr_it_is(capsys):
    assert app.recipes_dir() == REPO / "recipes"
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"otr {app.otr_version()} (recipes: {REPO / 'recipes'})"


def test_missing_recipes_are_a_clear_error_saying_what_to_do(monkeypatch, tmp_path, capsys):
    (tmp_path / "otr_cli").mkdir()
    monkeypatch.setattr(app, "__file__", str(tmp_path / "otr_cli" / "app.py"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "dry_run=true"])
    message = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 2
    assert f"no train.yaml in {tmp_path / 'otr_cli' / 'recipes'} or {tmp_path / 'recipes'}" in message
    assert "pip install --force-reinstall ." in message


def test_train_help_and_dry_run_name_the_version_and_the_recipes(capsys):
    with pytest.raises(SystemExit) as exit_info:  # Hydra exits after printing its help
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert f"otr train: fine-tune a model from a recipe (otr {app.otr_version()})" in help_text
    assert f"Recipes: {REPO / 'recipes'}" in help_text
    cli.main(["train", "recipe=smollm2_demo", "dry_run=true"])
    assert capsys.readouterr().out.startswith(app.version_line())


def _user_recipes(root: Path) -> Path:
    """A user's recipe directory: one recipe building on a packaged one, one that tries to replace it."""
    (root / "recipe").mkdir(parents=True)
    (root / "recipe" / "demo_long.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /recipe/smollm2_demo@_global_\n  - _self_\n"
        "run:\n  name: demo_long\ntrainer:\n  max_steps: 80\n")
    (root / "recipe" / "smollm2_demo.yaml").write_text("# @package _global_\nrun:\n  name: never_used\n")
    return root


def test_a_user_recipe_in_the_searchpath_extends_a_packaged_one_and_a_same_named_one_is_flagged(tmp_path, capsys):
    user = _user_recipes(tmp_path / "my_recipes")
    cli.main(["train", f"hydra.searchpath=[file://{user}]", "recipe=demo_long", "dry_run=true"])
    captured = capsys.readouterr()
    assert "name: demo_long" in captured.out and "max_steps: 80" in captured.out
    assert "sft_warmup_steps: 20" in captured.out  # from the packaged smollm2_demo
    assert f"then hydra.searchpath: file://{user}" in captured.out
    warning = " ".join(captured.err.split())
    assert f"{user / 'recipe' / 'smollm2_demo.yaml'} is not used" in warning
    cli.main(["train", f"hydra.searchpath=[file://{user}]", "recipe=smollm2_demo", "dry_run=true"])
    assert "name: smollm2_demo" in capsys.readouterr().out  # Hydra reads otr's recipes first


def _venv_with_the_wheel(wheel: Path, root: Path) -> Path:
    """A separate virtual environment holding the wheel; its dependencies come from the test environment.

    The wheel goes in first, while that environment cannot see ours: pip then has no other otr-cli
    (this checkout's editable install) in view. A .pth file adds our site-packages after its own, so
    nothing is downloaded; the checkout is never on its path.
    """
    _build([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    _build([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
           cwd=root.parent)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "otr-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _run_installed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    result = subprocess.run(args, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.parametrize("rank_variable", ["RANK", "SLURM_PROCID"])
def test_a_same_named_user_recipe_is_flagged_once_per_job_not_once_per_rank(tmp_path, monkeypatch, capsys,
                                                                         rank_variable):
    user = _user_recipes(tmp_path / "my_recipes")
    overrides = [f"hydra.searchpath=[file://{user}]"]
    monkeypatch.delenv("RANK", raising=False)  # an in-process run earlier in this session may have set it
    monkeypatch.setenv(rank_variable, "1")
    assert app.warn_shadowed_user_configs(overrides) == [user / "recipe" / "smollm2_demo.yaml"]
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv(rank_variable, "0")
    app.warn_shadowed_user_configs(overrides)
    assert capsys.readouterr().err.count("warning") == 1


@pytest.mark.slow
def test_an_installed_wheel_runs_from_any_directory_with_its_packaged_recipes(built_wheel, tmp_path):
    venv, elsewhere = _venv_with_the_wheel(built_wheel, tmp_path / "venv"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    otr = [str(venv / "bin" / "otr")]  # the console script pip generated, as users run it
    # The wheel's copy is what runs, not the checkout (nor the test environment's editable install).
    where = _run_installed([venv / "bin" / "python", "-c", "import otr_cli.app as c; print(c.recipes_dir())"],
                           elsewhere)
    packaged = Path(where.stdout.strip())
    assert packaged.parts[-2:] == ("otr_cli", "recipes") and packaged.is_relative_to(venv), packaged

    assert _run_installed(otr + ["--version"], elsewhere).stdout.strip() == \
        f"otr {app.otr_version()} (recipes: {packaged})"
    assert f"Recipes: {packaged}" in _run_installed(otr + ["train", "--help"], elsewhere).stdout
    dry_run = _run_installed(otr + ["train", "recipe=smollm2_demo", "dry_run=true"], elsewhere).stdout
    assert dry_run.startswith(f"otr {app.otr_version()} (recipes: {packaged})") and "name: smollm2_demo" in dry_run
    user = _user_recipes(elsewhere / "my_recipes")
    (user / "recipe" / "smollm2_demo.yaml").unlink()
    mine = _run_installed(otr + ["train", f"hydra.searchpath=[file://{user}]", "recipe=demo_long", "dry_run=true"],
                          elsewhere).stdout
    assert "name: demo_long" in mine and "max_steps: 80" in mine
    assert not any(Path(elsewhere, name).exists() for name in ("outputs", "multirun")), os.listdir(elsewhere)
