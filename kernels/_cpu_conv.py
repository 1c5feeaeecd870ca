"""Batch-1 3D convolutions on the CPU's fast path (oneDNN) at inference.

PyTorch's CPU dispatcher sends most batch-1 fp32 ``conv3d`` calls to ``aten::slow_conv3d`` (an im2col
GEMM that also allocates a C*k^3 x voxels column buffer) instead of oneDNN; ``torch.profiler`` shows it:
3 of the 4 convs of the tiny VQ-GAN decoder at batch 1, none at batch 2. Measured on the two-core
development machine (one thread, per call): a 64->32 channel 3x3x3 conv on 8x32x32 took 75.7 ms through
``slow_conv3d`` and 4.6 ms through ``aten::mkldnn_convolution``; the tiny decoder went from 0.28 s to
the same per-volume time as at batch 2 (interleaved, one thread, shared machine: decode 252 ms per
volume at batch 1 on oneDNN, 282 ms at batch 2, 957 ms at batch 1 through slow_conv3d; encode 76 vs 54 ms,
minima 40 vs 47 ms), so ``generate`` keeps encoding and decoding one volume at a time (which also keeps
a volume independent of its batch). Neither ``channels_last_3d`` inputs nor weights changed the
choice reliably, so :func:`cpu_conv3d` calls oneDNN explicitly.

Only where that is safe: CPU fp32 tensors, batch 1, nothing that needs a gradient, not under
``torch.jit`` tracing (ONNX export) or ``torch.compile`` (they must see plain ``F.conv3d``), and oneDNN
built in. Everything else goes to ``F.conv3d`` unchanged. ``LAD_FAST_ONEDNN_BATCH1=0`` turns it off.
Results equal ``F.conv3d`` within fp32 rounding (``tests/kernels/test_cpu_conv.py``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # graphs must hold plain F.conv3d
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.shape[0] != 1:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return torch.backends.mkldnn.is_available() and os.environ.get("LAD_FAST_ONEDNN_BATCH1", "1") != "0"


def cpu_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int, int] = 1,
    padding: int | tuple[int, int, int] = 0,
    dilation: int | tuple[int, int, int] = 1,
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding, dilation)``; x (1, C, D, H, W) fp32 on the CPU without
    gradients runs through oneDNN (see the module docstring), anything else through ``F.conv3d``."""
    if not _eligible(x, weight, bias):
        return F.conv3d(x, weight, bias, stride=stride, padding=padding, dilation=dilation)
    s, p, d = (list(v) if isinstance(v, (tuple, list)) else [int(v)] * 3 for v in (stride, padding, dilation))
    out = torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, p, s, d, 1)
    return out.contiguous()  # callers (and the next slow-path op) expect the default layout
