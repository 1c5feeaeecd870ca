"""The conditional 3D U-Net denoiser over VQ-GAN latents (Lad phase 2).

Conditioning follows Lad (docs/lad.md, "How the conditions reach the network"): a content condition (the
mask encoded by the frozen VQ-GAN encoder, then a trained :class:`~lad_fast.models.content.ContentHead`) and
a structure condition (Betti numbers, log1p-normalised) are embedded, concatenated with the time embedding
and turned into a FiLM scale/shift in every res block. Unlike the official code the content head is trained
(unless ``ConditionConfig.train_content`` is False: then it stays at its random initialisation, as the
official projection is untrained) and the null condition of classifier-free guidance is a learned embedding.

The condition embedding does not depend on x or t, so it is computed once per sample
(:meth:`LatentUNet.embed_condition`) and the per-step network is ``forward(x, t, cond_emb)``: cheaper
at every sampling step, and a three-tensor graph for ONNX / TensorRT export.

With ``ConditionConfig.spatial`` "concat" or "concat_fine" the network also takes the spatial condition
(:func:`lad_fast.conditioning.conditions.spatial_for`: the mask's organ fractions on the latent grid, or per
octant of
each latent voxel, zeros for the null branch of guidance), concatenated to x before the stem convolution
at every step; the per-step network is then ``forward(x, t, cond_emb, spatial)`` and its exported graph
has a fourth input. With "none" (the field's default; ``lad-official``) nothing changes: same parameters,
same graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.conditioning.conditions import spatial_channels
from lad_fast.config import ConditionConfig, UNetConfig
from lad_fast.errors import ConfigError
from lad_fast.kernels._cpu_conv import cpu_conv3d
from lad_fast.models.blocks import (
    AttentionBlock3d,
    Downsample3d,
    ResBlock3d,
    Upsample3d,
    check_impl,
    group_norm,
    keep_or_null,
    timestep_embedding,
)
from lad_fast.models.content import ContentHead


def _conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for an ``nn.Conv3d``, kept off ``slow_conv3d`` at CPU batch 1 (kernels/_cpu_conv.py)."""
    return cpu_conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)


class LatentUNet(nn.Module):
    """x (B, C, d, h, w), t (B,) int64, cond_emb (B, cond.embed_dim) [, spatial (B, K, d, h, w)]
    -> prediction (B, C, d, h, w).

    d, h and w must be divisible by 2 ** (len(cfg.multipliers) - 1). ``spatial`` is required when
    ``cond.spatial`` is not "none" (K = :attr:`spatial_channels`: NUM_CLASSES, or 8 NUM_CLASSES for
    "concat_fine") and refused otherwise.
    """

    def __init__(
        self,
        cfg: UNetConfig,
        cond: ConditionConfig,
        latent_channels: int,
        structure_dim: int,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if cfg.arch != "lad_fast":
            raise ConfigError(
                f"LatentUNet builds unet.arch='lad_fast', got {cfg.arch!r}; build the network with "
                "lad_fast.models.unet.build_unet, which picks the class for the arch"
            )
        self.impl = check_impl(impl)
        self.cfg, self.cond_cfg = cfg, cond
        self.latent_channels, self.structure_dim = latent_channels, structure_dim
        self.spatial_channels = spatial_channels(cond)  # 0 without spatial conditioning
        film = cfg.time_dim + cond.embed_dim

        # conditions: content head (trained unless train_content is off), structure MLP, null embedding
        self.content_head = ContentHead(latent_channels, cond.content_dim).requires_grad_(cond.train_content)
        self.cond_mlp = nn.Sequential(
            nn.Linear(cond.content_dim + structure_dim, cond.embed_dim),
            nn.SiLU(),
            nn.Linear(cond.embed_dim, cond.embed_dim),
        )
        self.null_emb = nn.Parameter(torch.randn(cond.embed_dim) * 0.02)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )

        chans = [cfg.channels * m for m in cfg.multipliers]
        self.stem = nn.Conv3d(latent_channels + self.spatial_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = []
        prev = chans[0]
        for level, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock3d(prev, ch, cfg.groups, film, cfg.dropout, impl))
                prev = ch
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock3d(ch, cfg.heads, cfg.head_dim, cfg.groups, impl))
            skip_ch.append(ch)
            if level + 1 < len(chans):
                blocks.append(Downsample3d(ch, impl=impl))
            self.down.append(blocks)
        self.mid = nn.ModuleList(
            [
                ResBlock3d(prev, prev, cfg.groups, film, cfg.dropout, impl),
                AttentionBlock3d(prev, cfg.heads, cfg.head_dim, cfg.groups, impl),
                ResBlock3d(prev, prev, cfg.groups, film, cfg.dropout, impl),
            ]
        )
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            ch = chans[level]
            blocks = nn.ModuleList(
                [ResBlock3d(prev + skip_ch[level], ch, cfg.groups, film, cfg.dropout, impl)]
            )
            prev = ch
            for _ in range(cfg.res_blocks - 1):
                blocks.append(ResBlock3d(ch, ch, cfg.groups, film, cfg.dropout, impl))
            if level in cfg.attention_levels:
                blocks.append(AttentionBlock3d(ch, cfg.heads, cfg.head_dim, cfg.groups, impl))
            if level > 0:
                blocks.append(Upsample3d(ch, chans[level - 1], impl=impl))
                prev = chans[level - 1]
            self.up.append(blocks)
        self.norm_out = group_norm(prev, cfg.groups)
        self.out = nn.Conv3d(prev, latent_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start as the zero predictor: stable early training
        nn.init.zeros_(self.out.bias)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.cfg.multipliers) - 1)

    def embed_condition(
        self, content: torch.Tensor, structure: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Condition embedding (B, embed_dim) from the encoded mask (B, C_lat, d, h, w) and the
        normalised structure vector (B, structure_dim). Where ``keep`` (B,) is 0 the learned null
        embedding replaces it (classifier-free guidance dropout in training)."""
        if structure.shape[-1] != self.structure_dim:
            raise ConfigError(
                f"structure condition has {structure.shape[-1]} values, the model was built for "
                f"{self.structure_dim} (a different slice count or structure_organs?)"
            )
        c = torch.cat([self.content_head(content), structure.to(content.dtype)], dim=-1)
        emb = self.cond_mlp(c)
        return keep_or_null(emb, keep, self.null_emb)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The learned null embedding repeated (batch, embed_dim)."""
        return self.null_emb[None].expand(batch, -1)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor, spatial: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.ndim != 5 or any(s % self.divisor for s in x.shape[2:]):
            raise ConfigError(
                f"LatentUNet: expected (B, C, d, h, w) with d, h, w divisible by {self.divisor}, "
                f"got {tuple(x.shape)}"
            )
        emb = torch.cat([self.time_mlp(timestep_embedding(t, self.cfg.time_dim)), cond_emb.to(x.dtype)], -1)
        h = _conv(self.stem, self._with_spatial(x, spatial))  # oneDNN at CPU batch 1, else the module's op
        skips = []
        for blocks in self.down:
            for block in blocks:
                if isinstance(block, Downsample3d):
                    skips.append(h)
                h = block(h, emb) if isinstance(block, ResBlock3d) else block(h)
            if not isinstance(blocks[-1], Downsample3d):
                skips.append(h)
        for block in self.mid:
            h = block(h, emb) if isinstance(block, ResBlock3d) else block(h)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb) if isinstance(block, ResBlock3d) else block(h)
        return _conv(self.out, F.silu(self.norm_out(h)))

    def _with_spatial(self, x: torch.Tensor, spatial: torch.Tensor | None) -> torch.Tensor:
        """x, or x and the spatial condition concatenated on the channel axis (spatial models)."""
        if not self.spatial_channels:
            if spatial is not None:
                raise ConfigError(
                    "LatentUNet: got a spatial condition, but this model was built with "
                    "condition.spatial='none'; call it as net(x, t, cond_emb)"
                )
            return x
        want = (x.shape[0], self.spatial_channels, *x.shape[2:])
        if spatial is None or tuple(spatial.shape) != want:
            got = "none" if spatial is None else tuple(spatial.shape)
            raise ConfigError(
                f"LatentUNet (condition.spatial={self.cond_cfg.spatial!r}) needs a spatial condition of "
                f"shape {want}, got {got}; build it with lad_fast.conditioning.conditions.spatial_for "
                "(zeros for the null branch)"
            )
        return torch.cat([x, spatial.to(x.dtype)], dim=1)


UNET_ARCHS = ("lad_fast", "official")


def build_unet(
    cfg: UNetConfig, cond: ConditionConfig, latent_channels: int, structure_dim: int, impl: str = "auto"
) -> nn.Module:
    """The denoiser for ``cfg.arch``: :class:`LatentUNet` ("lad_fast") or
    :class:`~lad_fast.models.unet_official.OfficialLatentUNet` ("official"). Both take
    ``forward(x, t, cond_emb)`` and provide ``embed_condition``, ``null_condition`` and
    ``spatial_channels``; a LatentUNet with spatial conditioning takes
    ``forward(x, t, cond_emb, spatial)`` (the official U-Net has no spatial input and refuses it)."""
    if cfg.arch == "lad_fast":
        return LatentUNet(cfg, cond, latent_channels, structure_dim, impl)
    if cfg.arch == "official":
        from lad_fast.models.unet_official import OfficialLatentUNet  # it imports this module

        return OfficialLatentUNet(cfg, cond, latent_channels, structure_dim, impl)
    raise ConfigError(f"unet.arch must be one of {UNET_ARCHS}, got {cfg.arch!r}")
