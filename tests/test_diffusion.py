from __future__ import annotations

import pytest
import torch

from lad_fast.config import DiffusionConfig
from lad_fast.diffusion import diffusion_loss, make_schedule, q_sample, to_x0_eps, training_target


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


def test_loss_is_zero_for_the_oracle_and_positive_otherwise():
    s = make_schedule(DiffusionConfig(timesteps=20))
    x0 = torch.randn(4, 2, 3)

    def oracle(xt, t):
        a = s.abar(t).float()[:, None, None]
        return (xt - a.sqrt() * x0) / (1 - a).sqrt()

    cfg = DiffusionConfig(timesteps=20)
    assert diffusion_loss(oracle, x0, s, cfg, torch.Generator().manual_seed(0)).item() < 1e-4
    assert diffusion_loss(lambda xt, t: xt * 0, x0, s, cfg, torch.Generator().manual_seed(0)).item() > 0.3
