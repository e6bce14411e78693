"""Under ZeRO-3 the model is partitioned as it loads (models.partitioned_loading), with the weights of a plain load."""

from __future__ import annotations

import pytest
import torch


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


# A 2-rank ZeRO-3 run's losses (the first step's included) equal to one process's: test_lora_export.py's
# test_zero0_export_gives_the_same_merged_weights_as_zero3, on this model, partitioned the same way.
