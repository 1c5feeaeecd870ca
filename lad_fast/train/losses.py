"""VQ-GAN losses (Lad phase 1): L1, the locality loss, hinge GAN terms, feature matching, perceptual.

Lad weights (``docs/lad.md``, phase 1): L1 x4, perceptual on a random axial slice x4, 2D slice and 3D
volume PatchGAN (hinge) x0.25 each, feature matching x4, GAN terms from ``gan_start_step`` on, locality
loss weight 1.0 on the bounding box of pancreas + pancreatic lesion.

Perceptual term, offline: LPIPS-VGG needs ImageNet weights that lad-fast never downloads, so
:class:`SlicePerceptualLoss` wraps any frozen feature network the caller supplies: for example a network
whose weights the user keeps in a local file (load it with ``torch.load`` / safetensors before building
the loss), or the encoder of the project's own organ segmenter. With ``perceptual=0`` (the ``tiny``
preset) no network is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.config import VQGANLossConfig
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.errors import ConfigError
from lad_fast.models.discriminators import PatchDiscriminator

OrganGroup = int | Sequence[int]


def l1_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over every element, in fp32: x, recon (B, C, D, H, W) -> scalar."""
    return (x.float() - recon.float()).abs().mean()


def _dilate(region: torch.Tensor, voxels: int) -> torch.Tensor:
    """Binary dilation of (B, G, D, H, W) bool by a (2v+1)^3 cube."""
    if voxels <= 0:
        return region
    k = 2 * voxels + 1
    b, g = region.shape[:2]
    pooled = F.max_pool3d(region.flatten(0, 1)[:, None].float(), k, stride=1, padding=voxels)
    return pooled.view(b, g, *region.shape[2:]) > 0


def _boxes(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes of (B, G, D, H, W) bool: (box mask of the same shape, present (B, G) bool).

    Per axis: project the region onto the axis, take the first and last occupied index (argmax of the
    projection and of its flip), and compare a broadcast arange against them. No loop over the batch.
    """
    present = region.flatten(2).any(-1)
    box = torch.ones_like(region)
    for axis in (2, 3, 4):
        size = region.shape[axis]
        other = tuple(a for a in (2, 3, 4) if a != axis)
        proj = region.any(dim=other)  # (B, G, size)
        lo = proj.int().argmax(-1)  # first occupied index
        hi = size - 1 - proj.flip(-1).int().argmax(-1)  # last occupied index
        ar = torch.arange(size, device=region.device)
        inside = (ar >= lo[..., None]) & (ar <= hi[..., None])  # (B, G, size)
        shape = [*inside.shape[:2], 1, 1, 1]
        shape[axis] = size
        box = box & inside.view(shape)
    return box & present[..., None, None, None], present


def locality_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    mask: torch.Tensor,
    organs: Sequence[OrganGroup],
    weights: Sequence[float] | None = None,
    mode: str = "box",
    dilate: int = 1,
) -> torch.Tensor:
    """Lad's locality loss: L1 between input and reconstruction inside each organ's 3D bounding box.

    x, recon (B, C, D, H, W); mask (B, D, H, W) or (B, 1, D, H, W) integer canonical labels.
    ``organs``: one entry per term, either a label id or a tuple of ids whose union forms one region
    (Lad's single box over pancreas and lesion is ``organs=((5, 6),)``). ``weights``: one per entry
    (default 1.0 each). ``mode="box"``: the axis-aligned box of the region, per sample (Lad);
    ``mode="mask"``: the region itself, dilated by ``dilate`` voxels.

    Returns the scalar ``sum_g w_g * mean_{b has g} L1_{b,g}``, where ``L1_{b,g}`` is the mean absolute
    error over the voxels (and channels) inside sample b's region g. A sample without organ g contributes
    nothing to term g, and the mean is over the samples that have it, so the term's scale does not depend
    on how many samples in the batch show the organ; a term no sample has is 0 (still in the graph, with
    zero gradient). Gradients reach ``recon`` only inside the regions.
    """
    if mode not in ("box", "mask"):
        raise ConfigError(f"locality_loss: mode must be 'box' or 'mask', got {mode!r}")
    if not organs:
        raise ConfigError("locality_loss: organs is empty; give at least one canonical label id")
    weights = [1.0] * len(organs) if weights is None else list(weights)
    if len(weights) != len(organs):
        raise ConfigError(
            f"locality_loss: {len(organs)} organs but {len(weights)} weights; give one weight per organ"
        )
    if mask.ndim == 5 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if x.shape != recon.shape or mask.shape != (x.shape[0], *x.shape[2:]):
        raise ConfigError(
            f"locality_loss: x {tuple(x.shape)} and recon {tuple(recon.shape)} must match, and mask "
            f"{tuple(mask.shape)} must be (B, D, H, W) of the same volume"
        )
    groups = [
        torch.as_tensor([int(i) for i in g] if isinstance(g, tuple | list) else [int(g)], device=mask.device)
        for g in organs
    ]
    region = torch.stack([torch.isin(mask, ids) for ids in groups], dim=1)  # (B, G, D, H, W)
    if mode == "box":
        region, present = _boxes(region)
    else:
        present = region.flatten(2).any(-1)
        region = _dilate(region, dilate)
    err = (x.float() - recon.float()).abs().mean(1)  # (B, D, H, W), mean over channels
    inside = region.float()
    per_sample = (err[:, None] * inside).flatten(2).sum(-1) / inside.flatten(2).sum(-1).clamp_min(
        1.0
    )  # (B, G)
    n = present.sum(0)  # (G,) samples that have each organ
    per_organ = (per_sample * present).sum(0) / n.clamp_min(1)  # (G,)
    w = torch.as_tensor(weights, dtype=per_organ.dtype, device=per_organ.device)
    return (w * per_organ).sum()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(fake logits)."""
    return -fake_logits.float().mean()


def feature_matching_loss(
    real_feats: Sequence[torch.Tensor], fake_feats: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean over layers of L1(fake feature, real feature); the real features are detached."""
    if len(real_feats) != len(fake_feats) or not real_feats:
        raise ConfigError(
            f"feature_matching_loss: got {len(real_feats)} real and {len(fake_feats)} fake feature maps"
        )
    terms = [F.l1_loss(f.float(), r.detach().float()) for r, f in zip(real_feats, fake_feats, strict=True)]
    return torch.stack(terms).mean()


def random_axial_slices(
    *volumes: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """One random axial slice per sample, the same index in every volume: (B, C, D, H, W) -> (B, C, H, W)."""
    b, _, d = volumes[0].shape[:3]
    dev = volumes[0].device
    idx = torch.randint(0, d, (b,), generator=generator, device=generator.device if generator else dev).to(
        dev
    )
    rows = torch.arange(b, device=dev)
    return tuple(v[rows, :, idx] for v in volumes)


class SlicePerceptualLoss(nn.Module):
    """Normalised multi-layer feature L1 under a frozen feature network the caller supplies.

    ``feature_net`` maps (B, C, H, W) (``spatial_dims=2``: random axial slices) or (B, C, D, H, W)
    (``spatial_dims=3``: the whole volume) to one feature map or a list of them. Each map is normalised
    to unit length over channels at every position (as LPIPS does) and the L1 of the difference is
    averaged over positions and layers. The network is frozen and put in eval mode; gradients flow to
    ``recon`` only. ``in_channels`` repeats a grey volume to the channels the network expects.
    Nothing is downloaded: load the network's weights from a local file before building this.
    """

    def __init__(self, feature_net: nn.Module, spatial_dims: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"SlicePerceptualLoss: spatial_dims must be 2 or 3, got {spatial_dims}")
        self.net = feature_net.eval().requires_grad_(False)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels

    def train(self, mode: bool = True) -> SlicePerceptualLoss:
        super().train(mode)
        self.net.eval()  # frozen: keep norm statistics and dropout fixed whatever the caller does
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != self.in_channels:
            x = x.expand(-1, self.in_channels, *x.shape[2:])
        out = self.net(x)
        return list(out) if isinstance(out, list | tuple) else [out]

    def forward(
        self, x: torch.Tensor, recon: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x, recon (B, C, D, H, W) -> scalar."""
        if self.spatial_dims == 2:
            x, recon = random_axial_slices(x, recon, generator=generator)
        terms = []
        for fr, ff in zip(self._features(x), self._features(recon), strict=True):
            fr = F.normalize(fr.float(), dim=1, eps=1e-8)
            ff = F.normalize(ff.float(), dim=1, eps=1e-8)
            terms.append((fr.detach() - ff).abs().mean())
        return torch.stack(terms).mean()


def organ_groups(names: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Canonical organ names -> id groups; ``"a+b"`` is one region made of organs a and b."""
    groups = []
    for name in names:
        ids = []
        for part in name.split("+"):
            if part not in CANONICAL_ID:
                raise ConfigError(
                    f"locality organ {part!r} is not a canonical organ; "
                    f"choose from: {', '.join(CANONICAL_ID)}"
                )
            ids.append(CANONICAL_ID[part])
        groups.append(tuple(ids))
    return tuple(groups)


def make_discriminators(
    cfg: VQGANLossConfig, in_channels: int = 1, layers: int = 3
) -> tuple[PatchDiscriminator, PatchDiscriminator]:
    """Lad's 2D slice and 3D volume PatchGAN discriminators, built in that order (so their initial
    weights, drawn from the caller's RNG stream, are the same whatever uses them)."""
    return (
        PatchDiscriminator(2, in_channels, cfg.disc_channels, layers),
        PatchDiscriminator(3, in_channels, cfg.disc_channels, layers),
    )


class VQGANLoss:
    """All VQ-GAN loss terms with the weights of ``VQGANLossConfig``; it owns no networks.

    ``generator_loss`` and ``discriminator_loss`` return dicts of named fp32 scalars; ``"total"`` is the
    one to backpropagate. The discriminators (:func:`make_discriminators`, or their DDP / compiled
    wrappers) and the perceptual term (a :class:`SlicePerceptualLoss`, required when ``cfg.perceptual > 0``)
    are arguments of each call: the caller trains them with their own optimiser. GAN and
    feature-matching terms are 0 (and not computed) before ``cfg.gan_start_step``.
    """

    def __init__(self, cfg: VQGANLossConfig) -> None:
        if cfg.locality_mode not in ("box", "mask"):
            raise ConfigError(
                f"VQGANLossConfig.locality_mode must be 'box' or 'mask', got {cfg.locality_mode!r}"
            )
        if len(cfg.locality_weights) != len(cfg.locality_organs):
            raise ConfigError(
                f"VQGANLossConfig: {len(cfg.locality_organs)} locality_organs but "
                f"{len(cfg.locality_weights)} "
                "locality_weights; give one weight per organ"
            )
        self.cfg = cfg
        self.organs = organ_groups(cfg.locality_organs)

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.gan_start_step

    def _discs(self, disc_2d: nn.Module | None, disc_3d: nn.Module | None) -> tuple[nn.Module, nn.Module]:
        if disc_2d is None or disc_3d is None:
            raise ConfigError(
                f"VQGANLoss: from gan_start_step={self.cfg.gan_start_step} on, the GAN terms need disc_2d "
                "and disc_3d (lad_fast.train.losses.make_discriminators); pass both"
            )
        return disc_2d, disc_3d

    def generator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        vq_loss: torch.Tensor,
        mask: torch.Tensor | None,
        step: int,
        *,
        disc_2d: nn.Module | None = None,
        disc_3d: nn.Module | None = None,
        perceptual: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """x, recon (B, C, D, H, W); mask (B, D, H, W) canonical labels or None (locality term 0).

        disc_2d, disc_3d: needed from ``gan_start_step`` on; perceptual: needed when ``cfg.perceptual > 0``.
        """
        cfg = self.cfg
        if cfg.perceptual > 0 and perceptual is None:
            raise ConfigError(
                f"VQGANLossConfig.perceptual is {cfg.perceptual} but no perceptual network was given; "
                "lad-fast never downloads LPIPS weights: load a frozen network from a local file "
                f"(perceptual_weights={cfg.perceptual_weights!r}), wrap it in SlicePerceptualLoss and pass "
                "it, or set perceptual to 0"
            )
        zero = x.new_zeros((), dtype=torch.float32)
        terms = {
            "l1": l1_loss(x, recon),
            "vq": vq_loss.float(),
            "locality": zero,
            "perceptual": zero,
            "g_2d": zero,
            "g_3d": zero,
            "feature_matching": zero,
        }
        if mask is not None and self.organs and any(w != 0 for w in cfg.locality_weights):
            terms["locality"] = locality_loss(
                x, recon, mask, self.organs, cfg.locality_weights, cfg.locality_mode
            )
        if perceptual is not None and cfg.perceptual > 0:
            terms["perceptual"] = perceptual(x, recon, generator=generator)
        if self.gan_active(step):
            d2, d3 = self._discs(disc_2d, disc_3d)
            real_2d, fake_2d = random_axial_slices(x, recon, generator=generator)
            logits_2d, fake_feats_2d = d2(fake_2d)
            logits_3d, fake_feats_3d = d3(recon)
            with torch.no_grad():
                real_feats_2d = d2(real_2d)[1]
                real_feats_3d = d3(x)[1]
            terms["g_2d"] = hinge_g_loss(logits_2d)
            terms["g_3d"] = hinge_g_loss(logits_3d)
            terms["feature_matching"] = feature_matching_loss(
                real_feats_2d, fake_feats_2d
            ) + feature_matching_loss(real_feats_3d, fake_feats_3d)
        terms["total"] = (
            cfg.l1 * terms["l1"]
            + terms["vq"]
            + terms["locality"]
            + cfg.perceptual * terms["perceptual"]
            + cfg.gan_2d * terms["g_2d"]
            + cfg.gan_3d * terms["g_3d"]
            + cfg.feature_matching * terms["feature_matching"]
        )
        return terms

    def discriminator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        step: int,
        *,
        disc_2d: nn.Module | None = None,
        disc_3d: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Hinge loss of both discriminators on x (real) and recon (fake, detached); 0 before GAN start."""
        zero = x.new_zeros((), dtype=torch.float32)
        terms = {"d_2d": zero, "d_3d": zero}
        if self.gan_active(step):
            d2, d3 = self._discs(disc_2d, disc_3d)
            recon = recon.detach()
            real_2d, fake_2d = random_axial_slices(x, recon, generator=generator)
            terms["d_2d"] = hinge_d_loss(d2(real_2d)[0], d2(fake_2d)[0])
            terms["d_3d"] = hinge_d_loss(d3(x)[0], d3(recon)[0])
        terms["total"] = self.cfg.gan_2d * terms["d_2d"] + self.cfg.gan_3d * terms["d_3d"]
        return terms
