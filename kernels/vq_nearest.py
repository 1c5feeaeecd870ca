"""Nearest-code search for vector quantisation: squared distance and argmin over a codebook.

Until the Triton kernel lands, every impl runs the PyTorch reference.
"""

from __future__ import annotations

import torch

from lad_fast.kernels._dispatch import resolve_impl


def vq_nearest_ref(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: z (N, D), codebook (K, D) -> (indices int64 (N,), squared distances fp32 (N,)).

    Distances are computed in fp32 whatever the input dtype (MONAI practice: VQ distances in fp32).
    Materialises the (N, K) matrix; the Triton kernel does not.
    """
    z32, c32 = z.float(), codebook.float()
    d = (z32 * z32).sum(1, keepdim=True) - 2.0 * (z32 @ c32.t()) + (c32 * c32).sum(1)[None, :]
    dist, idx = d.min(dim=1)
    return idx, dist.clamp_min(0.0)


def vq_nearest(
    z: torch.Tensor, codebook: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of each row of ``z`` (N, D) in ``codebook`` (K, D): (indices (N,), distances (N,))."""
    resolve_impl(impl, z, codebook)
    return vq_nearest_ref(z, codebook)
