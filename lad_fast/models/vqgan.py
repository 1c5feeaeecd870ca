"""3D VQ-GAN (Lad phase 1): encoder, EMA codebook with dead-code restart, decoder.

Shapes (``cfg.channels`` of length n gives n - 1 stride-2 downsamplings, f = 2 ** (n - 1) per axis):
x (B, in_channels, D, H, W) -> latents (B, latent_channels, D/f, H/f, W/f) -> x (B, in_channels, D, H, W).
The ``lad`` preset (channels 16, 32, 64; 16384 codes of 8 dims) maps a 32x256x256 volume to an
8x8x64x64 latent, as Lad's does (docs/lad.md, "Phase 1").

Parameter count of ``VQGAN(get_preset("lad").vqgan)``: 736,073 trainable parameters (encoder 361,384,
decoder 374,689); the EMA codebook is held in buffers (16384 x 8 codes plus its EMA statistics), not
parameters. ``tests/models/test_vqgan.py`` checks this number.

Stage contract used by later phases (they never reach inside the model):
``encode(x)`` quantised latents, ``encode_pre_quant(x)`` continuous encoder output (Lad passes the label
map through it for the content condition), ``quantize(z)``, ``decode(latents)``, ``latent_scale()`` and
``to_unit`` / ``from_unit`` (Lad scales latents to [-1, 1] by the codebook's min and max).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.config import VQGANConfig
from lad_fast.errors import ConfigError
from lad_fast.kernels import conv3d, norm_act_conv3d, vq_nearest
from lad_fast.models.blocks import (
    Downsample3d,
    ResBlock3d,
    TransposedUpsample3d,
    Upsample3d,
    check_impl,
    group_norm,
)


def _check_cfg(cfg: VQGANConfig) -> None:
    if not cfg.channels:
        raise ConfigError(
            "VQGANConfig.channels is empty; give one channel count per resolution, e.g. (16, 32, 64)"
        )
    if cfg.latent_channels != cfg.code_dim:
        raise ConfigError(
            f"VQGANConfig: latent_channels ({cfg.latent_channels}) must equal code_dim ({cfg.code_dim}): "
            "each latent voxel is one code"
        )
    if not 0.0 < cfg.ema_decay < 1.0:
        raise ConfigError(f"VQGANConfig.ema_decay must be in (0, 1), got {cfg.ema_decay}")
    if cfg.codebook_size < 1:
        raise ConfigError(f"VQGANConfig.codebook_size must be at least 1, got {cfg.codebook_size}")
    n = len(cfg.channels)
    for name in ("encoder_res_blocks", "decoder_channels", "decoder_res_blocks"):
        value = getattr(cfg, name)
        if value and len(value) != n:
            raise ConfigError(
                f"VQGANConfig.{name} has {len(value)} entries but channels has {n}; give one per level "
                "(finest first) or () for the default"
            )
    if cfg.resample not in ("conv3", "conv4"):
        raise ConfigError(f"VQGANConfig.resample must be 'conv3' or 'conv4', got {cfg.resample!r}")
    if cfg.decoder_norm not in ("out", "in"):
        raise ConfigError(f"VQGANConfig.decoder_norm must be 'out' or 'in', got {cfg.decoder_norm!r}")
    if cfg.decoder_in_kernel not in (1, 3):
        raise ConfigError(f"VQGANConfig.decoder_in_kernel must be 1 or 3, got {cfg.decoder_in_kernel}")


def _down(cfg: VQGANConfig, ch: int, out_ch: int, impl: str) -> nn.Module:
    if cfg.resample == "conv4":  # official: plain 4x4x4 stride-2 conv
        return Downsample3d(ch, out_ch, impl=impl, kernel=4)
    return Downsample3d(ch, out_ch, impl=impl, groups=cfg.groups)


def _up(cfg: VQGANConfig, ch: int, out_ch: int, impl: str) -> nn.Module:
    if cfg.resample == "conv4":  # official: plain 4x4x4 stride-2 transposed conv
        return TransposedUpsample3d(ch, out_ch, impl=impl, kernel=4)
    return Upsample3d(ch, out_ch, impl=impl, groups=cfg.groups)


class Encoder(nn.Module):
    """x (B, in_channels, D, H, W) -> continuous latents (B, latent_channels, D/f, H/f, W/f)."""

    def __init__(self, cfg: VQGANConfig, impl: str = "auto") -> None:
        super().__init__()
        _check_cfg(cfg)
        self.impl = check_impl(impl)
        ch = cfg.channels
        n_res = cfg.encoder_res_blocks or (cfg.res_blocks,) * len(ch)
        self.conv_in = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers += [ResBlock3d(c, c, cfg.groups, impl=impl) for _ in range(n_res[i])]
            if i < len(ch) - 1:
                layers.append(_down(cfg, c, ch[i + 1], impl))
        self.blocks = nn.ModuleList(layers)
        self.norm_out = group_norm(ch[-1], cfg.groups)
        self.conv_out = nn.Conv3d(ch[-1], cfg.latent_channels, 1)
        self.groups = cfg.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = conv3d(x, self.conv_in.weight, self.conv_in.bias, padding=1, impl=self.impl)
        for block in self.blocks:
            h = block(h)
        return norm_act_conv3d(
            h,
            self.norm_out.weight,
            self.norm_out.bias,
            self.groups,
            self.conv_out.weight,
            self.conv_out.bias,
            eps=self.norm_out.eps,
            impl=self.impl,
        )


class Decoder(nn.Module):
    """latents (B, latent_channels, d, h, w) -> x (B, in_channels, d*f, h*f, w*f); mirrors the encoder."""

    def __init__(self, cfg: VQGANConfig, impl: str = "auto") -> None:
        super().__init__()
        _check_cfg(cfg)
        self.impl = check_impl(impl)
        ch = cfg.decoder_channels or cfg.channels
        n_res = cfg.decoder_res_blocks or (cfg.res_blocks,) * len(ch)
        k_in = cfg.decoder_in_kernel
        self.conv_in = nn.Conv3d(cfg.latent_channels, ch[-1], k_in, padding=k_in // 2)
        # decoder_norm="in" (official): GroupNorm + SiLU right after conv_in, and a plain conv_out.
        # The attribute exists only then, so default configs build the same modules in the same order.
        if cfg.decoder_norm == "in":
            self.norm_in = group_norm(ch[-1], cfg.groups)
        layers: list[nn.Module] = []
        for i in reversed(range(len(ch))):
            layers += [ResBlock3d(ch[i], ch[i], cfg.groups, impl=impl) for _ in range(n_res[i])]
            if i > 0:
                layers.append(_up(cfg, ch[i], ch[i - 1], impl))
        self.blocks = nn.ModuleList(layers)
        self.norm_out = group_norm(ch[0], cfg.groups) if cfg.decoder_norm == "out" else None
        self.conv_out = nn.Conv3d(ch[0], cfg.in_channels, 3, padding=1)
        self.groups = cfg.groups

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k = self.conv_in.padding
        h = conv3d(z, self.conv_in.weight, self.conv_in.bias, padding=k, impl=self.impl)
        if self.norm_out is None:
            h = F.silu(F.group_norm(h, self.groups, self.norm_in.weight, self.norm_in.bias, self.norm_in.eps))
        for block in self.blocks:
            h = block(h)
        if self.norm_out is None:
            return conv3d(h, self.conv_out.weight, self.conv_out.bias, padding=1, impl=self.impl)
        return norm_act_conv3d(
            h,
            self.norm_out.weight,
            self.norm_out.bias,
            self.groups,
            self.conv_out.weight,
            self.conv_out.bias,
            padding=1,
            eps=self.norm_out.eps,
            impl=self.impl,
        )


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, d, h, w), straight-through: forward = codes, gradient -> encoder
    loss: torch.Tensor  # commitment * ||z - sg(q)||^2, fp32 scalar
    indices: torch.Tensor  # (B, d, h, w) int64
    perplexity: torch.Tensor  # exp(entropy of code usage in this batch), fp32 scalar
    restarted: torch.Tensor  # number of codes restarted by this call (0 outside training), int64 scalar


class EMAQuantizer(nn.Module):
    """Vector quantiser with an EMA-updated codebook (van den Oord et al. 2017, appendix A.1).

    The codebook is not trained by gradients: in training mode every forward moves each code toward the
    mean of the encoder outputs assigned to it (EMA with ``decay``; cluster sizes Laplace-smoothed so a
    rarely used code does not divide by ~0), then restarts every code whose EMA usage is below
    ``dead_code_threshold`` with a random encoder output of the batch (Jukebox-style restart). Right
    after construction every usage is 0, so the first training step initialises the codebook from data.
    The restarted code gets usage = threshold: it survives if it is chosen about once per step.

    Nearest-code search runs through ``lad_fast.kernels.vq_nearest`` in fp32 whatever the autocast.
    The update is deterministic given the batch and the torch generator state on CPU; on CUDA the
    scatter-add of the cluster sums is deterministic under ``torch.use_deterministic_algorithms(True)``.
    Under ``torch.distributed`` the counts and sums are all-reduced and rank 0's restart candidates are
    broadcast, so every rank keeps the same codebook.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        decay: float = 0.99,
        commitment: float = 0.25,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.impl = check_impl(impl)
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.decay, self.commitment, self.threshold, self.eps = decay, commitment, dead_code_threshold, eps
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", torch.zeros(codebook_size, code_dim))

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the nearest codes of z_flat (N, code_dim), searched in fp32."""
        # Neither path materialises the (N, K) distance matrix: the kernel never does, and the reference
        # works on bounded row chunks (lad_fast.kernels.vq_nearest.REF_CHUNK).
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            return vq_nearest(z_flat.float(), self.codebook.float(), impl=self.impl)[0]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of integer indices (B, d, h, w) -> (B, code_dim, d, h, w) in fp32."""
        return F.embedding(indices, self.codebook).movedim(-1, 1)

    @torch.no_grad()
    def _ema_update(self, z_flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        k = self.codebook_size
        counts = torch.bincount(idx, minlength=k).to(torch.float32)
        sums = torch.zeros(k, self.code_dim, device=z_flat.device).index_put_((idx,), z_flat, accumulate=True)
        # Restart candidates: one random batch vector per code, drawn for every code so that the update
        # has no data-dependent shapes (no host sync, one graph under torch.compile).
        candidates = z_flat[torch.randint(0, z_flat.shape[0], (k,), device=z_flat.device)]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
            dist.broadcast(candidates, src=0)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
        codebook = self.embed_sum / smoothed.clamp_min(1e-12)[:, None]
        dead = self.cluster_size < self.threshold
        if self.threshold > 0:
            codebook = torch.where(dead[:, None], candidates, codebook)
            self.embed_sum.copy_(torch.where(dead[:, None], candidates * self.threshold, self.embed_sum))
            self.cluster_size.copy_(
                torch.where(dead, torch.full_like(self.cluster_size, self.threshold), self.cluster_size)
            )
        self.codebook.copy_(codebook)
        return dead.sum() if self.threshold > 0 else torch.zeros((), dtype=torch.int64, device=z_flat.device)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, code_dim, d, h, w) -> QuantizerOutput; updates the codebook in training mode."""
        if z.shape[1] != self.code_dim:
            raise ConfigError(f"EMAQuantizer: expected {self.code_dim} channels, got shape {tuple(z.shape)}")
        z_flat = z.movedim(1, -1).reshape(-1, self.code_dim)
        idx = self.nearest(z_flat)
        indices = idx.view(z.shape[0], *z.shape[2:])
        q = self.lookup(indices)  # read before the update: the loss compares z with the codes it chose
        restarted = torch.zeros((), dtype=torch.int64, device=z.device)
        if self.training:
            restarted = self._ema_update(z_flat.detach().float(), idx)
        loss = self.commitment * F.mse_loss(z.float(), q)
        probs = torch.bincount(idx, minlength=self.codebook_size).float() / idx.numel()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        quantized = z + (q.to(z.dtype) - z).detach()  # straight-through estimator
        return QuantizerOutput(quantized, loss, indices, perplexity, restarted)


@dataclass
class VQOutput:
    recon: torch.Tensor  # (B, in_channels, D, H, W)
    vq_loss: torch.Tensor  # commitment loss, fp32 scalar (already weighted by cfg.commitment)
    indices: torch.Tensor  # (B, d, h, w) int64
    perplexity: torch.Tensor  # fp32 scalar
    latents: torch.Tensor  # quantised latents, straight-through, (B, latent_channels, d, h, w)
    pre_quant: torch.Tensor  # continuous encoder output, (B, latent_channels, d, h, w)
    restarted: torch.Tensor  # codes restarted by this forward, int64 scalar


class VQGAN(nn.Module):
    """Encoder + EMA quantiser + decoder, sized by ``VQGANConfig``; the caller picks devices and dtypes."""

    def __init__(self, cfg: VQGANConfig, impl: str = "auto") -> None:
        super().__init__()
        _check_cfg(cfg)
        self.cfg = cfg
        self.impl = check_impl(impl)
        self.encoder = Encoder(cfg, impl)
        self.quantizer = EMAQuantizer(
            cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.commitment, cfg.dead_code_threshold, impl=impl
        )
        self.decoder = Decoder(cfg, impl)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.channels) - 1)

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels or any(s % f for s in x.shape[2:]):
            raise ConfigError(
                f"VQGAN: expected (B, {self.cfg.in_channels}, D, H, W) with D, H, W multiples of {f}, "
                f"got shape {tuple(x.shape)}; crop or pad the volume to the preset geometry"
            )

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, D, H, W) -> continuous latents (B, latent_channels, D/f, H/f, W/f)."""
        self._check_input(x)
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Snap latents (B, latent_channels, d, h, w) to their nearest codes; never updates the codebook."""
        z_flat = z.movedim(1, -1).reshape(-1, self.cfg.code_dim)
        indices = self.quantizer.nearest(z_flat).view(z.shape[0], *z.shape[2:])
        return self.quantizer.lookup(indices).to(z.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, D, H, W) -> quantised latents (B, latent_channels, D/f, H/f, W/f)."""
        return self.quantize(self.encode_pre_quant(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, latent_channels, d, h, w) -> x (B, in_channels, d*f, h*f, w*f)."""
        return self.decoder(latents)

    def forward(self, x: torch.Tensor) -> VQOutput:
        """Training forward: x (B, in_channels, D, H, W) -> VQOutput (updates the codebook in train mode)."""
        z = self.encode_pre_quant(x)
        q = self.quantizer(z)
        recon = self.decoder(q.quantized)
        return VQOutput(recon, q.loss, q.indices, q.perplexity, q.quantized, z, q.restarted)

    # Latent scaling for the diffusion phase (Lad: latents mapped to [-1, 1] by the codebook's min/max).
    def _scale_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.aminmax(self.quantizer.codebook)
        return lo, torch.maximum(hi, lo + 1e-6)  # guard a degenerate codebook against division by 0

    def latent_scale(self) -> tuple[float, float]:
        """(min, max) over every entry of the codebook; store it in the checkpoint's meta.json."""
        lo, hi = self._scale_tensors()
        return float(lo), float(hi)

    def to_unit(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantised latents -> [-1, 1] (affine map of [codebook min, codebook max]); same shape."""
        lo, hi = self._scale_tensors()
        return (latents - lo) / (hi - lo) * 2.0 - 1.0

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_unit`: [-1, 1] -> latent units; same shape."""
        lo, hi = self._scale_tensors()
        return (u + 1.0) * 0.5 * (hi - lo) + lo


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (the EMA codebook is in buffers and not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["Decoder", "EMAQuantizer", "Encoder", "QuantizerOutput", "VQGAN", "VQOutput", "count_parameters"]
