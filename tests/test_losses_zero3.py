"""The fused loss inside DeepSpeed: two CPU ranks with ZeRO-3 equal one rank with ZeRO-0.

Runs tests/zero3_loss_step.py under torchrun (gloo, DeepSpeed's cpu accelerator) twice on the same
global batch and compares the global loss, the full gradients and the parameters after one AdamW
step. The first DeepSpeed run on a machine JIT-builds a small shm comm op (gcc), ~10 s.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("zero3_loss_step.py")
REPO = SCRIPT.parents[1]


def run_step(stage: int, processes: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(SCRIPT), "--stage", str(stage), "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_zero3_on_two_ranks_matches_zero0_on_one_for_an_otr_training_step(tmp_path):
    if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("needs deepspeed and torchrun")
    single = run_step(stage=0, processes=1, out=tmp_path / "zero0.pt")
    sharded = run_step(stage=3, processes=2, out=tmp_path / "zero3.pt")

    assert sharded["world"] == 2
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert single["params"].keys() == sharded["params"].keys()
    for name, grad in single["grads"].items():
        scale = grad.abs().max()
        assert scale > 0, name
        assert (sharded["grads"][name] - grad).abs().max() <= 1e-4 * scale, name
    for name, param in single["params"].items():
        torch.testing.assert_close(sharded["params"][name], param, rtol=0, atol=1e-5, msg=name)
