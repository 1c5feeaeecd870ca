"""Diffusion schedules, parameterisation conversions and the training objective.

Discrete time t in {0, ..., T-1}; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Lad uses T = 300, a
cosine schedule (Nichol and Dhariwal 2021), epsilon prediction and an L1 loss (LAD_REFERENCE.md phase 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lad_fast.config import DiffusionConfig
from lad_fast.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """Noise schedule tensors of length T (float64 on the CPU; move with :meth:`to`)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def T(self) -> int:  # noqa: N802 - the paper's name
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.betas.to(device), self.alphas_cumprod.to(device))

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer t (any shape); t = -1 means "clean data" (abar = 1)."""
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return padded[t.long() + 1]


def make_schedule(cfg: DiffusionConfig) -> Schedule:
    T = cfg.timesteps
    if T < 1:
        raise ConfigError(f"diffusion timesteps must be >= 1, got {T}")
    if cfg.schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    elif cfg.schedule == "linear":
        scale = 1000.0 / T
        betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    else:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose 'cosine' or 'linear'")
    return Schedule(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t from x0 (B, ...), t (B,), noise like x0."""
    a = _bcast(sched.abar(t), x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def to_x0_eps(
    prediction: str, pred: torch.Tensor, x: torch.Tensor, abar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output of the given parameterisation to (x0, eps). abar broadcast to x."""
    sa, sb = abar.sqrt(), (1 - abar).sqrt()
    if prediction == "eps":
        eps = pred
        x0 = (x - sb * eps) / sa
    elif prediction == "x0":
        x0 = pred
        eps = (x - sa * x0) / sb.clamp_min(1e-12)
    elif prediction == "v":
        x0 = sa * x - sb * pred
        eps = sb * x + sa * pred
    else:
        raise ConfigError(f"unknown prediction {prediction!r}; choose 'eps', 'x0' or 'v'")
    return x0, eps


def training_target(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    raise ConfigError(f"unknown prediction {prediction!r}; choose 'eps', 'x0' or 'v'")


def diffusion_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sched: Schedule,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The training objective: draw t and noise, run ``net(x_t, t)``, L1 or L2 to the target.

    ``net`` closes over the conditions (and their dropout for classifier-free guidance).
    """
    B = x0.shape[0]
    t = torch.randint(0, sched.T, (B,), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
    a = _bcast(sched.abar(t), x0)
    pred = net(q_sample(sched, x0, t, noise), t)
    target = training_target(cfg.prediction, x0, noise, a)
    if cfg.loss == "l1":
        return (pred.float() - target.float()).abs().mean()
    if cfg.loss == "l2":
        return ((pred.float() - target.float()) ** 2).mean()
    raise ConfigError(f"unknown loss {cfg.loss!r}; choose 'l1' or 'l2'")
