"""Ctrl-C: the first saves at the step boundary and stops (not requeued), the second stops at once (exit 130)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from helpers import read_jsonl, run_cli, start_cli, tiny_overrides
from otr_cli.cli import main
from otr_cli.train import preemption
from ranks import start_ranks, wait_all

COMMON = ["loss=otr", "loss.k=16", "trainer.max_steps=8", "data.synthetic.num_train=20"]


def steps_done(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len([r for r in read_jsonl(path) if "loss" in r]) if path.is_file() else 0


def published(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))


def assert_complete(checkpoint) -> None:
    """Everything a resume reads: the trainer state of that step, the DeepSpeed shards, the HF export."""
    assert json.loads((checkpoint / "otr_state.json").read_text())["step"] == int(checkpoint.name.split("-")[1])
    assert (checkpoint / "model.safetensors").is_file() and list((checkpoint / "ds").glob("*model_states.pt"))


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_one_ctrl_c_saves_at_a_step_boundary_exits_3_and_resume_auto_finishes(tiny_model_dir, tmp_path,
                                                                                         signum):
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *COMMON)]
    log = tmp_path / "run.log"
    process = start_cli(args, log)
    try:
        deadline = time.time() + 180
        while steps_done(out) < 2:
            assert process.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        process.send_signal(signum)
        assert process.wait(timeout=120) == preemption.PREEMPTED_EXIT, log.read_text()
    finally:
        process.kill()
    text = " ".join(log.read_text().split())  # rich wraps log lines
    assert "Traceback" not in text
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "preempted" and 2 <= state["step"] < 8
    if signum == signal.SIGINT:
        # The step named is the one the run was in, and the one it saved at the end of.
        assert (f"Ctrl-C: saving at the end of step {state['step']} and stopping; press Ctrl-C again to stop at "
                "once") in text, text
        assert f"Stopped at step {state['step']} on Ctrl-C" in text and "not requeued" in text
    else:
        assert "SIGTERM received" in text and "not requeued (not running under SLURM)" in text
    assert published(out) == [f"checkpoint-{state['step']}"]
    assert_complete(out / "checkpoints" / f"checkpoint-{state['step']}")

    run_cli(args)  # the same command again: trainer.resume=auto resumes and finishes
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.faults
def test_a_second_ctrl_c_during_the_save_stops_at_once_with_130_and_publishes_no_half_checkpoint(
        tiny_model_dir, tmp_path, monkeypatch, capfd):
    from otr_cli.train import loop

    out = tmp_path / "twice"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *COMMON, "trainer.save_steps=2")]
    original_step, original_export = loop.Trainer.train_step, loop.export_hf_model

    def step_then_ctrl_c(self):
        record = original_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    def export_then_ctrl_c(*args, **kwargs):
        # Half-way through the stop's checkpoint of step 3 (DeepSpeed shards written, HF export not yet);
        # step 2's periodic save is left alone.
        if preemption.stop_received():
            os.kill(os.getpid(), signal.SIGINT)
        return original_export(*args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_ctrl_c)
    monkeypatch.setattr(loop, "export_hf_model", export_then_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == preemption.INTERRUPTED_EXIT == 130
    err = capfd.readouterr().err  # the handler writes to fd 2 directly (async-signal-safe)
    assert "Ctrl-C: saving at the end of step 3 and stopping" in err and "Ctrl-C again: stopping at once" in err
    assert "Traceback" not in err
    assert "stopped at once on a second Ctrl-C; the newest complete checkpoint is" in err
    assert signal.getsignal(signal.SIGINT) is handler_before
    # The step-2 checkpoint is published and complete; step 3's half-written one was never published.
    assert published(out) == ["checkpoint-2"]
    assert_complete(out / "checkpoints" / "checkpoint-2")
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert json.loads((out / "run_state.json").read_text())["status"] == "preempted"  # not "running" forever
    assert json.loads((out / "run_state.json").read_text())["step"] == 2

    monkeypatch.setattr(loop.Trainer, "train_step", original_step)
    monkeypatch.setattr(loop, "export_hf_model", original_export)
    main(args)  # resumes from step 2 and finishes
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.faults
def test_ctrl_c_to_the_process_group_of_two_ranks_makes_one_clean_save_and_stop(tiny_model_dir, tmp_path):
    out = tmp_path / "two"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *COMMON, "deepspeed=zero2", "trainer.micro_batch_size=2")]
    processes = start_ranks(args, tmp_path, one_process_group=True)
    try:
        deadline = time.time() + 180
        while steps_done(out) < 2:
            running = all(p.poll() is None for p in processes)
            assert running and time.time() < deadline, (tmp_path / "rank0.log").read_text()
            time.sleep(0.05)
        os.killpg(processes[0].pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: every rank gets it
        codes = wait_all(processes, timeout=120)
    finally:
        for process in processes:
            process.kill()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [preemption.PREEMPTED_EXIT] * 2, [text[-2000:] for text in logs]
    assert all("Ctrl-C: saving at the end of step" in text and "Traceback" not in text for text in logs), logs
    step = json.loads((out / "run_state.json").read_text())["step"]
    assert step < 8 and published(out) == [f"checkpoint-{step}"]
    checkpoint = out / "checkpoints" / f"checkpoint-{step}"
    assert len(list((checkpoint / "ds").glob("*optim_states.pt"))) == 2  # both ranks saved the same step
    assert_complete(checkpoint)


@pytest.mark.slow
@pytest.mark.faults
def test_ctrl_c_to_torchrun_makes_one_clean_save_and_stop(tiny_model_dir, tmp_path):
    """torchrun starts its workers in sessions of their own: a terminal's Ctrl-C reaches torchrun alone, which
    sends each worker one SIGINT (a first Ctrl-C for otr) and SIGKILL after --shutdown-timeout (30 s)."""
    import subprocess
    import sys

    from helpers import REPO, subprocess_env

    out = tmp_path / "torchrun"
    args = tiny_overrides(tiny_model_dir, out, *COMMON, "deepspeed=zero2", "trainer.micro_batch_size=2")
    log = tmp_path / "torchrun.log"
    with log.open("w") as handle:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "-m", "otr_cli.cli", "train", *args], cwd=REPO, env=subprocess_env(),
                                    stdout=handle, stderr=subprocess.STDOUT, process_group=0)
    try:
        deadline = time.time() + 240
        while steps_done(out) < 2:
            assert launcher.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(launcher.pid, signal.SIGINT)  # the terminal's foreground group: torchrun only, here
        code = launcher.wait(timeout=120)
    finally:
        launcher.kill()
    text = log.read_text()
    # torchrun ends with its own SignalException (exit 1); the ranks saved and stopped before that.
    assert code != 0 and "Sending process" in text and "closing signal SIGINT" in text, text[-3000:]
    assert text.count("Ctrl-C: saving at the end of step") == 2, text[-3000:]  # one per rank, no second one
    assert "Unable to shutdown process" not in text  # no SIGKILL was needed
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "preempted" and published(out) == [f"checkpoint-{state['step']}"]
    checkpoint = out / "checkpoints" / f"checkpoint-{state['step']}"
    assert len(list((checkpoint / "ds").glob("*optim_states.pt"))) == 2
    assert_complete(checkpoint)


@pytest.mark.slow
@pytest.mark.faults
def test_a_ctrl_c_during_an_evaluation_stops_it_at_the_next_batch_and_saves(tiny_model_dir, tmp_path):
    from pathlib import Path

    from test_preemption import EVALUATING, generated_per_rank

    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *COMMON, *EVALUATING)]
    processes = start_ranks(args, tmp_path, extra_env={"OTR_SIGNAL_RANKS": "0,1", "OTR_SIGNAL": "SIGINT"},
                            script=str(Path(__file__).parent / "signal_in_evaluation.py"))
    try:
        codes = wait_all(processes, timeout=400)
    finally:
        for process in processes:
            process.kill()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [preemption.PREEMPTED_EXIT] * 2, [text[-3000:] for text in logs]
    assert all("Ctrl-C: saving at the end of step 2" in text for text in logs)
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "preempted" and state["step"] == 2 and published(out) == ["checkpoint-2"]
    assert generated_per_rank(out / "eval" / "step-2") == [2, 2]  # each rank stopped after its first batch
    assert not (out / "eval" / "step-2" / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.faults
def test_two_quick_ctrl_cs_to_two_ranks_stop_both_without_a_hang_or_a_half_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "two"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *COMMON, "deepspeed=zero2", "trainer.micro_batch_size=2",
                                     "trainer.save_steps=1")]
    processes = start_ranks(args, tmp_path, one_process_group=True)
    try:
        deadline = time.time() + 180
        while steps_done(out) < 2:
            running = all(p.poll() is None for p in processes)
            assert running and time.time() < deadline, (tmp_path / "rank0.log").read_text()
            time.sleep(0.05)
        os.killpg(processes[0].pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(processes[0].pid, signal.SIGINT)
        codes = wait_all(processes, timeout=120)
    finally:
        for process in processes:
            process.kill()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    # Whether the second came before the stop's save ended decides 130 or 3; either way no rank is left hanging.
    assert set(codes) <= {preemption.INTERRUPTED_EXIT, preemption.PREEMPTED_EXIT}, [t[-3000:] for t in logs]
    assert not any("Traceback" in text for text in logs), [t[-3000:] for t in logs]
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
        assert len(list((checkpoint / "ds").glob("*optim_states.pt"))) == 2
        assert_complete(checkpoint)
