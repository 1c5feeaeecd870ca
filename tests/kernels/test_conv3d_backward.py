"""The Triton backward of conv3d and norm_act_conv3d (interpreter on CPU) against PyTorch.

dgrad and wgrad are compared with ``torch.nn.grad.conv3d_input`` / ``conv3d_weight``, and the fused
op's gradients with the unfused chain conv3d(silu(group_norm(x))) + bias + residual, each computed in
float64 (fp32 inputs) or float32 (fp16 inputs) from the same rounded input values.

Tolerance table (atol = rtol, the conftest row times the gradient scale 5 / 10 of test_conv3d.py):

=========  ==================  ========================================================
dtype      atol = rtol         why
=========  ==================  ========================================================
float32    1e-4  (2e-5 x 5)    fp32 accumulation over up to taps x channels products
float16    2e-2  (2e-3 x 10)   operands and the stored gradient rounded to fp16 (2^-11)
bfloat16   4e-2  (2e-2 x 2)    CUDA only (the interpreter computes bf16 wrongly)
=========  ==================  ========================================================
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lad_fast.kernels import _conv3d_triton, conv3d, norm_act_conv3d, norm_act_conv3d_ref

# The kernels run where the tests find CUDA, else in the interpreter on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAD_SCALE = {torch.float32: 5.0, torch.float16: 10.0, torch.bfloat16: 2.0}


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider last axis)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


CASES = [
    # (x shape, out channels, kernel, stride, padding, non-contiguous x and dy)
    ((1, 1, 1, 1, 1), 1, (1, 1, 1), 1, 0, False),  # minimal
    ((1, 3, 5, 6, 7), 5, (3, 3, 3), 1, 1, False),  # odd sizes, "same" padding
    ((1, 4, 7, 6, 5), 3, (3, 3, 3), 2, 0, True),  # strided, several taps masked per row
    ((2, 3, 6, 8, 8), 4, (4, 4, 4), 2, 1, False),  # kernel 4, stride 2 (VQ-GAN down-sampling)
    ((1, 2, 5, 8, 7), 3, (2, 4, 3), (1, 3, 2), (1, 2, 0), True),  # mixed per-axis geometry
    ((1, 2, 4, 5, 6), 3, (3, 3, 3), 1, 2, False),  # padding beyond the kernel's reach
    ((2, 17, 2, 3, 3), 20, (1, 1, 1), 1, 0, True),  # several channel blocks on both sides
    ((1, 17, 2, 3, 3), 18, (3, 3, 3), 1, 1, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,out_ch,kernel,stride,padding,strided", CASES)
def test_dgrad_wgrad_match_torch_nn_grad(dtype, shape, out_ch, kernel, stride, padding, strided, close):
    gen = torch.Generator().manual_seed(sum(shape) + out_ch)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(out_ch, shape[1], *kernel, generator=gen) / (shape[1] * kernel[0]) ** 0.5).to(
        DEVICE, dtype
    )
    b = torch.randn(out_ch, generator=gen).to(DEVICE, dtype)
    xl = (_strided(x) if strided else x).requires_grad_(True)
    wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = conv3d(xl, wl, bl, stride, padding, impl="triton")
    dy = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    gx, gw, gb = torch.autograd.grad(out, [xl, wl, bl], _strided(dy) if strided else dy)

    r = _ref_dtype(dtype)
    gx_ref = torch.nn.grad.conv3d_input(shape, w.to(r), dy.to(r), stride=stride, padding=padding)
    gw_ref = torch.nn.grad.conv3d_weight(x.to(r), w.shape, dy.to(r), stride=stride, padding=padding)
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    assert gx.shape == x.shape and gw.shape == w.shape
    close(gx, gx_ref, dtype, scale=GRAD_SCALE[dtype])
    close(gw, gw_ref, dtype, scale=GRAD_SCALE[dtype])
    close(gb, dy.to(r).sum((0, 2, 3, 4)), dtype, scale=GRAD_SCALE[dtype])


NORM_CASES = [
    # (x shape, out ch, kernel, groups, stride, padding, bias, residual, offset)
    ((1, 4, 4, 5, 6), 3, (3, 3, 3), 2, 1, 1, True, True, 0.0),
    ((2, 6, 3, 8, 8), 4, (1, 4, 4), 3, (1, 2, 2), (0, 1, 1), False, False, 0.0),  # U-Net down-sampling
    ((1, 4, 5, 4, 3), 5, (2, 3, 3), 1, 2, 2, True, False, 30.0),  # |mean| >> std
    ((2, 4, 3, 4, 5), 4, (1, 1, 1), 4, 1, 0, True, True, 0.0),  # the in-load prologue (one tap)
]


def _norm_grads(dtype, shape, out_ch, kernel, groups, stride, padding, with_bias, with_res, offset):
    gen = torch.Generator().manual_seed(7 + sum(shape))
    c = shape[1]
    x = (torch.randn(shape, generator=gen) * 1.5 + offset).to(dtype)
    gamma = (1.0 + 0.5 * torch.randn(c, generator=gen)).to(dtype)
    beta = (0.5 + 0.5 * torch.randn(c, generator=gen)).to(dtype)
    w = (torch.randn(out_ch, c, *kernel, generator=gen) / (c * kernel[1]) ** 0.5).to(dtype)
    b = torch.randn(out_ch, generator=gen).to(dtype) if with_bias else None
    out_shape = F.conv3d(x.float(), w.float(), stride=stride, padding=padding).shape
    res = torch.randn(out_shape, generator=gen).to(dtype) if with_res else None
    dy = torch.randn(out_shape, generator=gen).to(dtype)
    x, gamma, beta, w, b, res, dy = (
        None if t is None else t.to(DEVICE) for t in (x, gamma, beta, w, b, res, dy)
    )
    inputs = {"x": x, "gamma": gamma, "beta": beta, "weight": w, "bias": b, "residual": res}
    names = [k for k, v in inputs.items() if v is not None]

    def grads(fn, cast):
        leaves = {k: (cast(v).requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
        out = fn(leaves["x"], leaves["gamma"], leaves["beta"], groups, leaves["weight"], leaves["bias"],
                 leaves["residual"], stride, padding)  # fmt: skip
        return out, torch.autograd.grad(out, [leaves[k] for k in names], cast(_strided(dy)))

    def triton(*args):
        return norm_act_conv3d(*args, impl="triton")

    r = _ref_dtype(dtype)
    got = grads(triton, lambda t: t.clone())
    want = grads(norm_act_conv3d_ref, lambda t: t.to(r))
    return names, got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", NORM_CASES)
def test_fused_gradients_match_unfused_chain(dtype, case, close):
    names, (out, grads), (out_ref, grads_ref) = _norm_grads(dtype, *case)
    close(out, out_ref, dtype)
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == dtype, name
        close(g, g_ref, dtype, scale=GRAD_SCALE[dtype])


def test_prologue_and_preactivation_paths_agree(monkeypatch, close):
    """A 3x3x3 fused conv through the in-load prologue (forward and wgrad) equals the chain too."""
    monkeypatch.setattr(_conv3d_triton, "PREACT_MIN_TAPS", 1000)
    names, (out, grads), (out_ref, grads_ref) = _norm_grads(torch.float32, *NORM_CASES[0])
    close(out, out_ref, torch.float32)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        close(g, g_ref, torch.float32, scale=GRAD_SCALE[torch.float32])


class _AtenRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_backward_runs_in_triton_without_aten_conv_or_group_norm():
    x = torch.randn(1, 4, 3, 4, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, 3, device=DEVICE, requires_grad=True)
    g = torch.ones(4, device=DEVICE, requires_grad=True)
    b = torch.zeros(4, device=DEVICE, requires_grad=True)
    out = conv3d(norm_act_conv3d(x, g, b, 2, w[:, :4], padding=1, impl="triton"), w[:, :3], impl="triton")
    with _AtenRecorder() as rec:
        out.sum().backward()
    names = " ".join(rec.names)
    assert "lad_fast.norm_act_conv3d_bwd" in names and "lad_fast.conv3d_bwd" in names
    for slow in ("convolution_backward", "native_group_norm", "_to_copy"):
        assert slow not in names, f"{slow} ran in the backward: {rec.names}"
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, w, g, b))


def test_only_the_requested_gradients_are_computed(close):
    """needs_input_grad subsets: gamma only (dgrad + sums, no apply pass), weight only (wgrad only)."""
    x, w = torch.randn(1, 4, 3, 4, 5, device=DEVICE), torch.randn(2, 4, 3, 3, 3, device=DEVICE) * 0.2
    gamma, beta = torch.ones(4, device=DEVICE, requires_grad=True), torch.zeros(4, device=DEVICE)
    (gg,) = torch.autograd.grad(
        norm_act_conv3d(x, gamma, beta, 2, w, padding=1, impl="triton").sum(), [gamma]
    )
    g64 = gamma.detach().double().requires_grad_(True)
    (gg_ref,) = torch.autograd.grad(
        norm_act_conv3d_ref(x.double(), g64, beta.double(), 2, w.double(), padding=1).sum(), [g64]
    )
    close(gg, gg_ref, torch.float32, scale=GRAD_SCALE[torch.float32])
    wl = w.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(conv3d(x, wl, padding=1, impl="triton").sum(), [wl])
    close(gw, torch.nn.grad.conv3d_weight(x.double(), w.shape, x.new_ones(1, 2, 3, 4, 5).double(), padding=1),
          torch.float32, scale=GRAD_SCALE[torch.float32])  # fmt: skip


def test_weight_layout_cache_follows_the_weight():
    w = torch.randn(3, 2, 3, 3, 3)
    first = _conv3d_triton.weight_layout(w, "forward")
    assert _conv3d_triton.weight_layout(w, "forward") is first  # unchanged weight: no new copy
    torch.testing.assert_close(first, w.permute(2, 3, 4, 1, 0))
    w.mul_(2.0)  # an in-place update (an optimizer step) moves the version counter
    second = _conv3d_triton.weight_layout(w, "forward")
    assert second is not first
    torch.testing.assert_close(second, w.permute(2, 3, 4, 1, 0))
    torch.testing.assert_close(_conv3d_triton.weight_layout(w, "dgrad"), w.permute(2, 3, 4, 0, 1))
    keys = [k for k in _conv3d_triton._LAYOUTS if k[0] == id(w)]
    assert len(keys) == 2
    del w
    gc.collect()
    assert not any(k in _conv3d_triton._LAYOUTS for k in keys), "a freed weight's layouts must be dropped"
    with torch.inference_mode():
        wi = torch.randn(3, 2, 1, 1, 1)
    torch.testing.assert_close(_conv3d_triton.weight_layout(wi, "forward"), wi.permute(2, 3, 4, 1, 0))


def test_autotune_buckets_rows_by_power_of_two():
    assert [_conv3d_triton.m_bucket(m) for m in (1, 5, 8, 9, 1000, 1024, 1025)] == [
        1,
        8,
        8,
        16,
        1024,
        1024,
        2048,
    ]
    assert "M" not in _conv3d_triton._conv3d_tuned.keys and "M_BUCKET" in _conv3d_triton._conv3d_tuned.keys


@pytest.mark.parametrize("block_m", [128, 256])
def test_taller_dgrad_row_blocks_write_every_partial_sum_slot(block_m, monkeypatch, close):
    """Autotuning runs every config on one buffer: each must write all 64-row slots of the sums.

    Fresh buffers are filled with 77 here, so a slot a config leaves unwritten would show in the
    gamma / beta / x gradients (4 x 5 x 6 = 120 voxels: 2 slots, one program of 128 or 256 rows).
    """
    from lad_fast.kernels import _conv3d_bwd_triton

    monkeypatch.setitem(_conv3d_bwd_triton._INTERP_DGRAD, "BLOCK_M", block_m)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(77)

    monkeypatch.setattr(_conv3d_bwd_triton.torch, "empty", poisoned_empty)
    _, (_, grads), (_, grads_ref) = _norm_grads(torch.float32, *NORM_CASES[0])
    monkeypatch.undo()
    for g, g_ref in zip(grads, grads_ref, strict=True):
        close(g, g_ref, torch.float32, scale=GRAD_SCALE[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is silently wrong under the interpreter")
def test_bf16_backward_on_cuda(close):
    """The real kernels in bf16: plain and fused gradients against fp32 references (bf16 row x 2)."""
    for case in (CASES[1], CASES[3]):
        shape, out_ch, kernel, stride, padding, _ = case
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(shape, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_(True)
        w = (torch.randn(out_ch, shape[1], *kernel, generator=gen) * 0.2).to(DEVICE, torch.bfloat16)
        w.requires_grad_(True)
        out = conv3d(x, w, None, stride, padding, impl="triton")
        dy = torch.randn(out.shape, generator=gen).to(DEVICE, torch.bfloat16)
        gx, gw = torch.autograd.grad(out, [x, w], dy)
        f32 = [t.detach().float() for t in (x, w, dy)]
        close(gx, torch.nn.grad.conv3d_input(shape, f32[1], f32[2], stride=stride, padding=padding),
              torch.bfloat16, scale=GRAD_SCALE[torch.bfloat16])  # fmt: skip
        close(gw, torch.nn.grad.conv3d_weight(f32[0], w.shape, f32[2], stride=stride, padding=padding),
              torch.bfloat16, scale=GRAD_SCALE[torch.bfloat16])  # fmt: skip
    names, (out, grads), (out_ref, grads_ref) = _norm_grads(torch.bfloat16, *NORM_CASES[0])
    close(out, out_ref, torch.bfloat16)
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == torch.bfloat16, name
        close(g, g_ref, torch.bfloat16, scale=GRAD_SCALE[torch.bfloat16])
