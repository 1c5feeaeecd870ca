"""conv3d and norm_act_conv3d: the Triton path (interpreter on CPU) against the PyTorch references.

Forward and every gradient are compared with the reference computed in float64 (fp32 inputs) or
float32 (fp16 / bf16 inputs) on the same input values, using the tolerance table of conftest.py.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.kernels import conv3d, conv3d_ref, norm_act_conv3d, norm_act_conv3d_ref

# Gradients sum over longer chains (and fp16 backward runs in fp16), so they get a wider tolerance.
GRAD_SCALE = {torch.float32: 5.0, torch.float16: 10.0, torch.bfloat16: 2.0}
CUDA = torch.cuda.is_available()
# The kernels run where the tests find CUDA, else in the interpreter on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# lad_fast.kernels re-exports the function conv3d under the module's name, so fetch the module itself.
conv3d_module = importlib.import_module("lad_fast.kernels.conv3d")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels-last-3d, or a strided view."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return view
    return t.contiguous()


def _leaf(t: torch.Tensor | None, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor | None:
    if t is None:
        return None
    return _layout(t.to(device=DEVICE, dtype=dtype), layout).detach().requires_grad_(True)


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def _check_against_ref(run, run_ref, inputs: dict, dtype: torch.dtype, close) -> None:
    """Forward and gradients of every tensor input that is not None, Triton against the reference."""
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    ref_inputs = {
        k: (v.detach().to(_ref_dtype(dtype)).requires_grad_(True) if k in names else v)
        for k, v in inputs.items()
    }
    out = run(**inputs)
    expected = run_ref(**ref_inputs)
    assert out.shape == expected.shape and out.dtype == dtype
    close(out, expected, dtype)
    grad_out = torch.randn(expected.shape, dtype=torch.float32, device=out.device)
    grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out.to(dtype))
    grads_ref = torch.autograd.grad(expected, [ref_inputs[k] for k in names], grad_out.to(expected.dtype))
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g is not None, name
        close(g, g_ref, dtype, scale=GRAD_SCALE[dtype])


def _conv_case(shape, out_ch, kernel, dtype, layout, with_bias, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    fan_in = c * kernel[0] * kernel[1] * kernel[2]
    x = torch.randn(shape, generator=gen)
    w = torch.randn(out_ch, c, *kernel, generator=gen) / fan_in**0.5
    b = torch.randn(out_ch, generator=gen) if with_bias else None
    return {
        "x": _leaf(x.to(device), dtype, layout),
        "weight": _leaf(w.to(device), dtype),
        "bias": _leaf(None if b is None else b.to(device), dtype),
    }


CONV_CASES = [
    # (shape, out channels, kernel, stride, padding, bias, layout)
    ((1, 5, 6, 7, 9), 4, (3, 3, 3), 1, 1, True, "contiguous"),  # the odd shape
    ((1, 5, 6, 7, 9), 3, (3, 3, 3), 2, 0, False, "channels_last"),
    ((2, 17, 4, 5, 3), 20, (1, 1, 1), 1, 0, True, "strided"),  # several channel blocks (16 wide)
    ((1, 1, 1, 1, 1), 1, (1, 1, 1), 1, 0, False, "contiguous"),  # minimal
    ((1, 3, 3, 6, 7), 5, (1, 3, 3), (1, 2, 2), (0, 1, 1), True, "channels_last"),  # U-Net in-plane
    ((1, 2, 2, 8, 8), 3, (1, 4, 4), (1, 2, 2), (0, 1, 1), False, "contiguous"),  # U-Net resampling
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,out_ch,kernel,stride,padding,with_bias,layout", CONV_CASES)
def test_conv3d_matches_reference(dtype, shape, out_ch, kernel, stride, padding, with_bias, layout, close):
    inputs = _conv_case(shape, out_ch, kernel, dtype, layout, with_bias, DEVICE)

    def run(x, weight, bias):
        return conv3d(x, weight, bias, stride, padding, impl="triton")

    def run_ref(x, weight, bias):
        return conv3d_ref(x, weight, bias, stride, padding)

    _check_against_ref(run, run_ref, inputs, dtype, close)


def _norm_case(shape, out_ch, kernel, groups, out_shape, dtype, layout, with_bias, with_res, offset=0.0):
    gen = torch.Generator().manual_seed(1)
    c = shape[1]
    inputs = _conv_case(shape, out_ch, kernel, dtype, layout, with_bias, DEVICE, seed=2)
    # An offset far from zero checks that the statistics do not cancel (|mean| >> std).
    x = torch.randn(shape, generator=gen) * 1.5 + offset
    inputs["x"] = _leaf(x, dtype, layout)
    # beta far from zero: padding that contributed silu(norm(0)) instead of 0 would show.
    inputs["gamma"] = _leaf(1.0 + 0.5 * torch.randn(c, generator=gen), dtype)
    inputs["beta"] = _leaf(0.5 + 0.5 * torch.randn(c, generator=gen), dtype)
    res = torch.randn(out_shape, generator=gen) if with_res else None
    inputs["residual"] = _leaf(res, dtype, "strided" if layout == "strided" else "contiguous")
    return inputs


NORM_CASES = [
    # (shape, out ch, kernel, groups, stride, padding, bias, residual, layout, offset)
    ((1, 4, 6, 7, 9), 4, (3, 3, 3), 2, 1, 1, True, True, "contiguous", 0.0),
    ((1, 6, 5, 6, 7), 3, (3, 3, 3), 3, 2, 1, False, False, "channels_last", 0.0),
    ((2, 4, 3, 4, 5), 4, (1, 1, 1), 4, 1, 0, True, True, "strided", 40.0),
    ((1, 2, 3, 5, 5), 5, (3, 3, 3), 1, 2, 0, True, False, "contiguous", 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape,out_ch,kernel,groups,stride,padding,with_bias,with_res,layout,offset", NORM_CASES
)
def test_norm_act_conv3d_matches_reference(
    dtype, shape, out_ch, kernel, groups, stride, padding, with_bias, with_res, layout, offset, close
):
    probe = torch.empty(shape)
    out_shape = tuple(
        F.conv3d(probe, torch.empty(out_ch, shape[1], *kernel), stride=stride, padding=padding).shape
    )
    inputs = _norm_case(shape, out_ch, kernel, groups, out_shape, dtype, layout, with_bias, with_res, offset)

    def run(x, gamma, beta, weight, bias, residual):
        return norm_act_conv3d(x, gamma, beta, groups, weight, bias, residual, stride, padding, impl="triton")

    def run_ref(x, gamma, beta, weight, bias, residual):
        return norm_act_conv3d_ref(x, gamma, beta, groups, weight, bias, residual, stride, padding)

    _check_against_ref(run, run_ref, inputs, dtype, close)


def test_norm_act_conv3d_accepts_fp32_affine_with_fp16_input(close):
    """Under autocast GroupNorm's gamma and beta stay fp32 while activations are fp16."""
    inputs = _norm_case(
        (1, 4, 3, 4, 5), 2, (3, 3, 3), 2, (1, 2, 3, 4, 5), torch.float16, "contiguous", True, False
    )
    gamma = inputs["gamma"].detach().float().requires_grad_(True)
    args = (inputs["x"], gamma, inputs["beta"].detach().float(), 2, inputs["weight"], inputs["bias"])
    out = norm_act_conv3d(*args, padding=1, impl="triton")
    expected = norm_act_conv3d_ref(
        *[a.float() if isinstance(a, torch.Tensor) else a for a in args], padding=1
    )
    close(out, expected, torch.float16)
    (g,) = torch.autograd.grad(out.float().sum(), [gamma])
    assert g.dtype == torch.float32 and g.abs().sum() > 0


@pytest.mark.skipif(not CUDA, reason="bf16 is silently wrong under the Triton interpreter; needs CUDA")
def test_bf16_on_cuda_matches_reference(close):
    inputs = _conv_case((2, 16, 5, 9, 11), 32, (3, 3, 3), torch.bfloat16, "channels_last", True, "cuda")
    out = conv3d(inputs["x"], inputs["weight"], inputs["bias"], padding=1, impl="triton")
    expected = conv3d_ref(*[t.detach().float() for t in inputs.values()], padding=1)
    close(out, expected, torch.bfloat16)
    c = 16
    gamma, beta = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    x, w = inputs["x"], inputs["weight"]
    out = norm_act_conv3d(x, gamma.bfloat16(), beta.bfloat16(), 4, w, padding=1, impl="triton")
    expected = norm_act_conv3d_ref(x.detach().float(), gamma, beta, 4, w.detach().float(), padding=1)
    close(out, expected, torch.bfloat16)


def test_compiled_function_has_no_graph_breaks():
    x = torch.randn(1, 4, 3, 4, 5, device=DEVICE)
    w1, w2 = torch.randn(4, 4, 3, 3, 3, device=DEVICE) * 0.1, torch.randn(4, 4, 1, 1, 1, device=DEVICE) * 0.1
    gamma, beta, bias = (torch.full((4,), v, device=DEVICE) for v in (1.0, 0.0, 0.0))

    def block(x):
        h = norm_act_conv3d(x, gamma, beta, 2, w1, bias, x, padding=1, impl="triton")
        return conv3d(h, w2, bias, impl="triton").relu()

    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_forward_and_backward_match_eager():
    """The fake and autograd registrations trace: aot_eager runs forward and backward through them."""
    torch._dynamo.reset()
    x0 = torch.randn(1, 4, 3, 4, 5, device=DEVICE)
    w = (torch.randn(3, 4, 3, 3, 3, device=DEVICE) * 0.1).requires_grad_(True)
    gamma = torch.ones(4, device=DEVICE, requires_grad=True)
    beta = torch.zeros(4, device=DEVICE, requires_grad=True)

    def step(x):
        h = norm_act_conv3d(x, gamma, beta, 2, w, padding=1, impl="triton")
        return conv3d(h, w[:, :3], padding=(1, 1, 1), impl="triton").square().mean()

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        x = x0.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(x), [x, w, gamma, beta]))
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_auto_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("LAD_FAST_KERNELS", raising=False)
    calls = []
    monkeypatch.setattr(conv3d_module, "conv3d_ref", lambda *a: calls.append(a) or F.conv3d(a[0], a[1]))
    conv3d(torch.randn(1, 2, 3, 3, 3), torch.randn(2, 2, 1, 1, 1))
    assert len(calls) == 1


def test_auto_falls_back_when_triton_cannot_serve(monkeypatch):
    """Where auto would pick Triton (CUDA), unsupported arguments run the reference instead of failing."""
    monkeypatch.delenv("LAD_FAST_KERNELS", raising=False)
    monkeypatch.setattr(conv3d_module, "resolve_impl", lambda impl, *tensors: "triton")
    x, w = torch.randn(1, 2, 5, 5, 5), torch.randn(3, 2, 3, 3, 3)
    out = conv3d(x, w, dilation=2)
    torch.testing.assert_close(out, F.conv3d(x, w, dilation=2))
    with pytest.raises(ConfigError, match=r"dilation \(2, 2, 2\) is not supported.*impl='torch'"):
        conv3d(x, w, dilation=2, impl="triton")


# ------------------------------------------------------------------------------------------ errors

X = torch.randn(1, 4, 5, 5, 5, device=DEVICE)
W = torch.randn(3, 4, 3, 3, 3, device=DEVICE)
G = torch.ones(4, device=DEVICE)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: conv3d(X[0], W, impl="triton"),
            r"x must be 5-D \(N, C, D, H, W\), got shape \(4, 5, 5, 5\)",
        ),
        (lambda: conv3d(X, W[0], impl="triton"), r"weight must be 5-D"),
        (
            lambda: conv3d(X, W[:, :3], impl="triton"),
            r"channel mismatch: x has 4 channels but weight expects 3",
        ),
        (lambda: conv3d(X, W, torch.ones(4), impl="triton"), r"bias must have shape \(3,\)"),
        (lambda: conv3d(X, W, stride=(1, 2), impl="triton"), r"stride must be an int or a tuple of 3 ints"),
        (lambda: conv3d(X, W, stride=0, impl="triton"), r"stride must be >= 1"),
        (lambda: conv3d(X, W, padding=-1, impl="triton"), r"padding must be >= 0"),
        (lambda: conv3d(X[:, :, :2], W, impl="triton"), r"too small for kernel 3.*output would be empty"),
        (
            lambda: conv3d(X, torch.randn(3, 4, 5, 5, 5, device=DEVICE), impl="triton"),
            r"kernel size \(5, 5, 5\) is not supported by the Triton kernel \(1 to 4 per axis\)",
        ),
        (lambda: conv3d(X, W, dilation=(1, 1, 2), impl="triton"), r"dilation \(1, 1, 2\) is not supported"),
        (
            lambda: conv3d(X, W.half(), impl="triton"),
            r"dtype mismatch: x is torch.float32 but weight is torch.float16",
        ),
        (lambda: conv3d(X.double(), W.double(), impl="triton"), r"dtype torch.float64 is not supported"),
        (
            lambda: norm_act_conv3d(X, G, G, 3, W, impl="triton"),
            r"groups must be a positive divisor of the 4 input channels, got 3",
        ),
        (lambda: norm_act_conv3d(X, G, G, 0, W, impl="triton"), r"groups must be a positive divisor"),
        (lambda: norm_act_conv3d(X, G[:3], G, 2, W, impl="triton"), r"gamma must have shape \(4,\)"),
        (
            lambda: norm_act_conv3d(X, G, G, 2, W, residual=X.new_zeros(1, 3, 5, 5, 5), impl="triton"),
            r"residual must have the output shape \(1, 3, 3, 3, 3\), got \(1, 3, 5, 5, 5\)",
        ),
        (
            lambda: norm_act_conv3d(X, G, G, 2, W, residual=X.new_zeros(1, 3, 3, 3, 3).half(), impl="triton"),
            r"dtype mismatch: x is torch.float32 but residual is torch.float16",
        ),
        (
            lambda: norm_act_conv3d(X.half(), G.double(), G.half(), 2, W.half(), impl="triton"),
            r"gamma is torch.float64; it must be float32 or x's dtype",
        ),
        (lambda: conv3d(X, W, impl="cudnn"), r"impl must be one of"),
    ],
)
def test_errors_say_what_is_wrong(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_package_imports_and_runs_reference_without_triton():
    """Triton is imported lazily: with it unimportable, the package loads and the torch path runs."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from lad_fast.kernels import norm_act_conv3d\n"
        "x = torch.randn(1, 4, 3, 3, 3)\n"
        "out = norm_act_conv3d(x, torch.ones(4), torch.zeros(4), 2, torch.randn(2, 4, 1, 1, 1))\n"
        "assert out.shape == (1, 2, 3, 3, 3)\n"
        "assert not any(m == 'triton' or m.startswith('triton.') for m in sys.modules if sys.modules[m])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LAD_FAST_KERNELS")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_autocast_casts_like_conv3d(close):
    """fp32 parameters beside autocast: the op casts to the autocast dtype as F.conv3d does."""
    x, w, b = (
        t.to(DEVICE) for t in (torch.randn(1, 4, 3, 4, 5), torch.randn(3, 4, 3, 3, 3) * 0.2, torch.randn(3))
    )
    gamma, beta = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = conv3d(x, w, b, padding=1, impl="triton")
        fused = norm_act_conv3d(x, gamma, beta, 2, w, b, padding=1, impl="triton")
    assert out.dtype == fused.dtype == torch.float16
    half = [t.half().float() for t in (x, w, b)]
    close(out, F.conv3d(*half, padding=1), torch.float16)
    h = F.silu(F.group_norm(half[0], 2, gamma, beta, 1e-6)).half().float()
    close(fused, F.conv3d(h, half[1], half[2], padding=1), torch.float16)
