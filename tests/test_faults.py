"""An error or a hang on one of two ranks stops both, with the failing rank's message, no launcher needed.

The two ranks are started as plain processes with the rendezvous variables set (what srun and
torchrun provide), so nothing but otr itself stops the survivor.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, subprocess_env, tiny_overrides

COMMON = ["loss=sft", "trainer.micro_batch_size=2", "trainer.max_steps=4"]


def start_ranks(tmp_path, args: list[str], fault: str, rank: int, step: int) -> list[subprocess.Popen]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for r in range(2):
        env = subprocess_env() | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OTR_FAULT": fault,
                                  "OTR_FAULT_RANK": str(rank), "OTR_FAULT_STEP": str(step)}
        with (tmp_path / f"rank{r}.log").open("w") as log:
            processes.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_injection.py"), *args],
                                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in processes):
        time.sleep(0.2)
    return [p.poll() for p in processes]


def flat(path) -> str:
    return " ".join(path.read_text().split())  # rich wraps log lines


@pytest.mark.slow
def test_an_error_on_one_rank_stops_both_with_that_ranks_message(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    processes = start_ranks(tmp_path, ["train", *tiny_overrides(tiny_model_dir, out, *COMMON)], "raise", 1, 2)
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


@pytest.mark.slow
def test_a_hung_rank_times_out_the_others_instead_of_hanging_them(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", *tiny_overrides(tiny_model_dir, out, *COMMON, "launcher.dist_timeout_min=0.1")]
    processes = start_ranks(tmp_path, args, "hang", 1, 2)
    try:
        codes = wait_all(processes[:1], timeout=180)
    finally:
        for process in processes:
            process.kill()  # the hung rank: a launcher would do this once rank 0 exits with an error
    log = flat(tmp_path / "rank0.log")
    assert codes[0] == 1, log
    assert "[rank 0] failed; stopping all 2 ranks" in log and "Timed out" in log, log
    assert json.loads((out / "run_state.json").read_text())["status"] == "failed"
