"""scripts/gpu_check.sh in its CPU mode: the script the first GPU will run, checked end to end here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_step_and_writes_the_report(tmp_path):
    # loss_tests is left out: the suite runs those files itself; sft training is the same path as otr.
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--out", str(out),
                             "--steps", "bench_loss,train,eval", "--objectives", "otr,otr-packed"],
                            env=subprocess_env() | {"PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {step["step"]: step for step in report["steps"]}
    assert [name for name, step in steps.items() if step["status"] == "ok"] == ["bench_loss", "train_otr",
                                                                               "train_otr-packed", "eval_hf"]
    assert {"fused:sft", "fused:otr", "fused:otr_exact"} <= {case["case"] for case in steps["bench_loss"]["results"]}
    assert steps["train_otr"]["tokens_per_s"] > 0 and steps["train_otr"]["peak_bytes"] > 0
    # The packed run trained on the same examples: its first step's loss is the unpacked one's.
    assert steps["train_otr-packed"]["first_loss"] == pytest.approx(steps["train_otr"]["first_loss"], rel=1e-3,
                                                                   abs=1e-4)
    assert steps["eval_hf"]["problems"] == 2 and len(steps["eval_hf"]["completions"]) == 2
    # Packages this machine lacks are reported as skipped with a reason, not as failures.
    assert steps["eval_vllm"]["status"] == "skipped" and "vllm" in steps["eval_vllm"]["why"]
    table = (out / "gpu_check.md").read_text()
    assert "| train_otr | ok |" in table and "| eval_vllm | skipped |" in table


def test_gpu_check_reports_its_vllm_training_steps_as_skipped_with_the_reason_off_a_gpu(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "has_module", lambda name: True)  # vLLM importable, but no GPU
    steps = gpu_check.step_vllm_gpu("cpu", tmp_path, gpu_check.PROFILES["cpu"], tmp_path)
    assert [s["step"] for s in steps] == ["vllm_beside_trainer", "vllm_refused_at_start", "vllm_stop_signal"]
    assert all(s["status"] == "skipped" and "GPU" in s["why"] for s in steps)
