"""Pure sampling functions over any denoiser backend.

``clip`` bounds the x0 prediction: True for [-1, 1] (Lad), False for none, or per-element (lo, hi)
tensors broadcast against x (standardised latents, whose [-1, 1] range differs per channel).

A denoiser is ``denoise(x, t) -> prediction`` (x (B, C, d, h, w), t (B,)), returning the network's
parameterisation: for the DDPM objective t is int64 and the prediction "eps", "x0" or "v"; for the flow
objective (:func:`sample_flow_euler`, :func:`sample_flow_heun`) t is float32 on the DDPM scale,
t_flow * (T - 1), and the prediction the velocity noise - x0 (see lad_fast/diffusion/schedules.py).
:func:`check_sampler` says which samplers fit which objective. Conditions are closed over by
:func:`guided_denoiser`, which runs the conditional and the null branch of classifier-free guidance as
one batch. Noise comes from one
``torch.Generator`` per sample, so a sample never depends on the batch it was drawn in (EDM practice).
The samplers never touch files or the VQ-GAN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lad_fast.diffusion.schedules import FlowSchedule, Schedule, shift_time, to_x0_eps
from lad_fast.errors import ConfigError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_denoiser(
    net: Callable[..., torch.Tensor],
    cond: Sequence[torch.Tensor],
    null: Sequence[torch.Tensor],
    scale: float,
) -> Denoiser:
    """``null + scale * (cond - null)`` with both branches in one forward pass of ``net(x, t, *cond)``.

    Scale 1 is the plain conditional model (the official Lad setting), 0 the unconditional one.
    """
    if scale < 0:
        raise ConfigError(f"guidance scale must be >= 0, got {scale}")
    if scale == 1.0:
        return lambda x, t: net(x, t, *cond)
    if scale == 0.0:
        return lambda x, t: net(x, t, *null)
    both = tuple(torch.cat([c, n]) for c, n in zip(cond, null, strict=True))

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_c, out_n = net(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
        return out_n + scale * (out_c - out_n)

    return denoise


def one_row_at_a_time(net: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``net(x, t, *cond)`` evaluated on one batch row at a time, the rows concatenated.

    Batched kernels (oneDNN on a CPU, cuDNN or cuBLAS on a GPU) may pick another algorithm, and so round
    differently, for another batch size: on some CPUs a DDIM sample then differs by 1e-4 between batch 1
    and batch 3. Evaluated alone, every row runs the same arithmetic whatever batch it was drawn in, so a
    seed gives the same sample bit for bit. x (B, ...), t (B,) or a scalar, each cond (B, ...).
    """

    def rows(x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                net(x[i : i + 1], t[i : i + 1] if t.ndim else t, *(c[i : i + 1] for c in cond))
                for i in range(x.shape[0])
            ]
        )

    return rows


def per_sample_noise(
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(len(generators), *shape) standard normal noise, sample i drawn from generators[i].

    Generators on the target device draw there (no copy). CPU generators (the reproducible default)
    draw on the CPU; for a CUDA target the draws land in pinned memory and are copied asynchronously,
    so the host goes on launching the next step instead of waiting for the GPU to finish this one.
    """
    device = torch.device(device)
    shape = tuple(shape)
    if device.type != "cpu" and all(g.device.type == device.type for g in generators):
        draws = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
        return torch.stack(draws).to(device=device, dtype=dtype)
    pinned = device.type == "cuda"
    noise = torch.empty((len(generators), *shape), dtype=torch.float32, pin_memory=pinned)
    for i, g in enumerate(generators):
        torch.randn(shape, generator=g, dtype=torch.float32, out=noise[i])
    return noise.to(device=device, non_blocking=pinned).to(dtype)


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` integer timesteps from T-1 down to 0, evenly spaced (all T when steps == T)."""
    if not 1 <= steps <= T:
        raise ConfigError(f"steps must be between 1 and T={T}, got {steps}")
    if steps == 1:
        return [T - 1]
    return [round((T - 1) * (1 - i / (steps - 1))) for i in range(steps)]


Clip = bool | tuple[torch.Tensor, torch.Tensor]


def _clip(x0: torch.Tensor, clip: Clip) -> torch.Tensor:
    if clip is True:
        return x0.clamp(-1, 1)
    lo, hi = clip  # type: ignore[misc]
    return torch.maximum(torch.minimum(x0, hi.to(x0)), lo.to(x0))


def _predict(denoise: Denoiser, prediction: str, x: torch.Tensor, t: int, abar: torch.Tensor, clip: Clip):
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    a = abar.to(x.dtype)
    x0, eps = to_x0_eps(prediction, denoise(x, tt).to(x.dtype), x, a)
    if clip is not False:  # Lad clips x0 to [-1, 1]; eps is made consistent with the clipped x0
        x0 = _clip(x0, clip)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return x0, eps


def sample_ddim(
    denoise: Denoiser,
    sched: Schedule,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    prediction: str = "eps",
    steps: int = 50,
    eta: float = 0.0,
    clip: Clip = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) over ``steps`` timesteps; eta = 1 with all T steps is ancestral DDPM.

    shape is one sample's (C, d, h, w); returns x0 of shape (len(generators), *shape).
    """
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    ts = timesteps(sched.T, steps)
    x = per_sample_noise(generators, shape, device, dtype)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a = sched.abar(torch.tensor(t))
        a_prev = sched.abar(torch.tensor(t_prev))
        x0, eps = _predict(denoise, prediction, x, t, a, clip)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        dir_coef = (1 - a_prev - sigma**2).clamp_min(0).sqrt()
        x = a_prev.sqrt().to(dtype) * x0 + dir_coef.to(dtype) * eps
        if t_prev >= 0 and sigma > 0:
            x = x + sigma.to(dtype) * per_sample_noise(generators, shape, device, dtype)
        if callback is not None:
            callback(i + 1, len(ts))
    return x


def sample_ddpm(
    denoise: Denoiser,
    sched: Schedule,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    prediction: str = "eps",
    clip: Clip = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    **_: object,
) -> torch.Tensor:
    """Ancestral DDPM over all T steps with the posterior mean and variance (the official Lad sampler)."""
    x = per_sample_noise(generators, shape, device, dtype)
    for i, t in enumerate(range(sched.T - 1, -1, -1)):
        a = sched.abar(torch.tensor(t))
        a_prev = sched.abar(torch.tensor(t - 1))
        beta = sched.betas[t]
        x0, _ = _predict(denoise, prediction, x, t, a, clip)
        # posterior q(x_{t-1} | x_t, x0): mean c0 x0 + ct x_t, variance beta (1 - a_prev) / (1 - a)
        c0 = a_prev.sqrt() * beta / (1 - a)
        ct = (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
        x = c0.to(dtype) * x0 + ct.to(dtype) * x
        if t > 0:
            var = beta * (1 - a_prev) / (1 - a)
            x = x + var.sqrt().to(dtype) * per_sample_noise(generators, shape, device, dtype)
        if callback is not None:
            callback(i + 1, sched.T)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    sched: Schedule,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    prediction: str = "eps",
    steps: int = 20,
    clip: Clip = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    **_: object,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic second-order multistep in data prediction.

    ``steps`` network evaluations; the last one, at t = 0, returns its x0 prediction.
    """
    ts = timesteps(sched.T, steps)
    x = per_sample_noise(generators, shape, device, dtype)

    def lam(a: torch.Tensor) -> torch.Tensor:  # log(alpha / sigma)
        return 0.5 * (a.log() - (1 - a).log())

    prev_x0: torch.Tensor | None = None
    h_prev = None
    for i, t in enumerate(ts):
        a = sched.abar(torch.tensor(t))
        x0, _ = _predict(denoise, prediction, x, t, a, clip)
        if callback is not None:
            callback(i + 1, len(ts))
        if i + 1 == len(ts):
            return x0
        a_next = sched.abar(torch.tensor(ts[i + 1]))
        h = lam(a_next) - lam(a)
        if prev_x0 is None or i + 2 == len(ts):  # first step, and the last step, are first order
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)).to(dtype) * x0 - (1 / (2 * r)).to(dtype) * prev_x0
        sigma_ratio = ((1 - a_next) / (1 - a)).sqrt()
        x = sigma_ratio.to(dtype) * x - (a_next.sqrt() * torch.expm1(-h)).to(dtype) * d
        prev_x0, h_prev = x0, h
    return x


def flow_timesteps(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` flow times from 1 (noise) down to 0 (data): evenly spaced, then shifted (s > 1 spends
    more of the steps near the noise end, as in training)."""
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    return [float(shift_time(1 - i / steps, shift)) for i in range(steps + 1)]


def _velocity(denoise: Denoiser, x: torch.Tensor, t: float, sched: FlowSchedule, clip: Clip) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t * sched.time_scale, dtype=torch.float32, device=x.device)
    v = denoise(x, tt).to(x.dtype)
    if clip is not False:  # x0 = x - t v is clipped; v is made consistent with it, v = (x - x0) / t
        x0 = _clip(x - t * v, clip)
        v = (x - x0) / t
    return v


def _flow(
    second_order: bool,
    denoise: Denoiser,
    sched: FlowSchedule,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    steps: int,
    clip: Clip,
    device: torch.device | str,
    dtype: torch.dtype,
    callback: Callable[[int, int], None] | None,
) -> torch.Tensor:
    if not isinstance(sched, FlowSchedule):
        raise ConfigError("the flow samplers need a FlowSchedule (a model trained with objective 'flow')")
    ts = flow_timesteps(steps, sched.shift_for(math.prod(shape[1:])))
    x = per_sample_noise(generators, shape, device, dtype)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = _velocity(denoise, x, t, sched, clip)
        if second_order and t_next > 0:  # Heun's trapezoid; the last step, to t = 0, stays Euler
            x_euler = x + (t_next - t) * v
            v = 0.5 * (v + _velocity(denoise, x_euler, t_next, sched, clip))
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i + 1, steps)
    return x


def sample_flow_euler(
    denoise: Denoiser,
    sched: FlowSchedule,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    steps: int = 30,
    clip: Clip = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    **_: object,
) -> torch.Tensor:
    """Euler integration of the flow ODE dx/dt = v from t = 1 to 0 over :func:`flow_timesteps`.

    ``steps`` network evaluations; shape is one sample's (C, d, h, w); returns x0 (len(generators), *shape).
    clip bounds each step's x0 = x - t v like the DDPM samplers do (the last step lands on that x0).
    ``prediction`` and ``eta`` are for the DDPM samplers and are ignored.
    """
    return _flow(False, denoise, sched, shape, generators, steps, clip, device, dtype, callback)


def sample_flow_heun(
    denoise: Denoiser,
    sched: FlowSchedule,
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    steps: int = 15,
    clip: Clip = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    **_: object,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, algorithm 1) on the flow ODE, the last step Euler.

    ``2 steps - 1`` network evaluations; otherwise as :func:`sample_flow_euler`.
    """
    return _flow(True, denoise, sched, shape, generators, steps, clip, device, dtype, callback)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp2m": sample_dpmpp_2m,
    "euler": sample_flow_euler,
    "heun": sample_flow_heun,
}
# Which samplers integrate which training objective (DiffusionConfig.objective).
OBJECTIVE_SAMPLERS: dict[str, tuple[str, ...]] = {
    "ddpm": ("ddpm", "ddim", "dpmpp2m"),
    "flow": ("euler", "heun"),
}


def check_sampler(name: str, objective: str) -> None:
    """Raise ConfigError unless sampler ``name`` exists and fits a model trained with ``objective``."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if objective not in OBJECTIVE_SAMPLERS:
        raise ConfigError(f"unknown diffusion objective {objective!r}; choose 'ddpm' or 'flow'")
    fits = OBJECTIVE_SAMPLERS[objective]
    if name not in fits:
        raise ConfigError(
            f"sampler {name!r} does not fit this model, trained with objective {objective!r}; "
            f"use --sampler {' or '.join(fits)}"
        )


def sample(name: str, denoise: Denoiser, sched: Schedule | FlowSchedule, *args: object, **kwargs: object):
    """Dispatch to one of :data:`SAMPLERS` by name, after :func:`check_sampler` against ``sched``."""
    check_sampler(name, sched.objective)
    return SAMPLERS[name](denoise, sched, *args, **kwargs)
