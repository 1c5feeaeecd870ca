"""Fused attention over flattened 3D tokens. Until the Triton kernel lands, every impl runs SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lad_fast.kernels._dispatch import resolve_impl


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(d)) v with q, k, v of shape (B, heads, L, d)."""
    return F.scaled_dot_product_attention(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Attention with shapes as ``scaled_dot_product_attention``: (B, heads, L, d) -> (B, heads, L, d)."""
    resolve_impl(impl, q, k, v)
    return attention_ref(q, k, v)
