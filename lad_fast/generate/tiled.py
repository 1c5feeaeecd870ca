"""The VQ-GAN decoder over overlapping latent tiles, for volumes whose whole decode does not fit in memory.

The latent volume is cut into cores of ``tile`` latent voxels per axis (the last one shorter); each tile
is its core grown by ``overlap`` latent voxels per side (clipped at the volume's border) and is decoded
on its own, so only one tile's activations and workspaces are on the compute device at a time (stored
tiles wait on ``store``, the CPU when decoding on a GPU). Two things make the result the whole decode's:

- **GroupNorm is global.** Its statistics are over the whole volume, so a tile cannot normalise with its
  own. The decoder is run as a short program (:func:`decoder_program`) in lockstep over the tiles: at each
  GroupNorm, every tile's core (the cores partition the volume) adds its per-group sums (float64) and the
  volume's mean and variance normalise every tile (the "Tiled VAE" scheme of multidiffusion-upscaler).
- **Convolutions see zero padding at a tile's edge** where the whole decode sees neighbours, which
  corrupts a tile up to the decoder's receptive radius ``R`` (:func:`receptive_radius`, in latent voxels:
  2 for the ``tiny`` VQ-GAN, 5 for ``lad-official``, 6 for ``lad``) inside its edges. With
  ``overlap >= R`` (the default is ``R``) a tile is right over its core plus ``overlap - R``; the seams are
  blended with linear weights falling from 1 to 0 over ``2 * blend`` latent voxels centred on each
  interior core edge, ``blend = min(overlap - R, tile // 2)``, so every value with a non-zero weight is
  the whole decode's and the result equals it up to float32 rounding (the statistics' summation order and
  the blend's division; ``tests/generate/test_tiled.py`` holds it to that). With ``overlap < R`` the tiles
  are wrong near their edges and ``blend = overlap // 2`` softens the seams: an approximation whose error
  depends on the network, never the default.

:func:`auto_tile` picks a tile size when the estimated whole-decode memory exceeds a budget (free GPU
memory, or available RAM on a CPU; ``LAD_FAST_DECODE_BUDGET_MB`` overrides it).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.errors import ConfigError

BUDGET_ENV = "LAD_FAST_DECODE_BUDGET_MB"
Scale = tuple[int, int, int]


@dataclass(frozen=True)
class Op:
    """One step of the decoder program: ``conv`` (module, stride 1), ``tconv`` (transposed conv),
    ``up`` (nearest x2), ``gn`` (GroupNorm + SiLU with global statistics), ``save`` (keep h as the
    skip), ``skipconv`` (1x1 conv of the skip) or ``add`` (h + skip)."""

    kind: str
    module: nn.Module | None = None


def decoder_program(decoder: nn.Module) -> list[Op]:
    """The ops of ``lad_fast.models.vqgan.Decoder.forward``, in order (raises ConfigError for a block
    this interpreter does not know)."""
    from lad_fast.models.blocks import ResBlock3d, TransposedUpsample3d, Upsample3d

    ops = [Op("conv", decoder.conv_in)]
    if decoder.norm_out is None:
        ops.append(Op("gn", decoder.norm_in))
    for block in decoder.blocks:
        if isinstance(block, ResBlock3d) and block.film is None:
            ops += [Op("save"), Op("gn", block.norm1), Op("conv", block.conv1), Op("gn", block.norm2)]
            ops += [Op("conv", block.conv2)]
            ops += [Op("skipconv", block.skip)] if block.skip is not None else []
            ops.append(Op("add"))
        elif isinstance(block, Upsample3d):
            ops += (
                [Op("up")]
                + ([Op("gn", block.norm)] if block.norm is not None else [])
                + [Op("conv", block.conv)]
            )
        elif isinstance(block, TransposedUpsample3d):
            ops.append(Op("tconv", block.conv))
        else:
            raise ConfigError(f"tiled decoding does not know the decoder block {type(block).__name__}")
    if decoder.norm_out is not None:
        ops.append(Op("gn", decoder.norm_out))
    ops.append(Op("conv", decoder.conv_out))
    return ops


def receptive_radius(program: Sequence[Op]) -> int:
    """How far (latent voxels, per axis, rounded up) an output voxel of the program sees its input."""
    radius, scale = 0.0, 1
    for op in program:
        if op.kind == "conv":
            radius += op.module.padding[0] / scale  # 'same' convs: padding = kernel // 2
        elif op.kind == "tconv":
            k, s, p = op.module.kernel_size[0], op.module.stride[0], op.module.padding[0]
            radius += math.ceil((k - 1 - p) / s) / scale  # input voxels an output voxel reads, per side
            scale *= s
        elif op.kind == "up":
            scale *= 2
    return math.ceil(radius - 1e-9)


def exact_overlap(decoder: nn.Module) -> int:
    """The smallest ``overlap`` that makes the tiled decode the whole decode: the receptive radius."""
    return receptive_radius(decoder_program(decoder))


def _scale_of(program: Sequence[Op]) -> Scale:
    scale = [1, 1, 1]
    for op in program:
        if op.kind == "up":
            scale = [2 * s for s in scale]
        elif op.kind == "tconv":
            scale = [s * st for s, st in zip(scale, op.module.stride, strict=True)]
    return tuple(scale)  # type: ignore[return-value]


def _cuts(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


@dataclass
class _Tile:
    core: tuple[tuple[int, int], ...]  # per axis (start, stop) in latent voxels
    box: tuple[tuple[int, int], ...]  # core grown by the overlap, clipped
    h: torch.Tensor
    skip: torch.Tensor | None = None


def _core_slices(t: _Tile, scale: Sequence[int]) -> tuple[slice, ...]:
    return (slice(None), slice(None)) + tuple(
        slice((c0 - b0) * s, (c1 - b0) * s) for (c0, c1), (b0, _), s in zip(t.core, t.box, scale, strict=True)
    )


def _gn_stats(
    tiles: list[_Tile], norm: nn.GroupNorm, scale: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, group) mean and 1/std over the whole volume from the tiles' cores, in float64."""
    total = sq = count = None
    for t in tiles:
        core = t.h[_core_slices(t, scale)].double()
        b = core.shape[0]
        g = core.reshape(b, norm.num_groups, -1)
        s1, s2 = g.sum(-1), (g * g).sum(-1)
        total = s1 if total is None else total + s1.to(total.device)
        sq = s2 if sq is None else sq + s2.to(sq.device)
        count = g.shape[-1] + (count or 0)
    mean = total / count
    var = (sq / count - mean * mean).clamp_min(0)
    return mean, (var + norm.eps).rsqrt()


def _run(op: Op, t: _Tile, stats: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device) -> None:
    h = t.h.to(device)
    if op.kind == "gn":
        mean, rstd = (s.to(device) for s in stats)  # (B, G)
        b, c = h.shape[:2]
        groups = op.module.num_groups
        scale = (rstd.repeat_interleave(c // groups, 1) * op.module.weight.double()).to(h.dtype)
        shift = (op.module.bias.double() - mean.repeat_interleave(c // groups, 1) * scale.double()).to(
            h.dtype
        )
        h = F.silu(h * scale.view(b, c, 1, 1, 1) + shift.view(b, c, 1, 1, 1))
    elif op.kind == "conv":
        from lad_fast.kernels import conv3d

        m = op.module
        h = conv3d(h, m.weight, m.bias, padding=m.padding)
    elif op.kind == "tconv":
        h = op.module(h)
    elif op.kind == "up":
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
    elif op.kind == "save":
        t.skip = h
    elif op.kind == "skipconv":
        m = op.module
        t.skip = F.conv3d(t.skip.to(device), m.weight, m.bias)
    elif op.kind == "add":
        h = h + t.skip.to(device)
        t.skip = None
    t.h = h


def _weights(
    t: _Tile, shape: Sequence[int], blend: int, scale: Sequence[int], out: torch.Tensor
) -> torch.Tensor:
    """Blend weights (1, 1, d, h, w) of a tile's output: the product over axes of a ramp from 1 to 0
    across ``2 * blend`` latent voxels centred on each interior core edge (1 at the volume's border)."""
    w = torch.ones((1, 1, *t.h.shape[2:]), dtype=torch.float64)
    for axis, ((c0, c1), (b0, _), n, s) in enumerate(zip(t.core, t.box, shape, scale, strict=True)):
        x = (torch.arange(t.h.shape[2 + axis], dtype=torch.float64) + 0.5) / s + b0  # latent coordinates
        ramp = torch.ones_like(x)
        if blend > 0:
            if c0 > 0:
                ramp = torch.minimum(ramp, ((x - (c0 - blend)) / (2 * blend)).clamp(0, 1))
            if c1 < n:
                ramp = torch.minimum(ramp, (((c1 + blend) - x) / (2 * blend)).clamp(0, 1))
        else:
            ramp = ((x >= c0) & (x < c1)).double()
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        w = w * ramp.view(view)
    return w.to(out.dtype)


@torch.no_grad()
def tiled_decode(
    decoder: nn.Module,
    latents: torch.Tensor,
    tile: int,
    overlap: int | None = None,
    store: torch.device | str | None = None,
) -> torch.Tensor:
    """``decoder(latents)`` computed over tiles; latents (B, C, d, h, w) -> (B, out_ch, d*f, h*f, w*f).

    tile: core size in latent voxels per axis (>= 1); overlap: latent voxels each tile reads beyond its
    core (default :func:`exact_overlap`, the receptive radius: the whole decode's result); store: where
    tiles wait between GroupNorms (default: the CPU). Returns the volume on ``store``.
    """
    if tile < 1:
        raise ConfigError(f"decode tile must be at least 1 latent voxel, got {tile}")
    program = decoder_program(decoder)
    radius = receptive_radius(program)
    overlap = radius if overlap is None else overlap
    if overlap < 0:
        raise ConfigError(f"decode overlap must be >= 0, got {overlap}")
    # exact: blend only where every tile is right; too little overlap: blend half of it to hide seams
    blend = min(overlap - radius, tile // 2) if overlap >= radius else overlap // 2
    device = latents.device
    store = torch.device(store) if store is not None else torch.device("cpu")
    shape = tuple(latents.shape[2:])
    tiles = []
    for core in itertools.product(*(_cuts(n, tile) for n in shape)):
        box = tuple((max(0, a - overlap), min(n, b + overlap)) for (a, b), n in zip(core, shape, strict=True))
        sl = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in box)
        tiles.append(_Tile(core, box, latents[sl].to(store)))
    scale = [1, 1, 1]
    segment: list[Op] = []

    def flush() -> None:  # run the pending ops on each tile, one tile on the device at a time
        for t in tiles:
            for op in segment:
                _run(op, t, stats, device)
            t.h = t.h.to(store)
            t.skip = None if t.skip is None else t.skip.to(store)
        segment.clear()

    stats = None
    for op in program:
        if op.kind == "gn":
            flush()
            stats = _gn_stats(tiles, op.module, scale)
            segment.append(op)
            continue
        segment.append(op)
        if op.kind == "up":
            scale = [2 * s for s in scale]
        elif op.kind == "tconv":
            scale = [s * st for s, st in zip(scale, op.module.stride, strict=True)]
    # the last segment runs tile by tile straight into the blended output
    f = _scale_of(program)
    out = acc = None
    for t in tiles:
        for op in segment:
            _run(op, t, stats, device)
        y = t.h.to(store)
        t.h = y
        w = _weights(t, shape, blend, f, y)
        if out is None:
            full = (y.shape[0], y.shape[1], *(n * s for n, s in zip(shape, f, strict=True)))
            out = torch.zeros(full, dtype=y.dtype, device=store)
            acc = torch.zeros((1, 1, *full[2:]), dtype=y.dtype, device=store)
        sl = (slice(None), slice(None)) + tuple(
            slice(b0 * s, b1 * s) for (b0, b1), s in zip(t.box, f, strict=True)
        )
        out[sl] += y * w.to(store)
        acc[sl] += w.to(store)
        t.h = torch.empty(0)  # free the tile
    return out / acc


# ------------------------------------------------------------------------------------- when to tile


def decode_bytes(decoder: nn.Module, latent_shape: Sequence[int], batch: int = 1) -> int:
    """Estimated peak bytes of the whole decode of ``batch`` latents (C, d, h, w): the largest input +
    output + skip activation of any op, times 2 for workspaces (float32)."""
    program = decoder_program(decoder)
    vox, ch, skip, peak = math.prod(latent_shape[1:]), latent_shape[0], 0, 0
    for op in program:
        ch_in = ch
        if op.kind == "up":
            vox *= 8
        elif op.kind == "tconv":
            vox *= math.prod(op.module.stride)
            ch = op.module.out_channels
        elif op.kind == "conv":
            ch = op.module.out_channels
        elif op.kind == "save":
            skip = ch
        elif op.kind == "add":
            skip = 0
        peak = max(peak, vox * (ch_in + ch + skip))
    return 2 * 4 * batch * peak


def memory_budget(device: torch.device) -> int:
    """Bytes a decode may use: ``LAD_FAST_DECODE_BUDGET_MB``, else 80% of the free GPU memory, else half
    of the available RAM (``MemAvailable``; 4 GiB when it cannot be read)."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if value:
        try:
            return int(float(value) * 2**20)
        except ValueError:
            raise ConfigError(f"{BUDGET_ENV}={value!r}: give a number of MiB") from None
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2**30


def auto_tile(decoder: nn.Module, latent_shape: Sequence[int], device: torch.device) -> int | None:
    """None when the whole decode fits :func:`memory_budget`, else the largest tile (latent voxels per
    axis) whose tile, overlap included, fits (at least 1)."""
    budget = memory_budget(device)
    if decode_bytes(decoder, latent_shape) <= budget:
        return None
    overlap = exact_overlap(decoder)
    c = latent_shape[0]
    for tile in range(max(latent_shape[1:]) - 1, 0, -1):
        grown = [c] + [min(n, tile + 2 * overlap) for n in latent_shape[1:]]
        if decode_bytes(decoder, grown) <= budget:
            return tile
    return 1
