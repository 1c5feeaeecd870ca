from __future__ import annotations

import pytest
import torch

from lad_fast.config import DiffusionConfig
from lad_fast.diffusion.schedules import (
    FlowSchedule,
    diffusion_loss,
    flow_sample_t,
    make_schedule,
    min_snr_weight,
    q_sample,
    shift_time,
    to_x0_eps,
    training_target,
)
from lad_fast.errors import ConfigError


def test_cosine_schedule_is_monotone_and_ends_near_zero():
    s = make_schedule(DiffusionConfig(timesteps=300))
    abar = s.alphas_cumprod
    assert abar.shape == (300,) and (abar[1:] < abar[:-1]).all()
    assert abar[0] > 0.999 and abar[-1] < 1e-3
    assert s.abar(torch.tensor([-1])).item() == 1.0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_invert(prediction):
    s = make_schedule(DiffusionConfig(timesteps=50))
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0, 20, 49])
    xt = q_sample(s, x0, t, eps)
    a = s.abar(t)[:, None]
    got_x0, got_eps = to_x0_eps(prediction, training_target(prediction, x0, eps, a), xt, a)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_oracle_and_positive_otherwise(prediction):
    s = make_schedule(DiffusionConfig(timesteps=20))
    x0 = torch.randn(4, 2, 3)

    def oracle(xt, t):  # knows x0, so recovers the noise from x_t, and returns this parameterisation
        a = s.abar(t).float()[:, None, None]
        eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
        return training_target(prediction, x0, eps, a)

    cfg = DiffusionConfig(timesteps=20, prediction=prediction)
    assert diffusion_loss(oracle, x0, s, cfg, torch.Generator().manual_seed(0)).item() < 1e-4
    assert diffusion_loss(lambda xt, t: xt * 0, x0, s, cfg, torch.Generator().manual_seed(0)).item() > 0.3


# abar = 0.64: sqrt(abar) = 0.8, sqrt(1 - abar) = 0.6. x0 = 1, eps = 2: x_t = 0.8 + 1.2 = 2.0 and
# v = 0.8 eps - 0.6 x0 = 1.0. Second column: x0 = -0.5, eps = 0.5: x_t = -0.4 + 0.3 = -0.1 and
# v = 0.4 + 0.3 = 0.7.
X0, EPS, ABAR = [1.0, -0.5], [2.0, 0.5], 0.64
XT, V = [2.0, -0.1], [1.0, 0.7]


@pytest.mark.parametrize(("prediction", "target"), [("eps", EPS), ("x0", X0), ("v", V)])
def test_parameterisations_match_hand_computed_values(prediction, target):
    t64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    a = t64(ABAR)
    torch.testing.assert_close(training_target(prediction, t64(X0), t64(EPS), a), t64(target))
    got_x0, got_eps = to_x0_eps(prediction, t64(target), t64(XT), a)
    torch.testing.assert_close(got_x0, t64(X0))
    torch.testing.assert_close(got_eps, t64(EPS))


def test_q_sample_matches_hand_computed_values():
    s = make_schedule(DiffusionConfig(timesteps=1000, schedule="linear"))
    assert s.betas[0].item() == pytest.approx(1e-4)  # abar_0 = 1 - beta_0
    one, two = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)
    assert q_sample(s, one, torch.tensor([0]), two).item() == pytest.approx(0.9999**0.5 + 0.01 * 2)


@pytest.mark.parametrize(
    ("prediction", "expected"),
    # abar 0.8 -> SNR 4, 0.9 -> SNR 9, 0.5 -> SNR 1; gamma 5 clips only SNR 9
    [("eps", [4 / 4, 5 / 9, 1 / 1]), ("x0", [4, 5, 1]), ("v", [4 / 5, 5 / 10, 1 / 2])],
)
def test_min_snr_weights_match_hand_computed_values(prediction, expected):
    abar = torch.tensor([0.8, 0.9, 0.5], dtype=torch.float64)
    torch.testing.assert_close(
        min_snr_weight(prediction, abar, 5.0), torch.tensor(expected, dtype=torch.float64)
    )


def test_min_snr_weighting_reweights_the_per_sample_loss():
    s = make_schedule(DiffusionConfig(timesteps=20))
    x0 = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(1))
    zero = lambda xt, t: xt * 0  # noqa: E731
    cfg = DiffusionConfig(timesteps=20, loss="l2", loss_weighting="min_snr", min_snr_gamma=2.0)
    got = diffusion_loss(zero, x0, s, cfg, torch.Generator().manual_seed(0))
    # the same draws by hand: t first, then the noise
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 20, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    abar = s.abar(t)
    snr = abar / (1 - abar)
    w = torch.minimum(snr, torch.full_like(snr, 2.0)) / snr
    assert (w < 1).any() and (w == 1).any()  # both regimes occur in this batch
    want = (w.float() * (noise**2).mean(dim=(1, 2))).mean()
    torch.testing.assert_close(got, want)
    plain = diffusion_loss(
        zero, x0, s, DiffusionConfig(timesteps=20, loss="l2"), torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(plain, (noise**2).mean())


def test_shift_matches_hand_computed_values():
    # s t / (1 + (s - 1) t)
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.25, 3.0) == pytest.approx(0.5)
    assert shift_time(0.5, 0.5) == pytest.approx(1 / 3)
    ends = shift_time(torch.tensor([0.0, 1.0]), 7.0)
    assert ends.tolist() == [0.0, 1.0]
    assert FlowSchedule(T=10, shift=1.5).shift_for(4096) == 1.5  # no reference: no resolution scaling
    assert FlowSchedule(T=10, shift=1.5, shift_reference=1024).shift_for(4096) == pytest.approx(3.0)
    assert FlowSchedule(T=10, shift=2.0, shift_reference=1024).shift_for(256) == pytest.approx(1.0)


def test_logit_normal_and_uniform_time_sampling_statistics():
    n = 20_000  # standard errors: mean std / 141, std std / 200
    cfg = DiffusionConfig(objective="flow", flow_logit_mean=0.5, flow_logit_std=0.8)
    t = flow_sample_t(cfg, n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.8) < 0.02
    u = flow_sample_t(DiffusionConfig(objective="flow", flow_t_sampling="uniform"), n, torch.Generator())
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003


def test_flow_loss_is_zero_for_the_oracle_velocity_and_uses_the_shift_and_time_scale():
    cfg = DiffusionConfig(timesteps=21, objective="flow", loss="l2", flow_shift=3.0)
    s = make_schedule(cfg)
    assert isinstance(s, FlowSchedule) and s.time_scale == 20.0
    x0 = torch.randn(64, 2, 3, generator=torch.Generator().manual_seed(1))
    seen = []

    def oracle(xt, t_net):
        seen.append(t_net)
        t = (t_net / 20.0)[:, None, None]
        return (xt - x0) / t  # x_t = x0 + t v

    assert diffusion_loss(oracle, x0, s, cfg, torch.Generator().manual_seed(0)).item() < 1e-8
    t = seen[0] / 20.0
    assert seen[0].dtype == torch.float32 and 0 < t.min() and t.max() < 1
    # the training times are the logit-normal draws, shifted with s = 3
    want = shift_time(flow_sample_t(cfg, 64, torch.Generator().manual_seed(0)), 3.0)
    torch.testing.assert_close(t.double(), want, atol=1e-6, rtol=1e-6)
    # the target is noise - x0: a network that predicts x0's negation misses it by the noise
    assert diffusion_loss(lambda xt, t: -x0, x0, s, cfg, torch.Generator().manual_seed(0)).item() > 0.5


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DiffusionConfig(objective="score"), "unknown diffusion objective 'score'; choose 'ddpm' or 'flow'"),
        (DiffusionConfig(loss="huber"), "unknown loss 'huber'; choose 'l1' or 'l2'"),
        (DiffusionConfig(loss_weighting="p2"), "unknown loss_weighting 'p2'; choose 'none' or 'min_snr'"),
        (DiffusionConfig(objective="flow", loss_weighting="min_snr"), "'min_snr' is for the DDPM objective"),
        (DiffusionConfig(min_snr_gamma=0.0), "min_snr_gamma must be > 0, got 0.0"),
        (DiffusionConfig(flow_t_sampling="beta"), "unknown flow_t_sampling 'beta'"),
        (DiffusionConfig(flow_logit_std=0.0), "flow_logit_std must be > 0, got 0.0"),
        (
            DiffusionConfig(flow_shift=0.0),
            r"flow_shift must be > 0 and flow_shift_reference >= 0 .*got 0.0 and 0",
        ),
        (DiffusionConfig(objective="flow", timesteps=1), "timesteps must be >= 2"),
    ],
)
def test_bad_diffusion_settings_are_explained(cfg, message):
    with pytest.raises(ConfigError, match=message):
        make_schedule(cfg)


def test_loss_refuses_a_schedule_of_the_other_objective():
    flow = make_schedule(DiffusionConfig(objective="flow"))
    with pytest.raises(ConfigError, match="objective 'ddpm' needs its own schedule, got a 'flow' one"):
        diffusion_loss(lambda x, t: x, torch.zeros(1, 2), flow, DiffusionConfig())
