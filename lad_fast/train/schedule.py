"""The AdamW optimiser of a training config, and learning-rate schedules as pure functions of the step (so a
resumed run follows the same curve)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lad_fast.config import TrainConfig
from lad_fast.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at each step: linear warm-up over ``warmup_fraction`` of ``steps``, then
    constant, or cosine decay to ``final_lr_fraction`` of the peak at ``steps``."""
    if cfg.lr_schedule not in SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    steps = max(1, cfg.steps)
    warmup = round(cfg.warmup_fraction * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def make_adamw(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters with ``cfg``'s lr, betas and weight decay. Frozen
    parameters (``requires_grad`` off: ``condition.train_content = False``) are not given to it, so no
    step or weight decay moves them."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A LambdaLR for the shared loop's ``Phase(scheduler=...)``; None when the lr never changes."""
    if cfg.lr_schedule == "constant" and cfg.warmup_fraction == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
