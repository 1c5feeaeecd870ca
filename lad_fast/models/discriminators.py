"""PatchGAN discriminators for the VQ-GAN: one class for 2D axial slices and 3D volumes.

Lad (after Medical Diffusion) trains a 2D discriminator on a random axial slice and a 3D discriminator
on the whole volume, both with hinge loss, plus feature matching on their intermediate features; so
``forward`` returns the patch logits and the features of every hidden layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lad_fast.errors import ConfigError


def _norm(ch: int) -> nn.GroupNorm:
    # GroupNorm rather than pix2pix's BatchNorm: batches are 1-2 volumes per GPU and DDP needs no sync.
    return nn.GroupNorm(math.gcd(8, ch), ch)


class PatchDiscriminator(nn.Module):
    """PatchGAN over 2D slices (``spatial_dims=2``) or 3D volumes (``spatial_dims=3``).

    x (B, in_channels, *S) with every size in S at least 2 ** n_layers ->
    (logits (B, 1, *S / 2 ** n_layers), features: list of n_layers + 1 tensors (B, C_i, ...)).
    ``n_layers`` stride-2 4x4(x4) convs (channels, 2 channels, ... capped at 8 channels), then two
    stride-1 3x3(x3) convs; the last gives one logit per patch.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int = 1, channels: int = 64, n_layers: int = 3
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"PatchDiscriminator: spatial_dims must be 2 or 3, got {spatial_dims}")
        if channels < 1 or n_layers < 1:
            raise ConfigError(
                f"PatchDiscriminator: channels and n_layers must be >= 1, got {channels}, {n_layers}"
            )
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims, self.n_layers = spatial_dims, n_layers
        widths = [channels * min(2**i, 8) for i in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Sequential(conv(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2))]
        for i in range(1, n_layers):
            layers.append(
                nn.Sequential(conv(widths[i - 1], widths[i], 4, 2, 1), _norm(widths[i]), nn.LeakyReLU(0.2))
            )
        layers.append(
            nn.Sequential(
                conv(widths[n_layers - 1], widths[n_layers], 3, 1, 1),
                _norm(widths[n_layers]),
                nn.LeakyReLU(0.2),
            )
        )
        self.layers = nn.ModuleList(layers)
        self.head = conv(widths[n_layers], 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        need = 2**self.n_layers
        if x.ndim != self.spatial_dims + 2 or min(x.shape[2:]) < need:
            raise ConfigError(
                f"PatchDiscriminator({self.spatial_dims}D, n_layers={self.n_layers}): expected (B, C, "
                f"{'D, ' if self.spatial_dims == 3 else ''}H, W) with every size >= {need}, "
                f"got {tuple(x.shape)}; "
                "use fewer layers for small volumes"
            )
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return self.head(x), feats
