"""Conditions that guide the diffusion model (Lad phase 2: docs/lad.md, "Phase 2").

Two parts, concatenated in this order by ``LatentUNet.embed_condition``:

* content: the mask rendered as a grey-level image (:func:`lad_fast.runs.loading.mask_as_image`) and encoded
  by the frozen VQ-GAN encoder to a latent ``(B, C_lat, d, h, w)``, then
  :class:`lad_fast.models.content.ContentHead` (trained
  with the diffusion model; the official code used two freshly initialised, never trained Conv3d
  8->4->1) to ``(B, content_dim)``;
* structure: the per-slice Betti numbers of :func:`structure_condition` (Lad: 32 x 3 x 2 = 192), plus
  per-organ 3D Betti numbers when ``ConditionConfig.betti_3d``, scaled by :func:`normalize_structure`.

Optionally (``ConditionConfig.spatial`` "concat" or "concat_fine") a third, spatial condition: the mask
one-hot over the canonical organs and average-pooled to the latent grid (:func:`spatial_condition`), or
for "concat_fine" to the twice finer grid with each latent voxel's 8 octants on the channel axis
(:func:`spatial_for`), concatenated to the U-Net input at every step rather than embedded.

Model code: imports no training, I/O or CLI code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lad_fast.conditioning.topology import betti_3d, lad_structure_vector
from lad_fast.config import ConditionConfig
from lad_fast.errors import ConfigError, InputError
from lad_fast.organs import CANONICAL_ID, NUM_CLASSES

BACKGROUND = "background"


def _structure_lut(organs: tuple[str, ...]) -> np.ndarray:
    """Canonical id -> structure class. Class i is ``organs[i]``; "background", when listed, takes every
    canonical id not listed (so it means "none of the other listed organs", as in Lad's 0/1/2 masks);
    when it is not listed, unlisted ids get class len(organs), which no Betti number looks at."""
    unknown = [o for o in organs if o != BACKGROUND and o not in CANONICAL_ID]
    if unknown:
        raise ConfigError(f"structure_organs {unknown} are not canonical organs; see lad_fast/organs.py")
    if len(set(organs)) != len(organs):
        raise ConfigError(f"structure_organs lists an organ twice: {organs}")
    rest = organs.index(BACKGROUND) if BACKGROUND in organs else len(organs)
    lut = np.full(NUM_CLASSES, rest, dtype=np.uint8)
    for i, organ in enumerate(organs):
        if organ != BACKGROUND:
            lut[CANONICAL_ID[organ]] = i
    return lut


def structure_classes(mask: np.ndarray, cfg: ConditionConfig) -> np.ndarray:
    """Canonical (D, H, W) mask -> (D, H, W) uint8 map of structure classes (index into structure_organs)."""
    arr = np.asarray(mask)
    if arr.dtype.kind not in "iub":
        raise InputError(f"canonical mask must hold integer ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_CLASSES):
        raise InputError(
            f"canonical mask holds ids outside 0..{NUM_CLASSES - 1} (min {arr.min()}, max {arr.max()}); "
            "map it with lad_fast.data.labels first"
        )
    return _structure_lut(cfg.structure_organs)[arr]


def structure_dim(depth: int, cfg: ConditionConfig) -> int:
    """Length of the structure condition for masks with ``depth`` axial slices."""
    n = len(cfg.structure_organs)
    organs_3d = sum(1 for o in cfg.structure_organs if o != BACKGROUND)
    return depth * n * 2 + (3 * organs_3d if cfg.betti_3d else 0)


def structure_condition(mask: np.ndarray, cfg: ConditionConfig) -> np.ndarray:
    """Structure condition of a canonical (D, H, W) mask: int64 of length ``structure_dim(D, cfg)``.

    The Lad vector (slice-major, then class, then (b0, b1)) over the classes of cfg.structure_organs,
    then, when cfg.betti_3d, (b0, b1, b2) of every listed organ other than background, in list order.
    """
    classes = structure_classes(mask, cfg)
    n = len(cfg.structure_organs)
    vec = lad_structure_vector(classes, classes=range(n))
    if cfg.betti_3d:
        organs = [i for i, o in enumerate(cfg.structure_organs) if o != BACKGROUND]
        vec = np.concatenate([vec, betti_3d(classes, organs).reshape(-1)])
    return vec


def normalize_structure(vec: Any) -> torch.Tensor:
    """Betti counts (..., L) -> float32 tensor log1p(counts).

    Counts are heavy-tailed (b0 = 1 almost everywhere, b1 of the background can reach tens on noisy
    predicted masks); log1p keeps small counts distinguishable and large ones bounded, and needs no
    dataset statistics. Negative values are invalid (no Betti number is negative).
    """
    t = vec if isinstance(vec, torch.Tensor) else torch.as_tensor(np.asarray(vec))
    if t.numel() and float(t.min()) < 0:
        raise InputError("structure vector holds negative counts; Betti numbers are never negative")
    return torch.log1p(t.float())


# ------------------------------------------------------------------------------ spatial condition


def spatial_channels(cfg: ConditionConfig) -> int:
    """Channels the spatial condition adds to the U-Net input: NUM_CLASSES for "concat", 8 NUM_CLASSES
    for "concat_fine" (one set per octant of a latent voxel), 0 for "none"."""
    return {"none": 0, "concat": NUM_CLASSES, "concat_fine": 8 * NUM_CLASSES}[cfg.spatial]


def spatial_for(mask: Any, grid: tuple[int, ...], mode: str) -> torch.Tensor:
    """The spatial condition of ``mode`` ("concat" or "concat_fine") for a canonical (D, H, W) mask on the
    latent grid (d, h, w): (spatial_channels, d, h, w) float32.

    "concat_fine" computes the fractions on the grid twice as fine in every axis and moves each latent
    voxel's 2 x 2 x 2 octants onto the channel axis (channel = class * 8 + octant), so each octant's
    channels sum to 1 and the all-zero null is still never a real mask.
    """
    if mode == "concat":
        return spatial_condition(mask, grid)
    d, h, w = (int(g) for g in grid)
    fine = spatial_condition(mask, (2 * d, 2 * h, 2 * w))  # (K, 2d, 2h, 2w)
    k = fine.shape[0]
    fine = fine.reshape(k, d, 2, h, 2, w, 2).permute(0, 2, 4, 6, 1, 3, 5)
    return fine.reshape(k * 8, d, h, w).contiguous()


def spatial_condition(mask: Any, grid: tuple[int, ...]) -> torch.Tensor:
    """Canonical (D, H, W) mask -> (NUM_CLASSES, d, h, w) float32 occupancy fractions on the latent grid.

    Channel k of latent voxel v is the fraction of v's (D/d) x (H/h) x (W/w) image voxels that hold
    canonical id k: the one-hot mask average-pooled with kernel = stride = the VQ-GAN's downsampling
    factor. Computed as exact integer counts (one ``bincount``) divided by the cell size, without
    materialising the one-hot volume (12 x 32 x 256 x 256 floats at ``lad``); the channels of every
    latent voxel sum to 1. Soft fractions keep thin organs (pancreas, lesions) that a nearest-neighbour
    downsampling would drop, and place boundaries at sub-latent-voxel precision.
    """
    arr = np.asarray(mask)
    if arr.ndim != 3 or arr.dtype.kind not in "iub":
        raise InputError(f"spatial_condition needs a (D, H, W) integer mask, got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= NUM_CLASSES):
        raise InputError(
            f"canonical mask holds ids outside 0..{NUM_CLASSES - 1} (min {arr.min()}, max {arr.max()}); "
            "map it with lad_fast.data.labels first"
        )
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or any(g < 1 or s % g for s, g in zip(arr.shape, grid, strict=True)):
        raise ConfigError(
            f"the mask grid {arr.shape} is not a whole multiple of the latent grid {grid}; the geometry "
            "shape must be divisible by the VQ-GAN's downsampling factor"
        )
    (d, h, w), (kd, kh, kw) = grid, tuple(s // g for s, g in zip(arr.shape, grid, strict=True))
    # (d, kd, h, kh, w, kw) -> (d h w cells, kd kh kw voxels per cell)
    cells = arr.astype(np.int64).reshape(d, kd, h, kh, w, kw).transpose(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(d * h * w, kd * kh * kw)
    index = np.arange(d * h * w, dtype=np.int64)[:, None] * NUM_CLASSES + cells
    counts = np.bincount(index.ravel(), minlength=d * h * w * NUM_CLASSES).reshape(d, h, w, NUM_CLASSES)
    frac = torch.from_numpy(counts).float() / float(kd * kh * kw)
    return frac.permute(3, 0, 1, 2).contiguous()


def drop_spatial(spatial: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Classifier-free guidance dropout of the spatial condition (B, K, d, h, w): zeros where ``keep``
    (B,) is 0, the condition itself where it is 1; ``keep`` None keeps every sample.

    Why zeros and no learned null: a real condition's channels sum to 1 at every latent voxel, so the
    all-zero tensor is never a real mask and needs no indicator channel to be told apart; it costs no
    parameters; the stem convolution's mask weights then drop out of the unconditional branch exactly
    (that branch is the network without a mask input); and the exported graph needs no null-selection
    logic: the sampler feeds zeros (:func:`null_spatial`). The global condition's learned null is dropped
    by the same ``keep``, so the network always knows which branch it is in.
    """
    if keep is None:
        return spatial
    return spatial * keep.to(spatial.dtype).view(-1, *([1] * (spatial.ndim - 1)))


def null_spatial(like: torch.Tensor) -> torch.Tensor:
    """The null spatial condition for a batch shaped like ``like`` (B, K, d, h, w): zeros."""
    return torch.zeros_like(like)
