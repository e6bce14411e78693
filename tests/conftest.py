"""Shared fixtures: the real tokenizer, a tiny random model of SmolLM2's architecture, and a runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Deterministic and quiet everywhere, including subprocesses.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from otr_cli.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised Llama with SmolLM2's tokenizer and tied embeddings, a few MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-smollm2")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_overrides(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run of the tiny model on a small synthetic set."""
    return [f"model.name_or_path={model_dir}", f"run.output_dir={output_dir}", "data.synthetic.num_train=48",
            "data.synthetic.num_validation=8", "data.max_length=96", "trainer.micro_batch_size=4",
            "trainer.max_steps=3", "trainer.progress=false", "eval=none", "optim.lr=1e-3",
            # The default recipe's SFT warm-up would hide the objective under test.
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
