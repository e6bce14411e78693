"""Under ZeRO-3 the model is partitioned as it loads (models.partitioned_loading), with the weights of a plain load."""

from __future__ import annotations

import pytest
import torch

from helpers import read_jsonl, tiny_overrides
from otr_cli.cli import main
from test_lora_export import PARTITION_EVERYTHING
from test_train_distributed import torchrun

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}


@pytest.mark.slow
def test_zero3_loads_the_model_partitioned_with_the_weights_of_a_plain_load(tiny_qwen3_model_dir):
    import deepspeed

    from otr_cli.models import load_model
    from otr_cli.train.distributed import init_distributed

    init_distributed()  # a world of one: zero.Init needs a process group
    partitioned = load_model(str(tiny_qwen3_model_dir), zero3_config=ZERO3)
    plain = load_model(str(tiny_qwen3_model_dir))  # loads after it are plain again
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    loaded = dict(partitioned.named_parameters())
    # Right after loading, before deepspeed.initialize: every parameter is a ZeRO-3 partition, none is held whole.
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in loaded.values())
    assert sum(p.ds_numel for p in loaded.values()) == sum(p.numel() for p in plain.parameters())
    with deepspeed.zero.GatheredParameters(list(loaded.values())):
        for name, weight in plain.named_parameters():
            assert torch.equal(loaded[name], weight), name


@pytest.mark.slow
def test_two_rank_zero3_first_step_loss_equals_zero0(tiny_qwen3_model_dir, tmp_path):
    common = ["loss=sft", "trainer.max_steps=1"]
    main(["train", *tiny_overrides(tiny_qwen3_model_dir, tmp_path / "zero0", *common, "trainer.micro_batch_size=4")])
    torchrun(["train", *tiny_overrides(tiny_qwen3_model_dir, tmp_path / "zero3", *common, "deepspeed=zero3",
                                       PARTITION_EVERYTHING, "trainer.micro_batch_size=2")])
    [zero0] = [r for r in read_jsonl(tmp_path / "zero0" / "metrics.jsonl") if "loss" in r]
    [zero3] = [r for r in read_jsonl(tmp_path / "zero3" / "metrics.jsonl") if "loss" in r]
    # Same weights, same global batch: only the order of float sums differs (~1e-7 relative).
    assert zero3["loss"] == pytest.approx(zero0["loss"], rel=1e-5)
    assert zero3["supervised_tokens"] == zero0["supervised_tokens"]
