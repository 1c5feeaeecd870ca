"""A small 3D U-Net organ segmenter: Lad's "predicted organ masks" without an external tool.

image (B, 1, D, H, W) in [-1, 1] -> logits (B, K, D, H, W) over the canonical organs of
:mod:`lad_fast.data.labels` (K = NUM_CLASSES). D, H and W must be divisible by 2 ** (levels - 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.config import SegmenterConfig
from lad_fast.errors import ConfigError
from lad_fast.models.blocks import Downsample3d, ResBlock3d, Upsample3d, check_impl, group_norm


class Segmenter(nn.Module):
    def __init__(self, cfg: SegmenterConfig, num_classes: int, in_channels: int = 1, impl: str = "auto"):
        super().__init__()
        self.impl = check_impl(impl)
        self.cfg, self.num_classes = cfg, num_classes
        ch = cfg.channels
        self.stem = nn.Conv3d(in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        for i, c in enumerate(ch):
            self.down.append(ResBlock3d(ch[i - 1] if i else ch[0], c, cfg.groups, impl=impl))
            if i + 1 < len(ch):
                self.pool.append(Downsample3d(c, impl=impl))
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i in range(len(ch) - 2, -1, -1):
            self.unpool.append(Upsample3d(ch[i + 1], ch[i], impl=impl))
            self.up.append(ResBlock3d(2 * ch[i], ch[i], cfg.groups, impl=impl))
        self.norm_out = group_norm(ch[0], cfg.groups)
        self.head = nn.Conv3d(ch[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.cfg.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or any(s % self.divisor for s in x.shape[2:]):
            raise ConfigError(
                f"Segmenter: expected (B, C, D, H, W) with D, H, W divisible by {self.divisor}, "
                f"got {tuple(x.shape)}"
            )
        return self.decode(*self.encode(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(bottleneck (B, C_last, D/f, H/f, W/f), skips finest first): the encoder half of ``forward``
        (self-supervised pretraining puts a rotation head on the bottleneck, lad_fast.ssl)."""
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h)
            if i < len(self.pool):
                skips.append(h)
                h = self.pool[i](h)
        return h, skips

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, K, D, H, W) from :meth:`encode`'s outputs (``skips`` is consumed)."""
        for unpool, block in zip(self.unpool, self.up, strict=True):
            h = block(torch.cat([unpool(h), skips.pop()], dim=1))
        return self.head(F.silu(self.norm_out(h)))

    def encoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale encoder features (a perceptual feature network trained on CT, offline)."""
        h = self.stem(x)
        feats = []
        for i, block in enumerate(self.down):
            h = block(h)
            feats.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        return feats

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Label map (B, D, H, W) uint8: argmax of the logits."""
        return self.forward(x).argmax(1).to(torch.uint8)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over the foreground classes present in the batch, plus cross-entropy.

    logits (B, K, D, H, W), target (B, D, H, W) integer. Cross-entropy keeps small organs learning early;
    Dice balances them against the liver later.
    """
    k = logits.shape[1]
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target.long(), k).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims)[1:] > 0
    dice = (2 * inter + eps) / (denom + eps)
    dice_fg = dice[1:][present].mean() if present.any() else dice.new_tensor(1.0)
    return F.cross_entropy(logits.float(), target.long()) + (1 - dice_fg)


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard Dice per class (K,), NaN where the class is absent from both."""
    out = torch.full((num_classes,), float("nan"))
    for c in range(num_classes):
        p, t = pred == c, target == c
        total = p.sum() + t.sum()
        if total > 0:
            out[c] = 2.0 * (p & t).sum().float() / total.float()
    return out
