"""Samplers against a toy Gaussian data set whose optimal denoiser is known in closed form."""

from __future__ import annotations

import pytest
import torch

from lad_fast.config import DiffusionConfig
from lad_fast.diffusion import make_schedule
from lad_fast.errors import ConfigError
from lad_fast.samplers import guided_denoiser, sample, sample_ddim, sample_ddpm, timesteps

MU, STD = 0.2, 0.3  # data: x0 ~ N(MU, STD^2) per element, well inside [-1, 1]
SCHED = make_schedule(DiffusionConfig(timesteps=300))


def optimal_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for Gaussian data: x_t ~ N(a MU, a^2 STD^2 + b^2)."""
    abar = SCHED.abar(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    a, b = abar.sqrt(), (1 - abar).sqrt()
    return b * (x - a * MU) / (a**2 * STD**2 + b**2)


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


# (sampler, kwargs, tolerance on mean, tolerance on std): 8 samples x 4096 elements = 32768 draws,
# so the sampling error of the mean is about STD / 181 = 0.0017; the rest is discretisation error.
CASES = [
    ("ddpm", {}, 0.01, 0.01),
    ("ddim", {"steps": 50, "eta": 0.0}, 0.01, 0.02),
    ("ddim", {"steps": 100, "eta": 1.0}, 0.01, 0.02),
    ("dpmpp2m", {"steps": 20}, 0.01, 0.015),
]


@pytest.mark.parametrize(("name", "kwargs", "tol_mean", "tol_std"), CASES)
def test_sampler_recovers_mean_and_variance(name, kwargs, tol_mean, tol_std):
    x = sample(name, optimal_eps, SCHED, (4096,), gens(8), clip=False, **kwargs)
    assert abs(x.mean().item() - MU) < tol_mean
    assert abs(x.std().item() - STD) < tol_std


def test_ddim_eta1_all_steps_is_ancestral_ddpm():
    # Same generators, so the same noise draws: the two update rules must agree step by step.
    a = sample_ddim(optimal_eps, SCHED, (256,), gens(4), steps=SCHED.T, eta=1.0, clip=True)
    b = sample_ddpm(optimal_eps, SCHED, (256,), gens(4), clip=True)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # ... and in distribution over independent seeds
    c = sample_ddpm(optimal_eps, SCHED, (4096,), gens(8, seed=1), clip=False)
    d = sample_ddim(optimal_eps, SCHED, (4096,), gens(8, seed=2), steps=SCHED.T, eta=1.0, clip=False)
    assert abs(c.mean() - d.mean()) < 0.01 and abs(c.std() - d.std()) < 0.01


def test_one_seed_same_sample_whatever_the_batch():
    g_all = gens(4)
    batch = sample("ddim", optimal_eps, SCHED, (3, 5), g_all, steps=10, eta=0.5)
    alone = sample("ddim", optimal_eps, SCHED, (3, 5), [torch.Generator().manual_seed(2)], steps=10, eta=0.5)
    torch.testing.assert_close(batch[2:3], alone)


def test_guidance_batches_branches_and_combines():
    calls = []

    def net(x, t, c):
        calls.append(x.shape[0])
        return x * 0 + c

    cond, null = torch.full((2, 1), 3.0), torch.full((2, 1), 1.0)
    out = guided_denoiser(net, (cond,), (null,), scale=2.0)(
        torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    )
    assert calls == [4]  # one forward pass of both branches
    torch.testing.assert_close(out, torch.full((2, 1), 5.0))  # 1 + 2 * (3 - 1)
    assert (
        guided_denoiser(net, (cond,), (null,), 0.0)(torch.zeros(2, 1), torch.zeros(2)).unique().item() == 1.0
    )


def test_timesteps_cover_the_range():
    assert timesteps(300, 300) == list(range(299, -1, -1))
    ts = timesteps(300, 50)
    assert ts[0] == 299 and ts[-1] == 0 and len(set(ts)) == 50


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: timesteps(300, 301), "steps must be between 1 and T=300, got 301"),
        (lambda: timesteps(300, 0), "steps must be between 1 and T=300, got 0"),
        (lambda: guided_denoiser(None, (), (), -0.5), "guidance scale must be >= 0, got -0.5"),
        (lambda: sample("euler", None, SCHED, (1,), gens(1)), "unknown sampler 'euler'"),
        (lambda: make_schedule(DiffusionConfig(schedule="sigmoid")), "unknown schedule 'sigmoid'"),
    ],
)
def test_bad_arguments_are_explained(call, message):
    with pytest.raises(ConfigError, match=message):
        call()
