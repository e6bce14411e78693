"""Process placement: which GPU a process drives, and which AdamW runs (no GPU needed: pure selection logic)."""

from __future__ import annotations

import os

import pytest

from otr_cli.config import ConfigError, TrainConfig, validate
from otr_cli.train.ds_config import build_deepspeed_config
from otr_cli.train.optimizer import build_torch_adamw, deepspeed_builds_optimizer, describe_optimizer
from otr_cli.placement import PlacementError, bind_cuda_device, cuda_device_index


@pytest.mark.parametrize("local_rank, visible, expected", [
    (0, 8, 0), (3, 8, 3), (7, 8, 7),  # every task sees the whole node
    (0, 1, 0), (3, 1, 0), (7, 1, 0),  # each task sees only its own GPU
])
def test_the_device_index_is_the_local_rank_or_the_only_visible_gpu(local_rank, visible, expected):
    assert cuda_device_index(local_rank, visible) == expected


def test_a_local_rank_beyond_several_visible_gpus_is_a_clear_error():
    with pytest.raises(PlacementError, match=r"LOCAL_RANK=5 but this process sees 4 GPUs \(CUDA_VISIBLE_DEVICES='0,1,2,3'\)"
                       r".*launcher.tasks_per_node = launcher.gpus_per_node"):
        cuda_device_index(5, 4, "0,1,2,3")


def test_a_task_that_sees_only_its_own_gpu_tells_deepspeed_local_rank_0(monkeypatch):
    # DeepSpeed reads LOCAL_RANK as a device index (engine, zero.Init, NCCL device_id): it must name device 0.
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert bind_cuda_device() == 0
    assert chosen == [0] and os.environ["LOCAL_RANK"] == "0"


def test_a_task_that_sees_the_whole_node_keeps_its_local_rank(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert bind_cuda_device() == 3
    assert chosen == [3] and os.environ["LOCAL_RANK"] == "3"


def test_torch_adamw_is_the_default_and_the_deepspeed_json_declares_no_optimizer():
    cfg = TrainConfig()
    assert not deepspeed_builds_optimizer(cfg.deepspeed)
    for on_gpu in (False, True):
        assert "optimizer" not in build_deepspeed_config(cfg, 8, on_gpu=on_gpu, precision="fp32")
    assert describe_optimizer(cfg.deepspeed, on_gpu=True) == "torch.optim.AdamW(fused=True)"
    assert describe_optimizer(cfg.deepspeed, on_gpu=False) == "torch.optim.AdamW"


def test_deepspeed_optimizer_when_asked_for_or_with_zero_offload():
    cfg = TrainConfig()
    cfg.deepspeed.optimizer = "deepspeed"
    assert build_deepspeed_config(cfg, 8, on_gpu=True, precision="fp32")["optimizer"]["type"] == "AdamW"
    assert "FusedAdam" in describe_optimizer(cfg.deepspeed, on_gpu=True)
    offload = TrainConfig()
    offload.deepspeed.zero_stage, offload.deepspeed.offload_optimizer = 3, True
    # DeepSpeed refuses a client optimizer with ZeRO-Offload; its DeepSpeedCPUAdam needs no nvcc.
    assert deepspeed_builds_optimizer(offload.deepspeed)
    assert "torch_adam" not in build_deepspeed_config(offload, 8, on_gpu=True, precision="fp32")["optimizer"]["params"]
    assert describe_optimizer(offload.deepspeed, on_gpu=True).startswith("DeepSpeedCPUAdam")


def test_the_cpu_optimizer_is_the_one_deepspeed_built_before(monkeypatch):
    # Same class and settings as DeepSpeed's torch_adam path, so CPU numerics and checkpoints are unchanged.
    import torch

    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps = 3e-4, 0.1, [0.9, 0.95], 1e-6
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_torch_adamw([parameter], cfg.optim, on_gpu=False)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.9, 0.95), 1e-6, 0.1)
    assert not group["fused"] and not group["foreach"]


@pytest.mark.parametrize("changes, message", [
    ({"optimizer": "apex"}, "deepspeed.optimizer='apex' is not one of torch, deepspeed"),
    ({"extra": {"optimizer": {"type": "Lion"}}}, "set deepspeed.optimizer=deepspeed to use the extra block"),
])
def test_bad_optimizer_choices_name_the_key(changes, message):
    cfg = TrainConfig()
    for key, value in changes.items():
        setattr(cfg.deepspeed, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_init_distributed_drives_the_only_visible_gpu_when_local_rank_is_3(monkeypatch):
    # A cluster that shows each task only its own GPU: device count 1, LOCAL_RANK 3. torch.cuda.set_device(3)
    # raises "invalid device ordinal" there; the fake below does the same.
    import deepspeed
    import torch
    import torch.distributed as dist

    from otr_cli.train.distributed import init_distributed

    chosen = []

    def set_device(index):
        if index >= torch.cuda.device_count():
            raise RuntimeError("CUDA error: invalid device ordinal")
        chosen.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    for key, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "3",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    info = init_distributed()
    assert chosen == [0]
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 3)
