"""Shared fixtures: the real tokenizer and a tiny random model of SmolLM2's architecture (helpers: helpers.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Deterministic and quiet everywhere, including subprocesses.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The tokenized-data cache of this session (and its subprocesses) in a fresh directory, never ~/.cache.
TOKENIZED_CACHE = tempfile.mkdtemp(prefix="otr-test-cache-")
os.environ["OTR_CACHE_DIR"] = TOKENIZED_CACHE


@pytest.fixture(scope="session", autouse=True)
def _remove_tokenized_cache():
    """Delete the session's tokenized-data cache when the session ends."""
    yield
    shutil.rmtree(TOKENIZED_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    from otr_cli.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def save_random_model(directory: Path, tokenizer, model_class, config_class, **shape) -> Path:
    """A model of `model_class` initialised from seed 0, with `shape`'s sizes and SmolLM2's tokenizer and
    special tokens, saved as safetensors with the tokenizer into `directory`."""
    import torch

    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised Llama with SmolLM2's tokenizer and tied embeddings, a few MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_random_model(tmp_path_factory.mktemp("tiny-smollm2"), tokenizer, LlamaForCausalLM, LlamaConfig,
                             tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen3_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised model of the Qwen3 architecture (qwen8b_math's), with SmolLM2's tokenizer.

    Untied embeddings, q/k norms and grouped-query attention as in Qwen3-8B, at a few MB: the scale path's
    rehearsal runs its code paths (ZeRO-3 partitioning of separate embedding and LM-head weights) on CPU ranks.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return save_random_model(tmp_path_factory.mktemp("tiny-qwen3"), tokenizer, Qwen3ForCausalLM, Qwen3Config,
                             head_dim=8, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster on loopback for this session (tests/slurm_cluster.py); skips without SLURM."""
    from slurm_cluster import SlurmCluster, slurm_available

    reason = slurm_available()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
