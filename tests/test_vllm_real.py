"""The real vLLM engine (its CPU build) through otr: scripts/vllm_check.py, as `make vllm-check` runs it.

Needs the venv that scripts/vllm_check.sh builds (.venv-vllm in the checkout); skipped without it, as
in CI. About 10 minutes on 2 cores: three engine start-ups of ~1.5-2.5 min each dominate.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, SHARED_DATA, subprocess_env

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def vllm_venv_python() -> str:
    """The vLLM venv's interpreter, or a skip (fast: no import of vllm, which takes seconds)."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"no {VLLM_PYTHON} (scripts/vllm_check.sh builds it)")
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('vllm') is None)"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"{VLLM_PYTHON} has no vllm")
    return str(VLLM_PYTHON)


@pytest.mark.slow
def test_the_real_vllm_engine_agrees_with_the_hf_backend_and_evaluates_inside_training(tmp_path):
    python = vllm_venv_python()
    out = tmp_path / "vllm_check"
    data = (["--benchmark", "gsm8k", "--data-dir", str(SHARED_DATA)] if (SHARED_DATA / "gsm8k" / "test.jsonl").is_file()
            else [])  # the built-in synthetic_arith problems otherwise
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "vllm_check.py"), "--vllm-python", python,
                             "--out", str(out), "--limit", "10", *data],
                            env=subprocess_env() | {"VLLM_CPU_KVCACHE_SPACE": "1"}, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "vllm_check.json").read_text())
    agreement, backends = report["agreement"], report["backends"]
    assert agreement["problems"] == 10 and agreement["same_first_80_chars"] >= 5
    assert backends["vllm"]["tokens"] > 0 and backends["vllm"]["engine_generated_tokens"] > 0
    assert set(backends) == {"hf", "vllm"} and all(0 <= run["accuracy"] <= 1 for run in backends.values())
    assert report["train"]["periodic_eval"] and report["train"]["vllm_runs"] == 2  # step 2 and the final model
    assert "identical completions" in result.stdout and "tok/s" in result.stdout
