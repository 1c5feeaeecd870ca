"""Samplers against a toy Gaussian data set whose optimal denoiser is known in closed form."""

from __future__ import annotations

import pytest
import torch

from lad_fast.config import DiffusionConfig
from lad_fast.diffusion.samplers import (
    check_sampler,
    flow_timesteps,
    guided_denoiser,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_flow_euler,
    sample_flow_heun,
    timesteps,
)
from lad_fast.diffusion.schedules import make_schedule
from lad_fast.errors import ConfigError

MU, STD = 0.2, 0.3  # data: x0 ~ N(MU, STD^2) per element, well inside [-1, 1]
SCHED = make_schedule(DiffusionConfig(timesteps=300))
FLOW = make_schedule(DiffusionConfig(timesteps=300, objective="flow"))


def _posterior(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[x0 | x], E[noise | x]) for x = a x0 + b noise, x0 ~ N(MU, STD^2), noise ~ N(0, 1)."""
    r = (x - a * MU) / (a**2 * STD**2 + b**2)
    return MU + a * STD**2 * r, b * r


def optimal(prediction: str):
    """The optimal DDPM denoiser of the toy data for ``prediction`` "eps", "x0" or "v" (closed form)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = SCHED.abar(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a, b = abar.sqrt(), (1 - abar).sqrt()
        x0, eps = _posterior(x, a, b)
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]

    return denoise


optimal_eps = optimal("eps")


def optimal_velocity(x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
    """E[noise - x0 | x_t] for x_t = (1 - t) x0 + t noise; the net's time input is t * (T - 1)."""
    assert t_net.dtype == torch.float32  # continuous time, not rounded to integer steps
    t = (t_net.double() / FLOW.time_scale).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    x0, noise = _posterior(x, 1 - t, t)
    return noise - x0


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


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize(("name", "kwargs", "tol_mean", "tol_std"), CASES)
def test_sampler_recovers_mean_and_variance(name, kwargs, tol_mean, tol_std, prediction):
    x = sample(
        name, optimal(prediction), SCHED, (4096,), gens(8), prediction=prediction, clip=False, **kwargs
    )
    assert abs(x.mean().item() - MU) < tol_mean
    assert abs(x.std().item() - STD) < tol_std


def test_a_wrong_parameterisation_misses_the_data():
    # the oracle above can fail: an x0-predicting net read as eps gives other statistics
    x = sample("ddim", optimal("x0"), SCHED, (4096,), gens(8), prediction="eps", clip=False, steps=50)
    assert abs(x.mean().item() - MU) > 0.05 or abs(x.std().item() - STD) > 0.05


# Flow: Euler with many steps, Heun with few, each also with the shift on (as the samplers use it). The
# error left is the last step's (Euler, by design): the toy's flow bends near t = 0, where x_t's std has
# its minimum, and a shift lengthens that step, hence more steps with it.
FLOW_CASES = [
    ("euler", 200, 1.0, 0.01, 0.01),
    ("euler", 300, 3.0, 0.01, 0.01),
    ("heun", 20, 1.0, 0.01, 0.01),
    ("heun", 40, 2.0, 0.01, 0.01),
]


@pytest.mark.parametrize(("name", "steps", "shift", "tol_mean", "tol_std"), FLOW_CASES)
def test_flow_sampler_recovers_mean_and_variance(name, steps, shift, tol_mean, tol_std):
    sched = make_schedule(DiffusionConfig(timesteps=300, objective="flow", flow_shift=shift))
    x = sample(name, optimal_velocity, sched, (4096,), gens(8), steps=steps, clip=False)
    assert abs(x.mean().item() - MU) < tol_mean
    assert abs(x.std().item() - STD) < tol_std


def exact_flow_endpoint(noise: torch.Tensor) -> torch.Tensor:
    """The flow ODE of Gaussian data is affine, x_t = (1 - t) MU + sqrt((1 - t)^2 STD^2 + t^2) z: from
    x_1 = z it ends at MU + STD z."""
    return MU + STD * noise


@pytest.mark.parametrize("steps", [8, 16])
def test_heun_is_more_accurate_than_euler_at_equal_steps(steps):
    noise = torch.stack([torch.randn(512, generator=g) for g in gens(2)])
    exact = exact_flow_endpoint(noise)
    err = {}
    for name, fn in (("euler", sample_flow_euler), ("heun", sample_flow_heun)):
        x = fn(optimal_velocity, FLOW, (512,), gens(2), steps=steps, clip=False, dtype=torch.float64)
        err[name] = (x - exact).abs().max().item()
    assert err["heun"] < err["euler"] / 2, err  # measured: 2.8x at 8 steps, 6.3x at 16
    assert err["euler"] > 1e-3, err  # Euler's error is visible at these steps: the comparison means something


def test_heun_converges_at_second_order_and_euler_at_first():
    noise = torch.stack([torch.randn(256, generator=g) for g in gens(1)])
    exact = exact_flow_endpoint(noise)

    def err(fn, steps):
        x = fn(optimal_velocity, FLOW, (256,), gens(1), steps=steps, clip=False, dtype=torch.float64)
        return (x - exact).abs().max().item()

    # halving the step size: Euler's error halves, Heun's (its last step is Euler, on a short step) shrinks
    # by more than three
    assert 1.6 < err(sample_flow_euler, 16) / err(sample_flow_euler, 32) < 2.5
    assert err(sample_flow_heun, 16) / err(sample_flow_heun, 32) > 3.0


def test_flow_clipping_bounds_the_result_and_uses_continuous_time():
    seen = []

    def wide(x, t):  # data at +-5: far outside [-1, 1]
        seen.append(t)
        tt = (t.double() / FLOW.time_scale).to(x.dtype)[:, None]
        return (x - 5.0 * torch.sign(x)) / tt  # v = (x - x0) / t with x0 = 5 sign(x)

    x = sample_flow_euler(wide, FLOW, (64,), gens(2), steps=5, clip=True)
    assert x.abs().max() <= 1 + 1e-6 and (x.abs() > 0.99).float().mean() > 0.9
    assert [round(t[0].item(), 4) for t in seen] == [round(299 * (1 - k / 5), 4) for k in range(5)]
    lo, hi = torch.full((64,), -0.5), torch.full((64,), 0.25)
    y = sample_flow_heun(wide, FLOW, (64,), gens(2), steps=3, clip=(lo, hi))
    assert y.min() >= -0.5 - 1e-6 and y.max() <= 0.25 + 1e-6


def test_flow_samplers_count_network_evaluations_and_are_batch_invariant():
    calls = []

    def counting(x, t):
        calls.append(x.shape[0])
        return optimal_velocity(x, t)

    sample("euler", counting, FLOW, (3, 5), gens(4), steps=6)
    assert len(calls) == 6
    calls.clear()
    batch = sample("heun", counting, FLOW, (3, 5), gens(4), steps=6)
    assert len(calls) == 2 * 6 - 1  # the last step is Euler
    alone = sample("heun", optimal_velocity, FLOW, (3, 5), [torch.Generator().manual_seed(2)], steps=6)
    torch.testing.assert_close(batch[2:3], alone)


def test_flow_timesteps_are_shifted_towards_noise():
    assert flow_timesteps(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    # s = 3: t' = 3 t / (1 + 2 t): 0.75 -> 0.9, 0.5 -> 0.75, 0.25 -> 0.5
    assert flow_timesteps(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


def test_flow_sampler_shift_follows_the_latent_size():
    # reference 64 voxels, base 1.5: a (1, 4, 8, 8) latent has 256 voxels -> s = 1.5 * sqrt(4) = 3
    sched = make_schedule(
        DiffusionConfig(timesteps=11, objective="flow", flow_shift=1.5, flow_shift_reference=64)
    )
    seen = []
    sample("euler", lambda x, t: seen.append(t[0].item()) or x * 0, sched, (1, 4, 8, 8), gens(1), steps=4)
    assert seen == pytest.approx([10 * t for t in (1.0, 0.9, 0.75, 0.5)])


@pytest.mark.parametrize(
    ("name", "objective", "message"),
    [
        ("ddim", "flow", "sampler 'ddim' does not fit this model, trained with objective 'flow'; "
         "use --sampler euler or heun"),
        ("euler", "ddpm", "sampler 'euler' does not fit this model, trained with objective 'ddpm'; "
         "use --sampler ddpm or ddim or dpmpp2m"),
        ("rk4", "flow", "unknown sampler 'rk4'; choose one of: ddpm, ddim, dpmpp2m, euler, heun"),
        ("heun", "score", "unknown diffusion objective 'score'"),
    ],
)  # fmt: skip
def test_check_sampler_refuses_a_sampler_of_the_other_objective(name, objective, message):
    with pytest.raises(ConfigError, match=message):
        check_sampler(name, objective)


def test_sample_checks_the_sampler_against_the_schedule():
    check_sampler("heun", "flow")
    check_sampler("dpmpp2m", "ddpm")
    with pytest.raises(ConfigError, match="sampler 'heun' does not fit .* objective 'ddpm'"):
        sample("heun", optimal_eps, SCHED, (1,), gens(1))
    with pytest.raises(ConfigError, match="sampler 'ddim' does not fit .* objective 'flow'"):
        sample("ddim", optimal_velocity, FLOW, (1,), gens(1))


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
        (lambda: sample("euler2", None, SCHED, (1,), gens(1)), "unknown sampler 'euler2'"),
        (lambda: flow_timesteps(0), "steps must be at least 1, got 0"),
        (lambda: sample_flow_euler(None, SCHED, (1,), gens(1)), "the flow samplers need a FlowSchedule"),
        (lambda: make_schedule(DiffusionConfig(schedule="sigmoid")), "unknown schedule 'sigmoid'"),
    ],
)
def test_bad_arguments_are_explained(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_per_sample_noise_is_each_generators_own_draw():
    """Sample i is exactly generators[i]'s draw (written in place, then cast), whatever the batch."""
    from lad_fast.diffusion.samplers import per_sample_noise

    shape = (2, 3, 4, 5)
    noise = per_sample_noise([torch.Generator().manual_seed(s) for s in (3, 9)], shape, "cpu", torch.float16)
    assert noise.shape == (2, *shape) and noise.dtype == torch.float16
    for i, seed in enumerate((3, 9)):
        expected = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).half()
        assert torch.equal(noise[i], expected)


def test_one_row_at_a_time_makes_a_batch_dependent_net_batch_invariant():
    from lad_fast.diffusion.samplers import one_row_at_a_time

    calls = []

    def net(x, t, c):  # rounds differently with the batch it sees, like a kernel tuned per batch size
        calls.append(x.shape[0])
        return x * (1 + 1e-3 * x.shape[0]) + c * t.view(-1, 1)

    x, t, c = torch.randn(3, 4), torch.tensor([1.0, 2.0, 3.0]), torch.randn(3, 4)
    rows = one_row_at_a_time(net)
    out = rows(x, t, c)
    assert calls == [1, 1, 1]
    assert not torch.equal(net(x, t, c), out)  # the plain net depends on its batch ...
    for i in range(3):  # ... the row-wise one gives each row what it gives that row alone, bit for bit
        assert torch.equal(out[i], rows(x[i : i + 1], t[i : i + 1], c[i : i + 1])[0])
    assert torch.equal(rows(x[[2, 0]], t[[2, 0]], c[[2, 0]])[1], out[0])
    scalar_t = one_row_at_a_time(lambda x, t, c: x * t + c)(x, torch.tensor(2.0), c)
    assert torch.equal(scalar_t, x * 2.0 + c)
