"""An error or a hang on one of two ranks stops both, with the failing rank's message, no launcher needed.

The two ranks are started as plain processes with the rendezvous variables set (what srun and
torchrun provide), so nothing but otr itself stops the survivor.
"""

from __future__ import annotations

import json

import pytest

from helpers import REPO, tiny_overrides
from ranks import start_ranks, wait_all

COMMON = ["loss=sft", "trainer.micro_batch_size=2", "trainer.max_steps=4"]


def start_faulty_ranks(tmp_path, args: list[str], fault: str, rank: int, step: int):
    return start_ranks(args, tmp_path, extra_env={"OTR_FAULT": fault, "OTR_FAULT_RANK": str(rank),
                                                  "OTR_FAULT_STEP": str(step)},
                       script=str(REPO / "tests" / "fault_injection.py"))


def flat(path) -> str:
    return " ".join(path.read_text().split())  # rich wraps log lines


@pytest.mark.faults
@pytest.mark.slow
def test_an_error_on_one_rank_stops_both_with_that_ranks_message(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    processes = start_faulty_ranks(tmp_path, ["train", *tiny_overrides(tiny_model_dir, out, *COMMON)], "raise", 1, 2)
    try:
        codes = wait_all(processes, timeout=180)
    finally:
        for process in processes:
            process.kill()
    logs = [flat(tmp_path / f"rank{r}.log") for r in range(2)]
    assert codes[1] == 1 and codes[0] not in (None, 0), (codes, logs)
    assert "[rank 1] failed; stopping all 2 ranks: RuntimeError: injected fault on rank 1 at step 2" in logs[1]
    assert "[rank 1] Traceback" in logs[1]
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "failed" and state["rank"] == 1 and "injected fault" in state["error"]


@pytest.mark.faults
@pytest.mark.slow
def test_a_hung_rank_times_out_the_others_instead_of_hanging_them(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *COMMON, "launcher.dist_timeout_min=0.1")]
    processes = start_faulty_ranks(tmp_path, args, "hang", 1, 2)
    try:
        codes = wait_all(processes[:1], timeout=180)
    finally:
        for process in processes:
            process.kill()  # the hung rank: a launcher would do this once rank 0 exits with an error
    log = flat(tmp_path / "rank0.log")
    assert codes[0] == 1, log
    assert "[rank 0] failed; stopping all 2 ranks" in log and "Timed out" in log, log
    assert json.loads((out / "run_state.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_a_refused_start_does_not_mark_the_run_that_owns_the_directory(tiny_model_dir, tmp_path, capsys):
    from otr_cli.cli import main

    out = tmp_path / "done"
    args = ["train", *tiny_overrides(tiny_model_dir, out, "loss=sft", "trainer.max_steps=1")]
    main(args)
    with pytest.raises(SystemExit):
        main(args)  # refused: the directory holds a finished run
    assert "finished run" in capsys.readouterr().err
    assert json.loads((out / "run_state.json").read_text())["status"] == "finished"
    (out / "run_state.json").write_text('{"status": "running", "step": 1}')  # another run, still going
    with pytest.raises(SystemExit):
        main([*args, "trainer.resume=never"])
    assert json.loads((out / "run_state.json").read_text())["status"] == "running"


def test_record_failure_keeps_the_first_failure_and_never_undoes_a_finished_run(tmp_path):
    from otr_cli.train.faults import record_failure

    state = tmp_path / "run_state.json"
    record_failure(state, 1, "RuntimeError: first")
    record_failure(state, 0, "RuntimeError: connection closed by peer")
    assert json.loads(state.read_text()) == {"status": "failed", "rank": 1, "error": "RuntimeError: first"}
    state.write_text('{"status": "finished"}')
    record_failure(state, 0, "OSError: later")
    assert json.loads(state.read_text())["status"] == "finished"
    record_failure(tmp_path / "missing" / "run_state.json", 0, "no directory, no record")
    assert not (tmp_path / "missing").exists()
