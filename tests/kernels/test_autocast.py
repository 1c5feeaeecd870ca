"""Autocast: conv3d, norm_act_conv3d and attention run in the autocast dtype, as ``F.conv3d`` and SDPA do,
while vq_nearest searches in fp32.

The torch path is tested under bf16 CPU autocast; the Triton path under fp16 autocast, with the
interpreter on CPU (bf16 is silently wrong under the interpreter) and the real kernels on a GPU.
Oracles are computed in fp32 from the inputs rounded to the autocast dtype, i.e. exactly the values an
autocast op sees.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.kernels import (
    attention,
    conv3d,
    norm_act_conv3d,
    norm_act_conv3d_ref,
    vq_nearest,
    vq_nearest_ref,
)


def _randn(*shape: int, seed: int, scale: float = 1.0, dev: torch.device | str = "cpu") -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dev)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone().requires_grad_(True) for t in tensors]


def _rounded(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """fp32 leaves holding the values that an autocast op in ``dtype`` sees."""
    return [t.detach().to(dtype).float().requires_grad_(True) for t in tensors]


# ------------------------------------------------------------------------------ torch path, bf16


def test_torch_path_follows_autocast():
    x, w, b = _randn(1, 3, 3, 4, 5, seed=0), _randn(4, 3, 3, 3, 3, seed=1, scale=0.2), _randn(4, seed=2)
    q, k, v = (_randn(1, 2, 5, 16, seed=s) for s in (3, 4, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv3d(x, w, b, padding=1, impl="torch")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, F.conv3d(x, w, b, padding=1), atol=0, rtol=0)
        # Mixed dtypes are what autocast produces (bf16 activations, fp32 parameters): accepted.
        mixed = attention(q, k.bfloat16(), v.bfloat16(), impl="torch")
    assert mixed.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    torch.testing.assert_close(mixed, expected, atol=0, rtol=0)


def test_vq_nearest_stays_fp32_under_autocast():
    # Random codes 0.1 apart on average: a bf16 matmul would change the distances and some argmins.
    z, codebook = _randn(300, 8, seed=6), _randn(200, 8, seed=7)
    want_idx, want_dist = vq_nearest_ref(z, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_idx, ref_dist = vq_nearest_ref(z, codebook)
        idx, dist = vq_nearest(z.bfloat16(), codebook, impl="torch")  # mixed dtypes: both cast to fp32
    assert torch.equal(ref_idx, want_idx) and torch.equal(ref_dist, want_dist)
    assert dist.dtype == torch.float32
    z_idx, z_dist = vq_nearest_ref(z.bfloat16().float(), codebook)
    assert torch.equal(idx, z_idx) and torch.equal(dist, z_dist)


def test_mixed_dtypes_outside_autocast_still_raise():
    with pytest.raises(ConfigError, match="share one dtype"):
        vq_nearest(_randn(3, 4, seed=0).half(), _randn(5, 4, seed=1), impl="torch")
    q = _randn(1, 1, 3, 16, seed=2)
    with pytest.raises(ConfigError, match="share one dtype"):
        attention(q, q.half(), q.half(), impl="torch")


# ------------------------------------------------------------------------ Triton path, fp16


def test_triton_conv3d_under_fp16_autocast(device, close):
    x, w, b = _leaves(
        _randn(1, 3, 3, 4, 5, seed=0, dev=device),
        _randn(4, 3, 3, 3, 3, seed=1, dev=device, scale=0.2),
        _randn(4, seed=2, dev=device),
    )
    grad_out = _randn(1, 4, 3, 4, 5, seed=3, dev=device)
    with torch.autocast(device.type, dtype=torch.float16):
        out = conv3d(x, w, b, padding=1, impl="triton")
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out, (x, w, b), grad_out.half())
    assert all(g.dtype == torch.float32 for g in grads)  # gradients come back in the leaves' dtype

    rx, rw, rb = _rounded([x, w, b], torch.float16)
    ref = F.conv3d(rx, rw, rb, padding=1)
    ref_grads = torch.autograd.grad(ref, (rx, rw, rb), grad_out.half().float())
    close(out, ref, torch.float16)
    for got, want in zip(grads, ref_grads, strict=True):
        close(got, want, torch.float16, scale=5.0)


def test_triton_norm_act_conv3d_under_fp16_autocast(device, close):
    c = 4
    x = _randn(1, c, 3, 4, 5, seed=0, dev=device, scale=1.5)
    gamma, beta = 1.0 + 0.5 * _randn(c, seed=1, dev=device), 0.5 * _randn(c, seed=2, dev=device)
    w, b, res = (
        _randn(3, c, 3, 3, 3, seed=3, dev=device, scale=0.2),
        _randn(3, seed=4, dev=device),
        _randn(1, 3, 3, 4, 5, seed=5, dev=device),
    )
    leaves = _leaves(x, gamma, beta, w, b, res)
    grad_out = _randn(1, 3, 3, 4, 5, seed=6, dev=device)
    with torch.autocast(device.type, dtype=torch.float16):
        lx, lg, lb, lw, lbias, lres = leaves
        out = norm_act_conv3d(lx, lg, lb, 2, lw, lbias, lres, padding=1, impl="triton")
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out, leaves, grad_out.half())

    # Oracle: x, weight, bias, residual rounded to fp16; gamma and beta stay fp32 (GroupNorm runs in fp32).
    rx, rw, rb, rres = _rounded([x, w, b, res], torch.float16)
    rg, rbeta = _leaves(gamma, beta)
    ref = norm_act_conv3d_ref(rx, rg, rbeta, 2, rw, rb, rres, padding=1)
    ref_grads = torch.autograd.grad(ref, (rx, rg, rbeta, rw, rb, rres), grad_out.half().float())
    close(out, ref, torch.float16, scale=2.0)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        close(got, want, torch.float16, scale=10.0)


def test_triton_attention_under_fp16_autocast(device, close):
    q, k, v = _leaves(*(_randn(1, 2, 7, 16, seed=s, dev=device) for s in (0, 1, 2)))
    grad_out = _randn(1, 2, 7, 16, seed=3, dev=device)
    with torch.autocast(device.type, dtype=torch.float16):
        out = attention(q, k, v, impl="triton")
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out, (q, k, v), grad_out.half())

    rq, rk, rv = _rounded([q, k, v], torch.float16)
    ref = F.scaled_dot_product_attention(rq, rk, rv)
    ref_grads = torch.autograd.grad(ref, (rq, rk, rv), grad_out.half().float())
    close(out, ref, torch.float16)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        close(got, want, torch.float16, scale=5.0)


def test_triton_vq_nearest_under_fp16_autocast(device):
    z, codebook = _randn(37, 8, seed=0, dev=device), _randn(21, 8, seed=1, dev=device)
    want_idx, want_dist = vq_nearest(z.half().float(), codebook, impl="triton")
    with torch.autocast(device.type, dtype=torch.float16):
        idx, dist = vq_nearest(z.half(), codebook, impl="triton")
    assert torch.equal(idx, want_idx) and torch.equal(dist, want_dist)


def test_compiled_autocast_region_has_no_graph_break(device):
    """Autocast entered inside the compiled function: the casts are traced, no graph break."""
    x, w = _randn(1, 3, 2, 3, 4, seed=0, dev=device), _randn(4, 3, 1, 1, 1, seed=1, dev=device)
    q = _randn(1, 1, 5, 16, seed=2, dev=device)
    z, codebook = _randn(9, 4, seed=3, dev=device), _randn(6, 4, seed=4, dev=device)

    def step(x, w, q, z, codebook):
        with torch.autocast(device.type, dtype=torch.float16):
            y = conv3d(x, w, impl="triton")
            o = attention(q, q, q, impl="triton")
            _, dist = vq_nearest(z.half(), codebook, impl="triton")
        return y, o, dist

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, w, q, z, codebook)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    y, o, dist = torch.compile(step, backend="aot_eager", fullgraph=True)(x, w, q, z, codebook)
    assert (y.dtype, o.dtype, dist.dtype) == (torch.float16, torch.float16, torch.float32)
