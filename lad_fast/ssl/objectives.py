"""The two self-supervised tasks: rotation prediction and masked-volume inpainting.

Why these two (the Swin UNETR self-supervised recipe, Tang et al. CVPR 2022, minus its contrastive term;
close to Models Genesis' in-painting, Zhou et al. MedIA 2021):

* **Masked-volume inpainting** makes the whole U-Net (encoder *and* decoder, the parts fine-tuning reuses)
  model local CT appearance and anatomy: a block can only be filled in from its surroundings, which is
  the context an organ segmenter needs. Blocks on a coarse grid (SimMIM / MAE style, 40 % of them) rather
  than Models Genesis' few random cuboids: the masked fraction is then fixed, so the loss is comparable
  between steps and runs. The masked blocks hold Gaussian noise (Swin UNETR's cut-out fill), and the L1
  loss counts masked voxels only (SimMIM: the visible ones would be a copy task).
* **Rotation prediction** (0, 90, 180, 270 degrees in the axial plane, 4 classes) makes the bottleneck
  encode global layout, where the liver is against the spleen: exactly what a volume with organs in the
  wrong place (a bad generator) would teach wrongly, so it is sensitive to synthetic-data quality. The
  axial plane is the only one where a quarter turn keeps the grid (H = W; D is coarser and shorter).
* Swin UNETR's third term, **contrastive coding** between two views, is optional
  (``SSLConfig.contrastive_weight``, default 0: off): each volume is seen a second time, with its own
  quarter turn and block mask, and an NT-Xent loss (SimCLR) pulls the projected bottleneck features of
  the two views of a volume together and pushes the other volumes of the batch away. It needs many
  negatives to work well; at a batch of 4 volumes on a CPU each view has 6, so it is off by default
  and the SSL benchmark measures whether it helps.

Shapes: volumes (B, 1, D, H, W) in [-1, 1]; masks (B, 1, D, H, W) bool; rotation labels (B,) int64;
embeddings (B, E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError

ROTATIONS = 4  # quarter turns in the axial (H, W) plane


def rotate(x: torch.Tensor, k: torch.Tensor | list[int]) -> torch.Tensor:
    """Each volume ``x[i]`` (B, C, D, H, W) turned by ``k[i]`` quarter turns in the (H, W) plane
    (counter-clockwise from H towards W, ``torch.rot90(dims=(-2, -1))``); H must equal W."""
    if x.ndim != 5 or x.shape[-1] != x.shape[-2]:
        raise ConfigError(f"rotation needs (B, C, D, H, W) volumes with H = W, got {tuple(x.shape)}")
    ks = [int(v) % ROTATIONS for v in (k.tolist() if isinstance(k, torch.Tensor) else k)]
    if len(ks) != x.shape[0]:
        raise ConfigError(f"rotate: {len(ks)} rotations for a batch of {x.shape[0]}")
    return torch.stack([torch.rot90(v, r, dims=(-2, -1)) for v, r in zip(x, ks, strict=True)])


def random_rotations(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated volumes, labels (B,) in 0..3): each volume turned by its label's quarter turns."""
    labels = torch.randint(0, ROTATIONS, (x.shape[0],), generator=generator)
    return rotate(x, labels), labels


def block_mask(
    shape: tuple[int, ...], grid: tuple[int, int, int], ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """(B, 1, D, H, W) bool: ``round(ratio * n)`` of the n = prod(grid) blocks of each volume, at random.

    ``shape`` is the volumes' (B, C, D, H, W); each of D, H, W must be divisible by its grid entry.
    """
    b, dhw = shape[0], tuple(shape[2:])
    if any(n % g for n, g in zip(dhw, grid, strict=True)):
        raise ConfigError(f"mask grid {grid} does not divide the volume shape {dhw}")
    n = grid[0] * grid[1] * grid[2]
    count = min(n - 1, max(1, round(ratio * n)))
    coarse = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        coarse[i, torch.randperm(n, generator=generator)[:count]] = True
    coarse = coarse.view(b, 1, *grid)
    for axis, (size, g) in enumerate(zip(dhw, grid, strict=True)):
        coarse = coarse.repeat_interleave(size // g, dim=2 + axis)
    return coarse


def mask_volumes(
    x: torch.Tensor, mask: torch.Tensor, noise_std: float, generator: torch.Generator
) -> torch.Tensor:
    """``x`` with the voxels under ``mask`` replaced by N(0, noise_std) noise, clipped to [-1, 1]."""
    noise = (torch.randn(x.shape, generator=generator) * noise_std).clamp(-1.0, 1.0).to(x)
    return torch.where(mask.to(x.device), noise, x)


def inpainting_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the masked voxels only; pred, target (B, 1, D, H, W)."""
    m = mask.to(pred.device, pred.dtype)
    return ((pred.float() - target.float()).abs() * m).sum() / m.sum().clamp_min(1.0)


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the rotation logits (B, 4) against labels (B,)."""
    return F.cross_entropy(logits.float(), labels.to(logits.device))


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) over two views: embeddings z1, z2 (B, E), row i of each the same volume. Each of
    the 2B embeddings is classified among the other 2B - 1 by cosine similarity / ``temperature``, its
    other view the right answer; the mean cross-entropy. B >= 2 (one volume has no negative)."""
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ConfigError(
            f"contrastive loss needs two (B >= 2, E) views, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
    other = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, other)
