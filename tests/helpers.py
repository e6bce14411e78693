"""Helpers the tests share (imported as `from helpers import ...`); fixtures stay in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_overrides(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run of the tiny model on a small synthetic set."""
    return ["recipe=smollm2_demo", f"model.name_or_path={model_dir}", f"run.output_dir={output_dir}", "data.synthetic.num_train=48",
            "data.synthetic.num_validation=8", "data.max_length=96", "trainer.micro_batch_size=4",
            "trainer.max_steps=3", "trainer.progress=false", "eval=none", "optim.lr=1e-3",
            # The demo recipe's SFT warm-up would hide the objective under test.
            "loss.sft_warmup_steps=0", *extra]


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """This process's environment without the rendezvous variables an in-process run left behind."""
    return {k: v for k, v in os.environ.items() if k not in DIST_VARS} | {"PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, check: bool = True
            ) -> subprocess.CompletedProcess:
    """`otr ...` in a fresh process, as a user would run it."""
    result = subprocess.run([sys.executable, "-m", "otr_cli.cli", *args], cwd=cwd or REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"otr {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`otr ...` in the background, as a user's terminal would run it, its output going to `log`."""
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "otr_cli.cli", *args], cwd=REPO, env=subprocess_env(),
                                stdout=handle, stderr=subprocess.STDOUT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_wandb_records(path: Path) -> list:
    """The protobuf records (wandb.proto.wandb_internal_pb2.Record) of an offline run's ``run-<id>.wandb`` file.

    wandb >= 0.20 ships no Python reader for its own file (its Go core writes and syncs it); the
    format is LevelDB's log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks
    of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last).
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a wandb run file"
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait until `path` exists (a run's checkpoint, a fault hook's ready marker); fail with the run's log when the
    process exits first or the time runs out."""
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run exited ({process.returncode}) before {path} appeared:\n{log.read_text()}")
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear:\n{log.read_text()}")
        time.sleep(0.05)
