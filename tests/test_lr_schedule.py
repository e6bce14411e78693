"""optim.scheduler: the learning rate at every step equals transformers' (a Trainer or TRL run) for the same settings."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from otr_cli.config import ConfigError, OptimConfig, TrainConfig, validate
from otr_cli.train.lr_schedule import build_lr_scheduler

TOTAL_STEPS = 20
LR = 1e-3


def _rates(make_scheduler) -> list[float]:
    """Learning rate of each of TOTAL_STEPS optimizer steps, as DeepSpeed steps the scheduler."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(TOTAL_STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _otr_rates(**optim) -> list[float]:
    config = OptimConfig(lr=LR, **optim)
    return _rates(lambda optimizer: build_lr_scheduler(optimizer, config, TOTAL_STEPS))


def _transformers_rates(name: str, warmup: int, **kwargs) -> list[float]:
    return _rates(lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=warmup,
                                                  num_training_steps=TOTAL_STEPS,
                                                  scheduler_specific_kwargs=kwargs or None))


# (otr's optim settings, the same schedule as a Trainer's lr_scheduler_type, warmup steps, lr_scheduler_kwargs)
SAME_SETTINGS = {
    "constant": ({"scheduler": "constant"}, "constant", 0, {}),
    "constant_warmup": ({"scheduler": "constant", "warmup_steps": 4}, "constant_with_warmup", 4, {}),
    "linear": ({"scheduler": "linear"}, "linear", 0, {}),
    "linear_warmup": ({"scheduler": "linear", "warmup_steps": 4}, "linear", 4, {}),
    "linear_warmup_ratio": ({"scheduler": "linear", "warmup_ratio": 0.12}, "linear", 3, {}),  # ceil(2.4)
    "cosine": ({"scheduler": "cosine"}, "cosine", 0, {}),
    "cosine_warmup": ({"scheduler": "cosine", "warmup_steps": 5}, "cosine", 5, {}),
    "cosine_min_lr": ({"scheduler": "cosine", "min_lr_ratio": 0.1}, "cosine_with_min_lr", 0, {"min_lr_rate": 0.1}),
    "cosine_with_min_lr_warmup": ({"scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.1, "warmup_steps": 3},
                                  "cosine_with_min_lr", 3, {"min_lr_rate": 0.1}),
    "wsd": ({"scheduler": "warmup_stable_decay", "decay_ratio": 0.25}, "warmup_stable_decay", 0,
            {"num_decay_steps": 5}),
    "wsd_warmup_min_lr": ({"scheduler": "warmup_stable_decay", "decay_ratio": 0.25, "warmup_steps": 4,
                           "min_lr_ratio": 0.1},
                          "warmup_stable_decay", 4, {"num_decay_steps": 5, "min_lr_ratio": 0.1}),
    "linear_min_lr": ({"scheduler": "linear", "min_lr_ratio": 0.1, "warmup_steps": 2}, "warmup_stable_decay", 2,
                      {"num_decay_steps": 18, "decay_type": "linear", "min_lr_ratio": 0.1}),
}


@pytest.mark.parametrize("case", SAME_SETTINGS)
def test_learning_rate_equals_transformers_at_every_step(case):
    optim, name, warmup, kwargs = SAME_SETTINGS[case]
    assert _otr_rates(**optim) == pytest.approx(_transformers_rates(name, warmup, **kwargs), rel=1e-12, abs=0)


def test_warmup_starts_at_zero_as_in_transformers():
    rates = _otr_rates(scheduler="constant", warmup_steps=4)
    assert rates[:5] == pytest.approx([0.0, LR / 4, LR / 2, 3 * LR / 4, LR])


def test_constant_without_warmup_keeps_the_peak_rate():
    """The demo recipe's schedule (constant, no warm-up) is the same as before transformers built it."""
    assert _otr_rates(scheduler="constant") == [LR] * TOTAL_STEPS


def test_min_lr_ratio_outside_zero_one_is_refused():
    config = TrainConfig()
    config.optim.min_lr_ratio = 1.5
    with pytest.raises(ConfigError, match=r"optim.min_lr_ratio=1.5"):
        validate(config)


def test_make_demo_recipe_schedule_is_unaffected_constant_peak_from_the_first_step():
    """`make demo` (recipe=smollm2_demo: constant, no warm-up) trains at its peak rate from step 1, as before."""
    from omegaconf import OmegaConf

    from otr_cli.app import compose_config

    optim = OmegaConf.to_object(compose_config("train", "train", ["recipe=smollm2_demo"], TrainConfig)).optim
    rates = _rates(lambda optimizer: build_lr_scheduler(optimizer, optim, TOTAL_STEPS))
    assert (optim.scheduler, optim.warmup_steps, optim.warmup_ratio) == ("constant", 0, 0.0)
    assert rates == [LR] * TOTAL_STEPS  # the SGD of _rates starts at LR; the multiplier stays 1
