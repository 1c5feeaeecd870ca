"""The content head: the encoded mask latent reduced to Lad's content condition vector.

Lad (phase 2) projects the VQ-GAN latent of the mask rendered as an image through two stride-2
Conv3d (C_lat -> 4 -> 1); the official code builds them fresh and never trains them. Here the head is a
module of the U-Net, trained with it by default (``ConditionConfig.train_content``) or frozen at its
seeded initialisation to match the official behaviour reproducibly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lad_fast.errors import ConfigError, InputError


class ContentHead(nn.Module):
    """Encoded mask latent (B, C_lat, d, h, w) -> content condition (B, content_dim).

    Lad's shape family (two stride-2 Conv3d, C_lat -> 4 -> 1), then adaptive average pooling to a fixed
    grid so any geometry gives the same width, and a linear map to content_dim. Trained with the
    diffusion model.
    """

    def __init__(
        self, latent_channels: int, content_dim: int, hidden: int = 4, pool: tuple[int, int, int] = (2, 8, 8)
    ) -> None:
        super().__init__()
        if latent_channels < 1 or content_dim < 1 or hidden < 1:
            raise ConfigError(
                f"ContentHead needs positive sizes, got latent_channels={latent_channels}, "
                f"content_dim={content_dim}, hidden={hidden}"
            )
        self.conv1 = nn.Conv3d(latent_channels, hidden, 3, stride=2, padding=1)
        self.conv2 = nn.Conv3d(hidden, 1, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool3d(pool)
        self.proj = nn.Linear(pool[0] * pool[1] * pool[2], content_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.conv1.in_channels:
            raise InputError(
                f"ContentHead expects (B, {self.conv1.in_channels}, d, h, w), got {tuple(z.shape)}"
            )
        x = self.conv2(F.silu(self.conv1(z)))  # (B, 1, ~d/4, ~h/4, ~w/4)
        return self.proj(self.pool(x).flatten(1))  # (B, content_dim)
