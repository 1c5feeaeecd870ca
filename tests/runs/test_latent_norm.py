from __future__ import annotations

import pytest
import torch

from lad_fast.diffusion.samplers import _clip
from lad_fast.errors import ConfigError
from lad_fast.runs.loading import clip_bounds, denormalize_latents, latent_norm, normalize_latents


def latents() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 0.4, 0.2])[None, :, None, None, None]
    return (torch.randn(6, 3, 2, 4, 4, generator=g) * scale - 0.3).clamp(-1, 1)


def test_channel_norm_standardises_and_inverts():
    lat = latents()
    norm = latent_norm(lat, "channel")
    z = normalize_latents(lat, norm)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3, 4)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3, 4)), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(denormalize_latents(z, norm), lat, atol=1e-6, rtol=0)


def test_clip_bounds_are_the_unit_range_in_normalised_space():
    lat = latents()
    norm = latent_norm(lat, "channel")
    lo, hi = clip_bounds(norm, lat)
    torch.testing.assert_close(
        denormalize_latents(lo.expand(1, 3, 2, 4, 4), norm), -torch.ones(1, 3, 2, 4, 4)
    )
    torch.testing.assert_close(denormalize_latents(hi.expand(1, 3, 2, 4, 4), norm), torch.ones(1, 3, 2, 4, 4))
    wild = torch.full((1, 3, 2, 4, 4), 100.0)
    torch.testing.assert_close(_clip(wild, (lo, hi)), hi.expand_as(wild))
    assert clip_bounds(None, lat) is True and denormalize_latents(lat, None) is lat


def test_none_is_the_identity_and_unknown_modes_are_named():
    lat = latents()
    torch.testing.assert_close(normalize_latents(lat, latent_norm(lat, "none")), lat)
    with pytest.raises(ConfigError, match="diffusion.latent_norm must be 'channel' or 'none', got 'batch'"):
        latent_norm(lat, "batch")
