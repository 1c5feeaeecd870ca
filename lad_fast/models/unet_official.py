"""The official Lad denoiser, rebuilt at its exact size: Medical Diffusion's video-diffusion ``Unet3D``.

Lad's released code is a fork of Medical Diffusion, whose ``ddpm/diffusion.py`` U-Net comes from
video-diffusion-pytorch: the latent depth axis plays the role of video frames. Written here in
lad-fast's style, with the layout and parameter shapes of that network (docs/lad.md, "Denoiser and
diffusion"):

- in-plane (1, 3, 3) convs; post-norm res blocks (conv, GroupNorm, FiLM, SiLU; conv, GroupNorm, SiLU;
  1x1x1 skip when channels change); FiLM from ``[time embedding, raw condition]`` in every res block;
- per level: two res blocks, spatial linear attention over each axial slice, attention along depth
  (rotary positions and a learned relative-position bias), then an in-plane (1, 4, 4) stride-(1, 2, 2)
  conv down, or a transposed one up; depth is never resampled;
- a (1, 7, 7) stem conv followed by depth attention, a middle of res block, full attention within each
  slice, depth attention, res block, and a last res block over ``[features, stem output]``;
- the condition is the raw 704-value vector (content 512 + structure 192), not an embedding.

Differences that change no parameter count: zero padding everywhere (the official VQ-GAN pads by
replication, the U-Net already pads with zeros), the sinusoidal time features of
:func:`~lad_fast.models.blocks.timestep_embedding` (cos/sin order), no ``focus_present`` masking (off in
the official training), and the rotary frequencies computed on the fly (recent rotary-embedding-torch
versions keep the 16 frequencies as a frozen ``nn.Parameter``). The content convs (official: created
afresh, untrained, on every call) are a trained head here, counted apart. Parameter counts: see
``lad_fast.config._lad_official``. Given the upstream ``Unet3D``'s weights and its time features, this
network gives the upstream output to 1e-6; that comparison is not in the test suite, as the upstream code
needs einops_exts and rotary-embedding-torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.config import ConditionConfig, UNetConfig
from lad_fast.errors import ConfigError
from lad_fast.kernels import attention, conv3d
from lad_fast.models.blocks import (
    Downsample3d,
    TransposedUpsample3d,
    check_impl,
    group_norm,
    keep_or_null,
    timestep_embedding,
)

IN_PLANE = (1, 3, 3)
STEM_KERNEL = (1, 7, 7)
RESAMPLE_KERNEL, RESAMPLE_STRIDE = (1, 4, 4), (1, 2, 2)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each voxel, scale only (no shift, eps 1e-5): (B, C, ...) -> same."""

    def __init__(self, ch: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        w = self.weight.view(1, -1, *([1] * (x.ndim - 2)))
        return (x - mean) * torch.rsqrt(var + self.eps) * w


class InPlaneResBlock3d(nn.Module):
    """Post-norm res block: x (B, in_ch, D, H, W), cond (B, film_dim) or None -> (B, out_ch, D, H, W).

    ``silu(gn(conv1(x)) * (1 + scale) + shift)``, then ``silu(gn(conv2(.)))``, plus x (1x1x1 conv when the
    channel count changes). The convs are in-plane (1, 3, 3) and run through the ``conv3d`` op.
    """

    def __init__(
        self, in_ch: int, out_ch: int, groups: int, film_dim: int | None = None, impl: str = "auto"
    ) -> None:
        super().__init__()
        self.impl = check_impl(impl)
        self.groups = groups
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(film_dim, 2 * out_ch)) if film_dim else None
        self.conv1 = nn.Conv3d(in_ch, out_ch, IN_PLANE, padding=(0, 1, 1))
        self.norm1 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv3d(out_ch, out_ch, IN_PLANE, padding=(0, 1, 1))
        self.norm2 = group_norm(out_ch, groups)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.norm1.eps = self.norm2.eps = 1e-5  # the official block keeps nn.GroupNorm's default

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if (cond is None) != (self.film is None):
            raise ConfigError(
                "InPlaneResBlock3d: pass cond exactly when the block was built with film_dim "
                f"(film_dim set: {self.film is not None}, cond given: {cond is not None})"
            )
        h = conv3d(x, self.conv1.weight, self.conv1.bias, padding=(0, 1, 1), impl=self.impl)
        h = F.group_norm(h, self.groups, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        if self.film is not None:
            scale, shift = self.film(cond).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = conv3d(F.silu(h), self.conv2.weight, self.conv2.bias, padding=(0, 1, 1), impl=self.impl)
        h = F.silu(F.group_norm(h, self.groups, self.norm2.weight, self.norm2.bias, self.norm2.eps))
        skip = x if self.skip is None else conv3d(x, self.skip.weight, self.skip.bias, impl=self.impl)
        return h + skip


class SpatialLinearAttention3d(nn.Module):
    """Pre-norm linear attention within each axial slice, plus x: (B, C, D, H, W) -> same.

    Linear attention (Shen et al. 2021): queries softmaxed over features, keys over positions, so the
    cost grows with H*W, not its square; q, k, v without bias, the output projection with one.
    """

    def __init__(self, ch: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = ChannelLayerNorm(ch)
        self.qkv = nn.Linear(ch, 3 * heads * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c)
        qkv = self.qkv(tokens).view(b * d, h * w, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each (B*D, heads, head_dim, H*W)
        q = q.softmax(dim=-2) * self.head_dim**-0.5
        k = k.softmax(dim=-1)
        context = torch.einsum("nhdl,nhel->nhde", k, v)  # (B*D, heads, head_dim, head_dim)
        o = torch.einsum("nhde,nhdl->nhel", context, q).permute(0, 3, 1, 2).reshape(b * d, h * w, -1)
        return x + self.proj(o).view(b, d, h, w, c).permute(0, 4, 1, 2, 3)


def rotate_positions(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) on the first ``dims`` features, adjacent pairs.

    x (..., L, head_dim) -> same; position i rotates pair j by i * 10000 ** (-2j / dims).
    """
    n = x.shape[-2]
    freqs = 10_000.0 ** (-torch.arange(0, dims, 2, device=x.device, dtype=torch.float32) / dims)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * freqs  # (L, dims/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :dims].unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return torch.cat((rotated, x[..., dims:]), dim=-1)


class RelativePositionBias(nn.Module):
    """Learned attention bias per head for the offset j - i (T5 buckets): n -> (heads, n, n)."""

    def __init__(self, heads: int, buckets: int = 32, max_distance: int = 32) -> None:
        super().__init__()
        self.buckets, self.max_distance = buckets, max_distance
        self.embed = nn.Embedding(buckets, heads)

    def bucket(self, offset: torch.Tensor) -> torch.Tensor:
        """Bucket of each integer offset: half the buckets per sign; exact up to a quarter, then log."""
        half = self.buckets // 2
        exact = half // 2
        n = -offset
        sign = (n < 0).long() * half
        n = n.abs()
        log_part = torch.log(n.float().clamp_min(1) / exact) / math.log(self.max_distance / exact)
        far = (exact + (log_part * (half - exact)).long()).clamp_max(half - 1)
        return sign + torch.where(n < exact, n, far)

    def forward(self, n: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        return self.embed(self.bucket(pos[None, :] - pos[:, None])).permute(2, 0, 1)


class AxisAttention3d(nn.Module):
    """Pre-norm multi-head attention along one axis group, plus x: (B, C, D, H, W) -> same.

    ``axis="depth"``: every (h, w) column attends over its D voxels, with rotary positions on the first
    min(32, head_dim) features and an additive ``bias`` (heads, D, D). ``axis="slice"``: every axial slice
    attends over its H*W voxels. q, k, v and the output projection have no bias.
    """

    def __init__(self, ch: int, heads: int, head_dim: int, axis: str, impl: str = "auto") -> None:
        super().__init__()
        if axis not in ("depth", "slice"):
            raise ConfigError(f"AxisAttention3d: axis must be 'depth' or 'slice', got {axis!r}")
        self.impl = check_impl(impl)
        self.axis, self.heads, self.head_dim = axis, heads, head_dim
        self.norm = ChannelLayerNorm(ch)
        self.qkv = nn.Linear(ch, 3 * heads * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, ch, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, c, d, h, w = x.shape
        y = self.norm(x)
        if self.axis == "depth":
            tokens = y.permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)
        else:
            tokens = y.permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c)
        n, length = tokens.shape[:2]
        q, k, v = self.qkv(tokens).view(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.axis == "depth":
            rot = min(32, self.head_dim)
            q, k = rotate_positions(q, rot), rotate_positions(k, rot)
        if bias is None:
            o = attention(q, k, v, impl=self.impl)
        else:  # the fused kernel takes no additive bias
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        o = self.proj(o.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))
        if self.axis == "depth":
            return x + o.view(b, h, w, d, c).permute(0, 4, 3, 1, 2)
        return x + o.view(b, d, h, w, c).permute(0, 4, 1, 2, 3)


class OfficialContentHead(nn.Module):
    """Lad's content projection: z (B, C_lat, d, h, w) -> (B, 1 * ceil(d/4) * ceil(h/4) * ceil(w/4)).

    Two stride-2 3x3x3 convs, C_lat -> 4 -> 1, flattened (8x64x64 latents give 2x16x16 = 512 values).
    The official code builds them afresh, untrained, on every call; here they are built once and trained,
    or frozen at their random initialisation with ``ConditionConfig.train_content`` False (lad-official).
    """

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(latent_channels, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv3d(4, 1, 3, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(z)).flatten(1)


class OfficialLatentUNet(nn.Module):
    """x (B, C, d, h, w), t (B,), cond_emb (B, content_dim + structure_dim) -> prediction (B, C, d, h, w).

    The interface of :class:`~lad_fast.models.unet.LatentUNet` (``embed_condition``,
    ``null_condition``, ``forward``); the "embedding" is the raw condition vector, so
    ``cond.embed_dim`` must equal ``cond.content_dim + structure_dim`` (704 for Lad). h and w must be
    divisible by 2 ** (len(cfg.multipliers) - 1); d is not resampled.
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
        self.impl = check_impl(impl)
        width = cond.content_dim + structure_dim
        if cond.embed_dim != width:
            raise ConfigError(
                f"the official U-Net conditions on the raw vector: condition.embed_dim must be "
                f"content_dim + structure_dim = {cond.content_dim} + {structure_dim} = {width}, "
                f"got {cond.embed_dim}"
            )
        if cfg.dropout:
            raise ConfigError(f"the official U-Net has no dropout; set unet.dropout to 0 (got {cfg.dropout})")
        if cond.spatial != "none":
            raise ConfigError(
                f"condition.spatial={cond.spatial!r} needs unet.arch='lad_fast': the official U-Net has no "
                "spatial input; use spatial='none' or the lad / tiny preset"
            )
        self.cfg, self.cond_cfg = cfg, cond
        self.latent_channels, self.structure_dim = latent_channels, structure_dim
        self.spatial_channels = 0  # no spatial input (see build_unet)
        film = cfg.time_dim + width
        heads, hd, g = cfg.heads, cfg.head_dim, cfg.groups

        self.content_head = OfficialContentHead(latent_channels).requires_grad_(cond.train_content)
        self.null_emb = nn.Parameter(torch.randn(width))
        self.pos_bias = RelativePositionBias(heads)
        self.stem = nn.Conv3d(latent_channels, cfg.channels, STEM_KERNEL, padding=(0, 3, 3))
        self.stem_attn = AxisAttention3d(cfg.channels, heads, hd, "depth", impl)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.channels, cfg.time_dim), nn.GELU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )

        def level_tail(ch: int, level: int) -> list[nn.Module]:
            if level not in cfg.attention_levels:
                return []
            return [SpatialLinearAttention3d(ch, heads, hd), AxisAttention3d(ch, heads, hd, "depth", impl)]

        dims = [cfg.channels] + [cfg.channels * m for m in cfg.multipliers]  # dims[i] enters level i
        n = len(cfg.multipliers)
        self.down = nn.ModuleList()
        for level in range(n):
            ch = dims[level + 1]
            blocks = [InPlaneResBlock3d(dims[level], ch, g, film, impl)]
            blocks += [InPlaneResBlock3d(ch, ch, g, film, impl) for _ in range(cfg.res_blocks - 1)]
            blocks += level_tail(ch, level)
            if level + 1 < n:
                blocks.append(Downsample3d(ch, impl=impl, kernel=RESAMPLE_KERNEL, stride=RESAMPLE_STRIDE))
            self.down.append(nn.ModuleList(blocks))
        mid = dims[-1]
        self.mid = nn.ModuleList(
            [
                InPlaneResBlock3d(mid, mid, g, film, impl),
                AxisAttention3d(mid, heads, hd, "slice", impl),
                AxisAttention3d(mid, heads, hd, "depth", impl),
                InPlaneResBlock3d(mid, mid, g, film, impl),
            ]
        )
        self.up = nn.ModuleList()
        for level in reversed(range(n)):
            ch = dims[level]
            blocks = [InPlaneResBlock3d(2 * dims[level + 1], ch, g, film, impl)]
            blocks += [InPlaneResBlock3d(ch, ch, g, film, impl) for _ in range(cfg.res_blocks - 1)]
            blocks += level_tail(ch, level)
            if level > 0:
                blocks.append(
                    TransposedUpsample3d(ch, impl=impl, kernel=RESAMPLE_KERNEL, stride=RESAMPLE_STRIDE)
                )
            self.up.append(nn.ModuleList(blocks))
        self.final = InPlaneResBlock3d(2 * cfg.channels, cfg.channels, g, None, impl)
        self.out = nn.Conv3d(cfg.channels, latent_channels, 1)

    @property
    def divisor(self) -> int:
        """h and w must be multiples of this (d is not resampled)."""
        return 2 ** (len(self.cfg.multipliers) - 1)

    def embed_condition(
        self, content: torch.Tensor, structure: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw condition (B, content_dim + structure_dim) from the encoded mask (B, C_lat, d, h, w) and
        the normalised structure vector (B, structure_dim); the learned null vector where ``keep`` is 0."""
        if structure.shape[-1] != self.structure_dim:
            raise ConfigError(
                f"structure condition has {structure.shape[-1]} values, the model was built for "
                f"{self.structure_dim} (a different slice count or structure_organs?)"
            )
        c = self.content_head(content)
        if c.shape[-1] != self.cond_cfg.content_dim:
            raise ConfigError(
                f"the official content head gives {c.shape[-1]} values for a latent of shape "
                f"{tuple(content.shape[1:])}, but condition.content_dim is {self.cond_cfg.content_dim}; "
                "set content_dim to ceil(d/4) * ceil(h/4) * ceil(w/4)"
            )
        emb = torch.cat([c, structure.to(c.dtype)], dim=-1)
        return keep_or_null(emb, keep, self.null_emb)

    def null_condition(self, batch: int) -> torch.Tensor:
        """The learned null vector repeated (batch, content_dim + structure_dim)."""
        return self.null_emb[None].expand(batch, -1)

    def _block(
        self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(block, InPlaneResBlock3d):
            return block(h, emb)
        if isinstance(block, AxisAttention3d) and block.axis == "depth":
            return block(h, bias)
        return block(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or any(s % self.divisor for s in x.shape[3:]):
            raise ConfigError(
                f"OfficialLatentUNet: expected (B, C, d, h, w) with h, w divisible by {self.divisor}, "
                f"got {tuple(x.shape)}"
            )
        emb = torch.cat([self.time_mlp(timestep_embedding(t, self.cfg.channels)), cond_emb.to(x.dtype)], -1)
        bias = self.pos_bias(x.shape[2], x.device)
        h = self.stem(x)
        stem = h
        h = self.stem_attn(h, bias)
        skips = []
        for blocks in self.down:
            for block in blocks:
                if isinstance(block, Downsample3d):
                    skips.append(h)
                h = self._block(block, h, emb, bias)
            if not isinstance(blocks[-1], Downsample3d):
                skips.append(h)
        for block in self.mid:
            h = self._block(block, h, emb, bias)
        for blocks in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = self._block(block, h, emb, bias)
        h = self.final(torch.cat([h, stem], dim=1))
        return self.out(h)
