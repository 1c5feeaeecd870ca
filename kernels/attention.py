"""Fused attention over flattened 3D tokens (the U-Net's attention blocks).

The Triton path (``kernels/_attention_triton.py``) is flash-attention-2: forward with online softmax and
fp32 statistics, backward from the stored logsumexp (delta preprocess, then separate dK/dV and dQ
kernels: deterministic, no atomics). It is registered as the custom ops ``lad_fast::attention_fwd`` and
``lad_fast::attention_bwd`` (the latter as the former's autograd formula), so ``torch.compile`` keeps
forward and backward inside its graphs.

Precision of fp32 inputs on a GPU: TF32 tensor-core products when ``torch.backends.cuda.matmul.allow_tf32``
is on (``torch.set_float32_matmul_precision("high")``), exact fp32 FMA products when it is off, PyTorch's
default, as for matmul and SDPA's math path. The exact path has no tensor cores; its autotune configs are
pruned to tiles that do not spill (``kernels/_limits.py``). At the presets' sequence lengths (at most 512
tokens) attention is a small part of a training step either way; fp32 training that wants tensor cores
here too sets the matmul precision to "high". Softmax statistics are fp32 on every path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.kernels._dispatch import autocast_inputs, resolve_impl

HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs >= 16 and power-of-two tiles; 16 is the tiny preset's
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(d)) v with q, k, v of shape (B, heads, L, d)."""
    return F.scaled_dot_product_attention(q, k, v)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ConfigError(
            f"attention expects q, k, v of shape (B, heads, L, d), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}; reshape tokens to (B, heads, L, d) first"
        )
    if not (q.shape == k.shape == v.shape):
        raise ConfigError(
            f"attention expects q, k and v of one shape (self-attention), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ConfigError(
            f"attention: q, k, v must share one dtype among float32/float16/bfloat16, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}; cast them together"
        )
    if not (q.device == k.device == v.device):
        raise ConfigError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _attention_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, d) x3 -> (O contiguous (B, H, L, d), base-2 logsumexp fp32 (B, H, L))."""
    from lad_fast.kernels import _attention_triton

    # Strided views (e.g. a (B, L, H, d) transpose) are read in place; see _attention_triton.
    return _attention_triton.forward(q, k, v)


_attention_fwd_op = torch.library.custom_op("lad_fast::attention_fwd", mutates_args=())(_attention_fwd_impl)


@_attention_fwd_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, seq, d = q.shape
    o = torch.empty((b, h, seq, d), dtype=q.dtype, device=q.device)
    return o, torch.empty((b, h, seq), dtype=torch.float32, device=q.device)


def _attention_bwd_impl(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dQ, dK, dV), each contiguous (B, H, L, d), from dO and the forward's saved tensors."""
    from lad_fast.kernels import _attention_triton

    return _attention_triton.backward(grad_out, q, k, v, o.contiguous(), lse.contiguous())


_attention_bwd_op = torch.library.custom_op("lad_fast::attention_bwd", mutates_args=())(_attention_bwd_impl)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, o, lse):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    return _attention_bwd_op(grad_out, q, k, v, o, lse)


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, no mask; shapes as ``scaled_dot_product_attention``.

    q, k, v: (B, heads, L, d), one dtype (float32, float16, bfloat16) and device; any strides.
    Returns (B, heads, L, d). The Triton path supports d in {16, 32, 64, 128} and any L. Under autocast
    q, k and v are cast to the autocast dtype first, as autocast does for SDPA.
    """
    q, k, v = autocast_inputs(q, k, v)
    _check(q, k, v)
    if resolve_impl(impl, q, k, v) == "torch":
        return attention_ref(q, k, v)
    if q.shape[-1] not in HEAD_DIMS:
        raise ConfigError(
            f"attention (triton) supports head dims {HEAD_DIMS}, got {q.shape[-1]}; change heads/head_dim "
            "in the config or use impl='torch'"
        )
    if q.shape[2] == 0:
        return attention_ref(q, k, v)  # nothing to launch; SDPA defines the empty result
    return _attention_fwd_op(q, k, v)[0]
