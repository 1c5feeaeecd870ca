"""3D convolution and the fused GroupNorm-apply + SiLU + conv + bias + residual used by res blocks.

Until the Triton kernels land, every impl runs the PyTorch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lad_fast.kernels._dispatch import resolve_impl

IntOr3 = int | tuple[int, int, int]


def conv3d_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0,
) -> torch.Tensor:
    """Reference: ``F.conv3d``. x (N, C, D, H, W), weight (O, C, kd, kh, kw) -> (N, O, D', H', W')."""
    return F.conv3d(x, weight, bias, stride=stride, padding=padding)


def conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0, impl: str = "auto",
) -> torch.Tensor:
    """Same result as ``torch.nn.functional.conv3d`` for these arguments."""
    resolve_impl(impl, x, weight)
    return conv3d_ref(x, weight, bias, stride, padding)


def norm_act_conv3d_ref(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, weight: torch.Tensor,
    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0, eps: float = 1e-6,
) -> torch.Tensor:
    """Reference of the res-block chain: conv3d(silu(group_norm(x))) + bias (+ residual).

    x (N, C, D, H, W); gamma, beta (C,); weight (O, C, k, k, k); residual (N, O, D', H', W') or None.
    """
    h = F.silu(F.group_norm(x, groups, gamma, beta, eps))
    out = F.conv3d(h, weight, bias, stride=stride, padding=padding)
    return out if residual is None else out + residual


def norm_act_conv3d(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, weight: torch.Tensor,
    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None, stride: IntOr3 = 1,
    padding: IntOr3 = 0, eps: float = 1e-6, impl: str = "auto",
) -> torch.Tensor:
    """GroupNorm-apply and SiLU in the input load, bias and residual add in the output store."""
    resolve_impl(impl, x, weight)
    return norm_act_conv3d_ref(x, gamma, beta, groups, weight, bias, residual, stride, padding, eps)
