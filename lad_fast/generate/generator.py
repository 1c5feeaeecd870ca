"""A trained run loaded for sampling: :class:`Generator` (the U-Net, the frozen VQ-GAN, the schedule and
the latent normalisation) and :func:`load_generator`, the only place generation touches the trained-run
loaders (:mod:`lad_fast.runs.loading`). :mod:`lad_fast.generate.generate` drives it.

:func:`load_generator` builds it in one pass: the run is opened and its config parsed once, each
checkpoint is verified and hashed once, and the hashes the manifest records come from those loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lad_fast.errors import CheckpointError

if TYPE_CHECKING:
    from lad_fast.config import LadConfig
    from lad_fast.diffusion.schedules import Schedule
    from lad_fast.models.unet import LatentUNet
    from lad_fast.models.vqgan import VQGAN
    from lad_fast.runs.loading import RunLike

__all__ = ["Generator", "load_generator"]


@dataclass(frozen=True)
class Generator:
    """A trained run loaded for sampling (:func:`load_generator`).

    net: the denoising U-Net (EMA weights, eval mode); vq: the frozen VQ-GAN; sched, prediction: the
    diffusion model's schedule and parameterisation; latent_shape: one latent's (C, d, h, w); clip: the
    sampler's x0 bounds in its (normalised) latent space; encode: mask (D, H, W) -> ``content``
    (C, d, h, w) and ``structure`` (L,) conditions (and ``spatial`` (K, d, h, w) for a model with
    spatial conditioning); denormalize: sampler space -> the VQ-GAN's unit latents; cfg: the run's
    config; meta: the diffusion checkpoint's meta (its ``checkpoint_hash`` included); vqgan_hash: the
    VQ-GAN checkpoint's hash.
    """

    net: LatentUNet
    vq: VQGAN
    cfg: LadConfig
    meta: dict[str, Any]
    sched: Schedule
    prediction: str
    latent_shape: tuple[int, ...]
    clip: Any
    encode: Callable[[np.ndarray], dict[str, torch.Tensor]]
    denormalize: Callable[[torch.Tensor], torch.Tensor]
    vqgan_hash: str
    device: torch.device

    @torch.no_grad()
    def decode(
        self, x0: torch.Tensor, tile: int | None = None, exported: Callable[..., Any] | None = None
    ) -> list[np.ndarray]:
        """Sampled latents (B, C, d, h, w) in sampler space -> B images (D, H, W) in [-1, 1], decoded one
        volume at a time (batch-size independent; batch 1 runs on oneDNN on a CPU, see
        ``kernels/_cpu_conv.py``). tile: None decodes whole unless that would exceed the memory budget
        (then in tiles, :func:`lad_fast.generate.tiled.auto_tile`); 0 always whole; N > 0 in tiles of N latent
        voxels per axis with the exact overlap (:mod:`lad_fast.generate.tiled`: the whole decode's result).
        exported: an exported quantise + decode graph (``lad_fast.export.backends.make_decoder``: unit
        latents -> image), used for every volume that is decoded whole."""
        from lad_fast.generate.tiled import auto_tile, tiled_decode

        x0 = self.denormalize(x0)
        out = []
        for k in range(x0.shape[0]):
            unit = x0[k : k + 1].clamp(-1, 1).float()
            n = (
                auto_tile(self.vq.decoder, unit.shape[1:], unit.device) if tile is None else tile
            )  # quantising keeps the shape
            if exported is not None and not n:
                image = torch.as_tensor(exported(unit))
            else:
                latent = self.vq.quantize(self.vq.from_unit(unit))
                image = tiled_decode(self.vq.decoder, latent, n) if n else self.vq.decode(latent)
            out.append(image[0, 0].float().cpu().numpy())
        return out


def load_generator(run: RunLike, device: torch.device) -> Generator:
    """The diffusion model of ``run`` (a folder or an opened :class:`~lad_fast.runs.rundir.RunDir`) and the
    VQ-GAN it was trained on; CheckpointError when that VQ-GAN changed since. The only place generation
    touches the trained-run loaders."""
    from functools import partial

    from lad_fast.diffusion.schedules import make_schedule
    from lad_fast.runs.loading import (
        clip_bounds,
        denormalize_latents,
        encode_case,
        load_sampling_models,
    )

    models = load_sampling_models(run, device)
    run, meta, cfg, vq = models.rundir.path, models.meta, models.cfg, models.vq
    if meta.get("vqgan_hash") not in (None, models.vqgan_hash):
        raise CheckpointError(
            f"the VQ-GAN in {models.vqgan_run} changed after the diffusion model of {run} was trained on "
            f"its latents; retrain the diffusion model (`lad-fast train diffusion --run {run} --force`) or "
            "restore that VQ-GAN"
        )
    shape = tuple(int(s) for s in meta["latent_shape"])
    norm = meta.get("latent_norm")
    return Generator(
        net=models.net,
        vq=vq,
        cfg=cfg,
        meta=meta,
        sched=make_schedule(meta["diffusion_config"]),
        prediction=meta["diffusion_config"].prediction,
        latent_shape=shape,
        clip=clip_bounds(norm, torch.zeros(1, *shape, device=device)),
        encode=lambda mask: encode_case(vq, None, mask, cfg, device),
        denormalize=partial(denormalize_latents, norm=norm),
        vqgan_hash=models.vqgan_hash,
        device=device,
    )
