"""The kernel op calls a preset's models make in training, recorded on meta tensors (no data, no GPU).

:func:`kernel_calls` runs one training forward and backward of the preset's VQ-GAN (encoder, nearest-code
search, decoder) and of its denoiser at the preset's training batch sizes, on *meta* tensors with the ops
taking their Triton path (:func:`lad_fast.kernels.aot.record_op_calls`), and returns every distinct
``lad_fast::*`` call: op and argument shapes, strides and dtypes. That is what the ahead-of-time compile
check (``lad_fast.kernels.aot``) compiles the kernels for. It lives here, not in ``kernels/``, because
kernels sit below models: the models import the kernels, never the reverse. Inference makes the same
forward calls (at other batch sizes, which change no autotune prune but vq_nearest's row bucket).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lad_fast.conditioning.conditions import spatial_channels, structure_dim
from lad_fast.config import get_preset
from lad_fast.kernels import vq_nearest
from lad_fast.kernels.aot import OpCall, record_op_calls
from lad_fast.models.unet import build_unet
from lad_fast.models.vqgan import VQGAN

__all__ = ["kernel_calls", "training_runs"]


def training_runs(preset: str) -> list[Callable[[], None]]:
    """A forward and backward of the preset's VQ-GAN and of its denoiser, each a callable, on meta
    tensors of the training batch sizes (models built on the meta device: no memory, no initialisation)."""
    cfg = get_preset(preset)
    vol = cfg.geometry.shape
    latent = tuple(s // 2 ** (len(cfg.vqgan.channels) - 1) for s in vol)
    sdim = structure_dim(vol[0], cfg.condition)
    with torch.device("meta"):
        vqgan = VQGAN(cfg.vqgan)
        unet = build_unet(cfg.unet, cfg.condition, cfg.vqgan.latent_channels, sdim)

    def run_vqgan() -> None:
        x = torch.empty(cfg.vqgan_train.batch_size, cfg.vqgan.in_channels, *vol, device="meta")
        # The training forward's kernel calls without its EMA codebook update (bincount has no meta
        # shape): encoder, the quantiser's nearest-code search (called directly: EMAQuantizer.nearest
        # opens autocast on the tensors' device, and there is no meta autocast), decoder.
        z = vqgan.encode_pre_quant(x)
        vq_nearest(z.movedim(1, -1).reshape(-1, cfg.vqgan.code_dim).float(), vqgan.quantizer.codebook.float())
        vqgan.decode(z).float().mean().backward()

    def run_unet() -> None:
        b, c = cfg.diffusion_train.batch_size, cfg.vqgan.latent_channels
        z, content = (torch.empty(b, c, *latent, device="meta") for _ in range(2))
        structure = torch.empty(b, sdim, device="meta")
        t = torch.zeros(b, dtype=torch.int64, device="meta")
        k = spatial_channels(cfg.condition)
        extra = (torch.empty(b, k, *latent, device="meta"),) if k else ()
        unet(z, t, unet.embed_condition(content, structure), *extra).float().mean().backward()

    return [run_vqgan, run_unet]


def kernel_calls(preset: str) -> list[OpCall]:
    """The distinct ``lad_fast::*`` op calls of one training forward and backward of the preset's models."""
    return record_op_calls(training_runs(preset))
