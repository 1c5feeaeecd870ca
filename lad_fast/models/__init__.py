"""Networks. Model code never imports training, I/O or CLI code."""

from __future__ import annotations

from lad_fast.models.blocks import AttentionBlock3d, Downsample3d, ResBlock3d, Upsample3d, set_impl
from lad_fast.models.discriminators import PatchDiscriminator
from lad_fast.models.vqgan import VQGAN, EMAQuantizer, VQOutput

__all__ = [
    "VQGAN",
    "AttentionBlock3d",
    "Downsample3d",
    "EMAQuantizer",
    "PatchDiscriminator",
    "ResBlock3d",
    "Upsample3d",
    "VQOutput",
    "set_impl",
]
