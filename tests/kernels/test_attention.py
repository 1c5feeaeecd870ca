"""attention: the Triton forward and backward (interpreter on CPU) against SDPA in higher precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lad_fast.errors import BackendUnavailableError, ConfigError
from lad_fast.kernels import attention

# Gradients sum over L products more than the forward: widen the per-dtype tolerances for them.
GRAD_SCALE = 2.0

# The kernels run where the tests find CUDA, else in the interpreter on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(shape, dtype, seed=0, transposed=False):
    """q, k, v leaves of ``shape`` (B, H, L, d); ``transposed`` makes them (B, L, H, d) views."""
    g = torch.Generator().manual_seed(seed)
    b, h, seq, d = shape
    out = []
    for _ in range(3):
        if transposed:
            t = torch.randn(b, seq, h, d, generator=g).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(b, h, seq, d, generator=g).to(dtype)
        out.append(t.to(DEVICE).requires_grad_(True))
    return out


def _check_against_reference(q, k, v, grad_out, dtype, close):
    out = attention(q, k, v, impl="triton")
    assert out.shape == q.shape and out.dtype == dtype
    grad_out = grad_out.to(q.device)
    out.backward(grad_out)
    # Oracle: SDPA in float64 for fp32 inputs, float32 for fp16 inputs, on the same rounded values.
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    qr, kr, vr = (t.detach().to(hi).requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr)
    ref.backward(grad_out.to(hi))
    close(out, ref, dtype)
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        close(got, want, dtype, scale=GRAD_SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("seq", [1, 5, 17, 33])
def test_forward_and_gradients(seq, d, dtype, close):
    # Batch and heads vary with L so that both 1 and 2 appear without multiplying the case count.
    b, h = (1, 2) if seq in (1, 17) else (2, 1)
    q, k, v = _inputs((b, h, seq, d), dtype, seed=seq * 100 + d)
    grad_out = torch.randn(b, h, seq, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    _check_against_reference(q, k, v, grad_out, dtype, close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("seq", "d"), [(1, 64), (9, 64), (9, 128)])
def test_wide_heads(seq, d, dtype, close):
    q, k, v = _inputs((1, 1, seq, d), dtype, seed=d + seq)
    grad_out = torch.randn(1, 1, seq, d, generator=torch.Generator().manual_seed(8)).to(dtype)
    _check_against_reference(q, k, v, grad_out, dtype, close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs_and_grad(dtype, close):
    # (B, L, H, d) projections viewed as (B, H, L, d), as the U-Net's attention blocks produce them.
    q, k, v = _inputs((2, 2, 7, 16), dtype, seed=11, transposed=True)
    assert not q.is_contiguous()
    grad_out = torch.randn(2, 7, 2, 16, generator=torch.Generator().manual_seed(9)).to(dtype).transpose(1, 2)
    _check_against_reference(q, k, v, grad_out, dtype, close)
    assert q.grad.shape == q.shape


def test_packed_qkv_views(close):
    # One (B, L, 3, H, d) projection unbound into q, k, v strided views, as AttentionBlock3d does.
    qkv = (
        torch.randn(2, 9, 3, 2, 16, generator=torch.Generator().manual_seed(12))
        .to(DEVICE)
        .requires_grad_(True)
    )
    grad_out = torch.randn(2, 2, 9, 16, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), impl="triton").backward(grad_out)
    ref_qkv = qkv.detach().double().requires_grad_(True)
    F.scaled_dot_product_attention(*ref_qkv.permute(2, 0, 3, 1, 4).unbind(0)).backward(grad_out.double())
    close(qkv.grad, ref_qkv.grad, torch.float32, scale=GRAD_SCALE)


def test_large_logits_stay_finite(close):
    # Scores of a few hundred: the online softmax must subtract the running max before exp2, or the
    # output and every gradient overflow to inf/NaN.
    q, k, v = _inputs((1, 1, 20, 16), torch.float32, seed=5)
    with torch.no_grad():
        q.mul_(30.0)
        k.mul_(30.0)
    grad_out = torch.randn(1, 1, 20, 16, generator=torch.Generator().manual_seed(6))
    out = attention(q, k, v, impl="triton")
    out.backward(grad_out)
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr)
    ref.backward(grad_out.double())
    close(out, ref, torch.float32)
    # The backward recomputes the scores (~|s| = 600 here) in another summation order than the forward
    # that stored the log-sum-exp: p = exp(s' - lse) then carries a relative error of about |s| * eps
    # (1e-4 here), which flash-style recomputation cannot avoid. The gradient tolerance is widened by
    # that bound, not by a guess; a missing max subtraction still fails with inf/NaN.
    scores = (qr @ kr.transpose(-1, -2)) / qr.shape[-1] ** 0.5
    fp32_rtol = 2e-5  # conftest's TOLERANCES[torch.float32]
    recompute = 4 * float(scores.abs().max()) * torch.finfo(torch.float32).eps / fp32_rtol
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert torch.isfinite(got).all()
        close(got, want, torch.float32, scale=max(GRAD_SCALE, recompute))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and the compiled kernel need CUDA")
@pytest.mark.parametrize("d", [32, 64, 128])
def test_bf16_on_cuda(d, close):
    q, k, v = (t.detach().cuda().requires_grad_(True) for t in _inputs((2, 3, 300, d), torch.bfloat16))
    grad_out = torch.randn_like(q)
    _check_against_reference(q, k, v, grad_out, torch.bfloat16, close)


def test_errors_name_the_problem():
    q = torch.zeros(1, 2, 5, 16)
    with pytest.raises(ConfigError, match=r"shape \(B, heads, L, d\)"):
        attention(q[0], q[0], q[0], impl="triton")
    with pytest.raises(ConfigError, match="one shape"):
        attention(q, q, torch.zeros(1, 2, 6, 16), impl="triton")
    with pytest.raises(ConfigError, match="share one dtype"):
        attention(q, q.half(), q, impl="triton")
    with pytest.raises(ConfigError, match="share one dtype"):
        attention(q.double(), q.double(), q.double(), impl="triton")
    with pytest.raises(ConfigError, match="one device"):
        attention(q, q.to("meta"), q, impl="triton")
    odd = torch.zeros(1, 2, 5, 24, device=DEVICE)
    with pytest.raises(ConfigError, match=r"supports head dims \(16, 32, 64, 128\), got 24"):
        attention(odd, odd, odd, impl="triton")
    assert attention(odd, odd, odd, impl="torch").shape == odd.shape  # the reference takes any head dim


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    q = torch.zeros(1, 1, 3, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="set TRITON_INTERPRET=1"):
        attention(q, q, q, impl="triton")


def test_autotune_pruning_keeps_fitting_tiles():
    import triton

    from lad_fast.kernels import _attention_triton

    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for s in (2, 4)
    ]
    prune = _attention_triton._make_prune("BLOCK_M", "BLOCK_N", "fwd")
    kept = prune(configs, {"L": 40}, HEAD_DIM=128)
    assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
    assert all(c.num_stages <= 3 for c in kept)
    assert prune(configs, {"L": 4096}, HEAD_DIM=32) == configs


def test_fp32_follows_the_matmul_tf32_switch(monkeypatch):
    """fp32 attention uses TF32 exactly when PyTorch's matmul switch allows it (as SDPA does)."""
    from lad_fast.kernels import _attention_triton

    monkeypatch.setattr(_attention_triton, "interpreter_on", lambda: False)
    matmul = torch.backends.cuda.matmul  # a module proxy: monkeypatch cannot restore its attributes
    old = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert _attention_triton._ieee(torch.float32)
        matmul.allow_tf32 = True
        assert not _attention_triton._ieee(torch.float32)
        assert not _attention_triton._ieee(torch.float16)
    finally:
        matmul.allow_tf32 = old
