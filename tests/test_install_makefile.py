"""README, "Install": what `make install` runs for each kind of machine (make -n: printed, nothing run)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from helpers import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def planned_install(tmp_path, *variables: str) -> str:
    venv = tmp_path / "venv"  # a venv that does not exist yet, so make plans the whole installation
    return subprocess.run(["make", "-n", "install", f"VENV={venv}", *variables], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout


def torch_install(plan: str) -> str:
    return next(line for line in plan.splitlines() if "pip install" in line and "torch==" in line)


def test_make_install_takes_torch_from_pips_own_index_by_default(tmp_path):
    line = torch_install(planned_install(tmp_path))
    assert '"torch==2.13.0"' in line and "--index-url" not in line


def test_torch_index_url_is_passed_to_pip_for_torch_alone(tmp_path):
    plan = planned_install(tmp_path, "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert '--index-url "https://download.pytorch.org/whl/cpu"' in torch_install(plan)
    otr_install = next(line for line in plan.splitlines() if "pip install" in line and "-e" in line)
    assert "--index-url" not in otr_install  # otr's other dependencies still come from pip's own index


def test_torch_spec_picks_the_version(tmp_path):
    assert '"torch==2.9.1"' in torch_install(planned_install(tmp_path, "TORCH_SPEC=torch==2.9.1"))


def test_venv_args_reach_the_venv_so_a_cluster_modules_torch_is_kept(tmp_path):
    plan = planned_install(tmp_path, "VENV_ARGS=--system-site-packages")
    assert "-m venv --system-site-packages" in plan
    # torch is installed only when the venv cannot import one already
    assert 'python -c "import torch" 2>/dev/null ||' in plan
