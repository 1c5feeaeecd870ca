"""PatchGAN discriminators: output and feature shapes in 2D and 3D, size checks."""

from __future__ import annotations

import pytest
import torch

from lad_fast.errors import ConfigError
from lad_fast.models.discriminators import PatchDiscriminator


@pytest.mark.parametrize(
    "dims,shape,logits",
    [
        (2, (2, 1, 16, 16), (2, 1, 2, 2)),
        (3, (2, 1, 8, 16, 16), (2, 1, 1, 2, 2)),
        (2, (1, 1, 64, 48), (1, 1, 8, 6)),
    ],
)
def test_output_and_feature_shapes(dims: int, shape: tuple[int, ...], logits: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    disc = PatchDiscriminator(dims, in_channels=1, channels=8, n_layers=3)
    out, feats = disc(torch.randn(shape))
    assert out.shape == logits
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    assert feats[-1].shape[2:] == out.shape[2:]


def test_channel_multiplier_is_capped_at_8() -> None:
    disc = PatchDiscriminator(2, channels=4, n_layers=5)
    _, feats = disc(torch.randn(1, 1, 32, 32))
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32, 32, 32]


def test_gradients_reach_input() -> None:
    disc = PatchDiscriminator(3, channels=8, n_layers=2)
    x = torch.randn(1, 1, 4, 8, 8, requires_grad=True)
    disc(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        PatchDiscriminator(1)
    with pytest.raises(ConfigError, match="every size >= 8"):
        PatchDiscriminator(3, channels=8)(torch.randn(1, 1, 4, 16, 16))
    with pytest.raises(ConfigError, match=r"expected \(B, C, H, W\)"):
        PatchDiscriminator(2, channels=8)(torch.randn(1, 1, 8, 16, 16))
