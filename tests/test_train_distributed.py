"""`otr train` under torchrun with 2 CPU processes (gloo): same global batch, same losses as 1 process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest

from helpers import REPO, read_jsonl, subprocess_env, tiny_overrides
from otr_cli.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    # An explicit free port: torchrun's "--master_port 0" leaves the workers waiting forever.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()),
               "-m", "otr_cli.cli", *args]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_log_the_same_losses_as_one_process_on_the_same_global_batch(tiny_model_dir, tmp_path, stage,
                                                                               monkeypatch):
    # otr_exact: deterministic, so every step must match (OTR's draws depend on the rank). Examples carry
    # data weights (each rank must normalise by the global weight sum, not its own); under ZeRO-2 the runs
    # also report to MLflow, where rank 0 alone must log (this was test_trackers.py's own 2-rank run).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "weighted.csv"
    data.write_text("question,answer,w\n" + "".join(f"What is {i} + {i}?,{2 * i},{[0, 0.5, 1, 2][i % 4]}\n"
                                                     for i in range(24)))
    common = ["loss=otr_exact", "loss.temperature=1.3", "loss.beta=-0.1", f"deepspeed=zero{stage}",
              f"data.source={data}", "data.weight_field=w", "trainer.max_steps=3", "trainer.save_steps=2",
              *(["trainer.report_to=[mlflow]"] if stage == 2 else [])]
    main(["train", *tiny_overrides(tiny_model_dir, tmp_path / "a" / "one", *common, "trainer.micro_batch_size=4")])
    two_dir = tmp_path / "b" / "two"
    result = torchrun(["train", *tiny_overrides(tiny_model_dir, two_dir, *common, "trainer.micro_batch_size=2")])
    one = [r for r in read_jsonl(tmp_path / "a" / "one" / "metrics.jsonl") if "loss" in r]
    two = [r for r in read_jsonl(two_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3]
    for left, right in zip(one, two, strict=True):
        assert right["loss"] == pytest.approx(left["loss"], rel=1e-4, abs=1e-7)
        assert right["ce"] == pytest.approx(left["ce"], rel=1e-4)
        assert right["supervised_tokens"] == left["supervised_tokens"]
    # Rank 0 alone writes the shared files; both ranks' DeepSpeed shards are in the checkpoint.
    shards = list((two_dir / "checkpoints" / "checkpoint-3" / "ds").iterdir())
    assert len([s for s in shards if "optim_states" in s.name]) == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two_dir / "final")
    assert "[rank 1]" not in result.stdout  # info lines come from rank 0 only
    if stage == 2:
        from test_trackers import _mlflow_runs

        client, _, runs = _mlflow_runs(tmp_path / "b" / "mlruns")
        assert len(runs) == 1, "rank 0 alone logs"
        assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == \
            pytest.approx([r["loss"] for r in two], rel=1e-6)


@pytest.mark.slow
def test_two_rank_zero3_checkpoint_resumes_in_two_ranks(tiny_model_dir, tmp_path):
    common = ["loss=sft", "deepspeed=zero3", "trainer.micro_batch_size=2", "trainer.save_steps=2"]
    torchrun(["train", *tiny_overrides(tiny_model_dir, tmp_path / "full", *common, "trainer.max_steps=4")])
    # A copy of the run turned back into a run killed after step 2 (a second identical run would only cost time).
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-4")
    (cut / "run_state.json").write_text('{"status": "running"}')
    torchrun(["train", *tiny_overrides(tiny_model_dir, cut, *common, "trainer.max_steps=4")])
    full = [r for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    resumed = [r for r in read_jsonl(cut / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for left, right in zip(full, resumed):
        assert right["loss"] == pytest.approx(left["loss"], rel=1e-5)
