"""3D building blocks shared by the VQ-GAN, the diffusion U-Net and the segmenter.

Every block holds ordinary ``nn.GroupNorm`` / ``nn.Conv3d`` / ``nn.Linear`` submodules (so state dicts
stay conventional) and calls the functional ops of :mod:`lad_fast.kernels` with their tensors, so that the
fused Triton kernels run on CUDA and the PyTorch references everywhere else.

Each block stores the kernel choice in ``self.impl`` ("auto" | "torch" | "triton"); the constructors take
it as an argument and pass it down, and :func:`set_impl` changes it for a whole model (tests use it to run
one model through both paths).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.kernels import attention, conv3d, norm_act_conv3d
from lad_fast.kernels._dispatch import IMPLS

GN_EPS = 1e-6


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def set_impl(module: nn.Module, impl: str) -> nn.Module:
    """Set the kernel choice of every block inside ``module`` (anything with an ``impl`` attribute)."""
    check_impl(impl)
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with a message that names the numbers when ``groups`` does not divide ``channels``."""
    if groups <= 0 or channels % groups:
        raise ConfigError(
            f"GroupNorm: {channels} channels cannot be split into {groups} groups; choose channel counts "
            f"that are multiples of groups={groups}"
        )
    return nn.GroupNorm(groups, channels, eps=GN_EPS)


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3x3 conv) twice, plus a skip.

    x (B, in_ch, D, H, W) -> (B, out_ch, D, H, W). The skip is a 1x1x1 conv when channels change.
    Each norm-act-conv runs as one fused op (``norm_act_conv3d``); the second one also adds the skip.

    With ``film_dim`` the block takes a conditioning vector ``cond`` (B, film_dim) and applies FiLM,
    ``h * (1 + scale) + shift``, after the second norm (Lad: SiLU + Linear of the time+condition embedding
    gives scale and shift in every res block). The fused op takes one (C,) gamma/beta for the whole batch,
    so that norm cannot be fused with a per-sample FiLM; it runs through the reference ops (group_norm,
    FiLM, SiLU) and then the ``conv3d`` op. The FiLM projection is zero-initialised so a new block
    ignores the condition until it learns to use it.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        groups: int,
        film_dim: int | None = None,
        dropout: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.impl = check_impl(impl)
        self.groups = groups
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.dropout = dropout
        self.film: nn.Sequential | None = None
        if film_dim is not None:
            self.film = nn.Sequential(nn.SiLU(), nn.Linear(film_dim, 2 * out_ch))
            nn.init.zeros_(self.film[1].weight)
            nn.init.zeros_(self.film[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if (cond is None) != (self.film is None):
            raise ConfigError(
                "ResBlock3d: pass cond exactly when the block was built with film_dim "
                f"(film_dim set: {self.film is not None}, cond given: {cond is not None})"
            )
        h = norm_act_conv3d(
            x,
            self.norm1.weight,
            self.norm1.bias,
            self.groups,
            self.conv1.weight,
            self.conv1.bias,
            padding=1,
            eps=self.norm1.eps,
            impl=self.impl,
        )
        skip = x if self.skip is None else conv3d(x, self.skip.weight, self.skip.bias, impl=self.impl)
        drop = self.training and self.dropout > 0
        if self.film is None and not drop:
            return norm_act_conv3d(
                h,
                self.norm2.weight,
                self.norm2.bias,
                self.groups,
                self.conv2.weight,
                self.conv2.bias,
                residual=skip,
                padding=1,
                eps=self.norm2.eps,
                impl=self.impl,
            )
        # Unfused path: per-sample FiLM and/or dropout sit between the norm and the conv.
        h = F.group_norm(h, self.groups, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        if self.film is not None:
            scale, shift = self.film(cond).to(h.dtype)[:, :, None, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = F.dropout(F.silu(h), self.dropout, self.training)
        return conv3d(h, self.conv2.weight, self.conv2.bias, padding=1, impl=self.impl) + skip


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class Downsample3d(nn.Module):
    """Strided conv: (B, ch, D, H, W) -> (B, out_ch, D/s, H/s, W/s) per axis stride s, for divisible sizes.

    Default: a stride-2 3x3x3 conv. ``kernel`` and ``stride`` (int or per axis (D, H, W)) give the
    official Lad layouts too: a 4x4x4 stride-2 conv (its VQ-GAN) and an in-plane (1, 4, 4) conv of
    stride (1, 2, 2) (its U-Net). The zero padding ``(k - s + 1) // 2`` per axis keeps sizes exact
    (the official VQ-GAN pads by replication instead: same shapes and parameters).

    With ``groups`` the conv is pre-activated (GroupNorm + SiLU in the fused op's input load), so a
    stack of resampling steps without res blocks between them is still a nonlinear network.
    """

    def __init__(
        self,
        ch: int,
        out_ch: int | None = None,
        impl: str = "auto",
        groups: int | None = None,
        kernel: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 2,
    ) -> None:
        super().__init__()
        self.impl = check_impl(impl)
        k, s = _triple(kernel), _triple(stride)
        if any(not 1 <= ki <= 4 or not 1 <= si <= ki for ki, si in zip(k, s, strict=True)):
            raise ConfigError(
                f"Downsample3d: kernel {k} and stride {s} must satisfy 1 <= stride <= kernel <= 4 per axis"
            )
        self.stride = s
        self.padding = tuple((ki - si + 1) // 2 for ki, si in zip(k, s, strict=True))
        self.norm = group_norm(ch, groups) if groups else None
        self.conv = nn.Conv3d(ch, out_ch or ch, k, stride=s, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, p = self.stride, self.padding
        if self.norm is None:
            return conv3d(x, self.conv.weight, self.conv.bias, stride=s, padding=p, impl=self.impl)
        n = self.norm
        return norm_act_conv3d(
            x,
            n.weight,
            n.bias,
            n.num_groups,
            self.conv.weight,
            self.conv.bias,
            stride=s,
            padding=p,
            eps=n.eps,
            impl=self.impl,
        )


class Upsample3d(nn.Module):
    """Nearest x2 then a 3x3x3 conv: (B, ch, D, H, W) -> (B, out_ch, 2D, 2H, 2W).

    With ``groups`` the conv is pre-activated like :class:`Downsample3d`. Nearest upsampling repeats
    every value 8 times, which leaves GroupNorm's statistics unchanged, so norm-act after upsampling
    equals norm-act before it and the fused op applies it in the conv's input load.
    """

    def __init__(
        self, ch: int, out_ch: int | None = None, impl: str = "auto", groups: int | None = None
    ) -> None:
        super().__init__()
        self.impl = check_impl(impl)
        self.norm = group_norm(ch, groups) if groups else None
        self.conv = nn.Conv3d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.norm is None:
            return conv3d(x, self.conv.weight, self.conv.bias, padding=1, impl=self.impl)
        n = self.norm
        return norm_act_conv3d(
            x,
            n.weight,
            n.bias,
            n.num_groups,
            self.conv.weight,
            self.conv.bias,
            padding=1,
            eps=n.eps,
            impl=self.impl,
        )


class TransposedUpsample3d(nn.Module):
    """Transposed conv: (B, ch, D, H, W) -> (B, out_ch, D*s, H*s, W*s) per axis stride s.

    The official Lad resampling: a 4x4x4 stride-2 transposed conv in its VQ-GAN decoder and an
    in-plane (1, 4, 4) one of stride (1, 2, 2) in its U-Net. Padding ``(k - s) // 2`` per axis makes
    the output exactly s times the input. No norm, as in the official code. There is no fused kernel
    for it; ``impl`` is kept so :func:`set_impl` treats every block alike.
    """

    def __init__(
        self,
        ch: int,
        out_ch: int | None = None,
        impl: str = "auto",
        kernel: int | tuple[int, int, int] = 4,
        stride: int | tuple[int, int, int] = 2,
    ) -> None:
        super().__init__()
        self.impl = check_impl(impl)
        k, s = _triple(kernel), _triple(stride)
        if any(si < 1 or ki < si or (ki - si) % 2 for ki, si in zip(k, s, strict=True)):
            raise ConfigError(
                f"TransposedUpsample3d: kernel {k} and stride {s} need stride <= kernel and an even "
                "kernel - stride per axis (e.g. kernel 4, stride 2)"
            )
        padding = tuple((ki - si) // 2 for ki, si in zip(k, s, strict=True))
        self.conv = nn.ConvTranspose3d(ch, out_ch or ch, k, stride=s, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AttentionBlock3d(nn.Module):
    """Full 3D self-attention over the D*H*W flattened tokens, with a residual.

    x (B, ch, D, H, W) -> same shape. GroupNorm, a Linear to q, k, v of ``heads`` x ``head_dim``, the
    ``attention`` op on (B, heads, L, head_dim), a Linear back to ``ch``. Memory grows with L^2 in the
    reference path, so use it only at coarse levels (the fused kernel does not materialise L x L).
    """

    def __init__(self, ch: int, heads: int, head_dim: int, groups: int = 8, impl: str = "auto") -> None:
        super().__init__()
        if heads <= 0 or head_dim <= 0:
            raise ConfigError(
                f"AttentionBlock3d: heads and head_dim must be positive, got {heads}, {head_dim}"
            )
        self.impl = check_impl(impl)
        self.heads, self.head_dim = heads, head_dim
        self.norm = group_norm(ch, groups)
        self.qkv = nn.Linear(ch, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        qkv = self.qkv(tokens).view(b, d * h * w, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        o = attention(q, k, v, impl=self.impl)
        o = o.transpose(1, 2).reshape(b, d * h * w, self.heads * self.head_dim)
        return x + self.proj(o).transpose(1, 2).reshape(b, c, d, h, w)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def keep_or_null(emb: torch.Tensor, keep: torch.Tensor | None, null: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance dropout: row b of ``emb`` (B, E) where ``keep[b]`` is 1, the learned null
    embedding ``null`` (E,) where it is 0 (``keep`` None keeps every row)."""
    if keep is None:
        return emb
    k = keep.to(emb.dtype)[:, None]
    return k * emb + (1 - k) * null.to(emb.dtype)
