from __future__ import annotations

import pytest
import torch

from lad_fast.config import TrainConfig
from lad_fast.errors import ConfigError
from lad_fast.train.schedule import lr_factor, make_adamw, make_scheduler


def test_cosine_with_warmup_shape():
    f = lr_factor(TrainConfig(steps=100, lr_schedule="cosine", warmup_fraction=0.1, final_lr_fraction=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_constant_needs_no_scheduler_and_warmup_is_linear():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert make_scheduler(opt, TrainConfig()) is None
    f = lr_factor(TrainConfig(steps=10, warmup_fraction=0.5))
    assert [round(f(s), 2) for s in range(7)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0]


def test_unknown_schedule_is_named():
    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, cosine, got 'step'"):
        lr_factor(TrainConfig(lr_schedule="step"))


def test_make_adamw_takes_the_trainable_parameters_and_the_configs_settings():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)  # frozen, as a content head with train_content off
    cfg = TrainConfig(lr=3e-4, betas=(0.8, 0.95), weight_decay=0.05)
    (group,) = make_adamw(net, cfg).param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in net[1].parameters()]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 0.05)
