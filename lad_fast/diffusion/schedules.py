"""Diffusion schedules, parameterisation conversions and the training objectives.

``objective = "ddpm"``: discrete time t in {0, ..., T-1}; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Lad uses T = 300, a cosine schedule (Nichol and Dhariwal 2021), epsilon prediction and an L1 loss
(docs/lad.md, "Denoiser and diffusion"); x0- and v-prediction (Salimans and Ho 2022) and Min-SNR-gamma
loss weighting (Hang et al. 2023) are options.

``objective = "flow"``: flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; Esser et al.
2024, "SD3"). Continuous t in [0, 1]: x_t = (1 - t) x0 + t noise, so t = 0 is data and t = 1 pure noise.
The network predicts the velocity v = dx_t/dt = noise - x0 (this sign: sampling integrates from t = 1
down to 0 with x <- x + (t_next - t) v, t_next < t). Given v, x0 = x_t - t v and noise = x_t + (1 - t) v.
The U-Net's sinusoidal time embedding was built for the DDPM integer timesteps, so the network sees
t * (T - 1) (T = ``timesteps``): t = 1 lands where DDPM's noisiest step does. Training t is drawn
logit-normal (SD3's default: sigmoid of N(0, 1)) or uniform, then shifted (:func:`shift_time`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from lad_fast.config import DiffusionConfig
from lad_fast.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """Noise schedule tensors of length T (float64 on the CPU; move with :meth:`to`)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    objective: ClassVar[str] = "ddpm"

    @property
    def T(self) -> int:  # noqa: N802 - the paper's name
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.betas.to(device), self.alphas_cumprod.to(device))

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer t (any shape); t = -1 means "clean data" (abar = 1)."""
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return padded[t.long() + 1]


@dataclass(frozen=True)
class FlowSchedule:
    """The flow objective's time settings (``objective = "flow"``); see the module docstring.

    T: the DDPM-equivalent number of timesteps; the network sees ``t * time_scale`` with time_scale T - 1.
    shift, shift_reference: the base shift and its reference latent voxel count (0: no resolution scaling).
    """

    T: int
    shift: float = 1.0
    shift_reference: int = 0
    objective: ClassVar[str] = "flow"

    @property
    def time_scale(self) -> float:
        return float(self.T - 1)

    def to(self, device: torch.device | str) -> FlowSchedule:
        return self  # plain numbers, nothing to move

    def shift_for(self, voxels: int) -> float:
        """The shift s for latents of ``voxels`` spatial elements (d h w, channels excluded).

        SD3 (section 5.3.2) matches the noise level of an n-value image at t_n to an m-value one at t_m
        with s = sqrt(m / n): the same argument on voxels gives s = base * sqrt(voxels / reference).
        MAISI's RFlowScheduler scales by the linear size ratio (voxels / reference) ** (1/3) instead; with
        the reference at the training resolution both give the base shift there.
        """
        if self.shift_reference <= 0:
            return self.shift
        return self.shift * math.sqrt(voxels / self.shift_reference)


def shift_time(t: torch.Tensor | float, s: float) -> torch.Tensor | float:
    """SD3 / MAISI timestep shift t' = s t / (1 + (s - 1) t): keeps 0 and 1, s > 1 moves t towards noise."""
    return s * t / (1 + (s - 1) * t)


def _check(cfg: DiffusionConfig) -> None:
    if cfg.objective not in ("ddpm", "flow"):
        raise ConfigError(f"unknown diffusion objective {cfg.objective!r}; choose 'ddpm' or 'flow'")
    if cfg.loss not in ("l1", "l2"):
        raise ConfigError(f"unknown loss {cfg.loss!r}; choose 'l1' or 'l2'")
    if cfg.loss_weighting not in ("none", "min_snr"):
        raise ConfigError(f"unknown loss_weighting {cfg.loss_weighting!r}; choose 'none' or 'min_snr'")
    if cfg.loss_weighting == "min_snr" and cfg.objective == "flow":
        raise ConfigError(
            "loss_weighting 'min_snr' is for the DDPM objective; flow matching weights timesteps through "
            "flow_t_sampling and flow_shift (set loss_weighting to 'none')"
        )
    if not cfg.min_snr_gamma > 0:
        raise ConfigError(f"min_snr_gamma must be > 0, got {cfg.min_snr_gamma}")
    if cfg.flow_t_sampling not in ("logit_normal", "uniform"):
        raise ConfigError(
            f"unknown flow_t_sampling {cfg.flow_t_sampling!r}; choose 'logit_normal' or 'uniform'"
        )
    if not cfg.flow_logit_std > 0:
        raise ConfigError(f"flow_logit_std must be > 0, got {cfg.flow_logit_std}")
    if not cfg.flow_shift > 0 or cfg.flow_shift_reference < 0:
        raise ConfigError(
            f"flow_shift must be > 0 and flow_shift_reference >= 0 (0: no resolution scaling), got "
            f"{cfg.flow_shift} and {cfg.flow_shift_reference}"
        )


def make_schedule(cfg: DiffusionConfig) -> Schedule | FlowSchedule:
    """The DDPM noise schedule, or the flow objective's :class:`FlowSchedule`; validates ``cfg``."""
    _check(cfg)
    T = cfg.timesteps
    if cfg.objective == "flow":
        if T < 2:
            raise ConfigError(f"diffusion timesteps must be >= 2 (the network's time scale), got {T}")
        return FlowSchedule(T=T, shift=cfg.flow_shift, shift_reference=cfg.flow_shift_reference)
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


def min_snr_weight(prediction: str, abar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the target of ``prediction``; abar (B,).

    SNR = abar / (1 - abar). The paper weights the x0 error by min(SNR, gamma); with
    ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2 the same
    weighting reads min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v. Derived for L2;
    with the L1 loss the same weights are applied per sample as a heuristic.
    """
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    raise ConfigError(f"unknown prediction {prediction!r}; choose 'eps', 'x0' or 'v'")


def flow_sample_t(cfg: DiffusionConfig, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n training times in (0, 1), float64 on the CPU, before the shift: logit-normal or uniform."""
    if cfg.flow_t_sampling == "logit_normal":
        u = torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.sigmoid(cfg.flow_logit_mean + cfg.flow_logit_std * u)
    if cfg.flow_t_sampling == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    raise ConfigError(f"unknown flow_t_sampling {cfg.flow_t_sampling!r}; choose 'logit_normal' or 'uniform'")


def _loss(pred: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None) -> torch.Tensor:
    err = pred.float() - target.float()
    if kind == "l1":
        err = err.abs()
    elif kind == "l2":
        err = err**2
    else:
        raise ConfigError(f"unknown loss {kind!r}; choose 'l1' or 'l2'")
    if weight is None:
        return err.mean()
    return (err.flatten(1).mean(1) * weight.to(err)).mean()  # per-sample mean, then the weighted batch mean


def diffusion_loss(
    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sched: Schedule | FlowSchedule,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The training objective: draw t and noise, run ``net(x_t, t)``, L1 or L2 to the target.

    x0 (B, C, d, h, w). DDPM: integer t (B,), target of ``cfg.prediction``, optional Min-SNR weights.
    Flow: t from :func:`flow_sample_t`, shifted for x0's voxel count; the net gets t * (T - 1) as float
    (B,) and the target is the velocity noise - x0. ``net`` closes over the conditions (and their dropout
    for classifier-free guidance).
    """
    if cfg.objective != sched.objective:
        raise ConfigError(
            f"objective {cfg.objective!r} needs its own schedule, got a {sched.objective!r} one"
        )
    B = x0.shape[0]
    if isinstance(sched, FlowSchedule):
        s = sched.shift_for(math.prod(x0.shape[2:]))
        t = shift_time(flow_sample_t(cfg, B, generator), s).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        tb = _bcast(t, x0)
        pred = net((1 - tb) * x0 + tb * noise, (t * sched.time_scale).float())
        return _loss(pred, noise - x0, cfg.loss, None)
    t = torch.randint(0, sched.T, (B,), generator=generator, device="cpu").to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
    a = _bcast(sched.abar(t), x0)
    pred = net(q_sample(sched, x0, t, noise), t)
    target = training_target(cfg.prediction, x0, noise, a)
    weight = None
    if cfg.loss_weighting == "min_snr":
        weight = min_snr_weight(cfg.prediction, sched.abar(t), cfg.min_snr_gamma)
    return _loss(pred, target, cfg.loss, weight)
