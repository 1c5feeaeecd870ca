"""The two graphs lad-fast exports from a trained run: the denoiser step and the VQ-GAN decoder.

* **denoiser**: the U-Net forward ``(x, t, cond[, spatial]) -> prediction`` that the sampler calls once per
  step with the conditional and null branches of classifier-free guidance stacked in one batch (so its
  batch is twice the number of volumes).
* **decoder**: :class:`DecoderGraph`, sampled latents in the VQ-GAN's unit range -> image: clamp to
  [-1, 1], back to latent units, snap to the nearest codes, decode; what ``Generator.decode`` does after
  the latent de-normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lad_fast.models.vqgan import VQGAN

DENOISER_NAMES = ("x", "t", "cond", "spatial")
DECODER_INPUT, DECODER_OUTPUT = "latent", "image"
QUANT_SCOPE = "quant"  # the decoder graph's codebook search: its ONNX nodes are named /quant/...


def denoiser_example(
    net: nn.Module, latent_shape: Sequence[int], objective: str, batch: int = 1, device="cpu"
) -> tuple[list[torch.Tensor], list[str]]:
    """Zero inputs of the denoiser step at ``batch`` and their graph names.

    x (B, C, d, h, w); t (B,) int64 (float32 for a flow-matching model, whose time is continuous);
    cond (B, embed_dim); spatial (B, K, d, h, w) only for a model with spatial conditioning.
    """
    t_dtype = torch.float32 if objective == "flow" else torch.long
    example = [
        torch.zeros(batch, *latent_shape, device=device),
        torch.zeros(batch, dtype=t_dtype, device=device),
        torch.zeros(batch, net.cond_cfg.embed_dim, device=device),
    ]
    spatial = getattr(net, "spatial_channels", 0)
    if spatial:
        example.append(torch.zeros(batch, spatial, *latent_shape[1:], device=device))
    return example, list(DENOISER_NAMES[: len(example)])


class _Quantize(nn.Module):
    """u (B, C, d, h, w) in [-1, 1] units -> nearest codes (B, C, d, h, w), all in fp32.

    The same search as ``EMAQuantizer.nearest`` (argmin of ||c||^2 - 2 z.c; lowest index on ties) written
    without its row chunks and ``out=`` buffers, which the ONNX exporter would unroll for one batch size.
    """

    def __init__(self, vq: VQGAN) -> None:
        super().__init__()
        codebook = vq.quantizer.codebook.detach().float().clone()
        lo, hi = vq._scale_tensors()
        self.register_buffer("codebook", codebook)
        self.register_buffer("code_norms", (codebook * codebook).sum(1))
        self.register_buffer("lo", lo.detach().float().clone())
        self.register_buffer("span", (hi - lo).detach().float().clone())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = (u.float().clamp(-1, 1) + 1.0) * 0.5 * self.span + self.lo  # VQGAN.from_unit
        b, c = z.shape[:2]
        # explicit permutes: the exporter writes movedim's negative axes into Transpose, which ONNX refuses
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, c)  # (N, C)
        score = self.code_norms[None] - 2.0 * flat @ self.codebook.t()  # (N, K); ||z||^2 is common
        idx = score.argmin(dim=1)
        codes = self.codebook[idx]  # (N, C)
        return codes.reshape(b, *z.shape[2:], c).permute(0, 4, 1, 2, 3)


class DecoderGraph(nn.Module):
    """latent (B, C, d, h, w) in the VQ-GAN's unit range -> image (B, 1, D, H, W) in [-1, 1]."""

    def __init__(self, vq: VQGAN) -> None:
        super().__init__()
        setattr(self, QUANT_SCOPE, _Quantize(vq))
        self.decoder = vq.decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(getattr(self, QUANT_SCOPE)(latent))


def decoder_fp32_nodes(model) -> list[str]:
    """Node names of the decoder graph's codebook search (kept fp32 by AutoCast)."""
    return [n.name for n in model.graph.node if n.name.startswith(f"/{QUANT_SCOPE}/")]
