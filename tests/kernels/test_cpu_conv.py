"""The batch-1 CPU convolution fast path (oneDNN) against ``F.conv3d``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lad_fast.kernels import conv3d, norm_act_conv3d
from lad_fast.kernels._cpu_conv import cpu_conv3d

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize(
    "cin, cout, size, k, stride, pad",
    [
        (8, 16, (4, 6, 5), 3, 1, 1),
        (16, 8, (6, 8, 8), 3, 2, 1),
        (5, 3, (3, 5, 7), 1, 1, 0),
        (4, 4, (4, 8, 8), 4, 2, 1),
    ],
)
def test_batch1_fast_path_equals_conv3d_and_runs_onednn(cin, cout, size, k, stride, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cin, *size, generator=g)
    w = torch.randn(cout, cin, k, k, k, generator=g) * 0.2
    b = torch.randn(cout, generator=g)
    s, p, d = (stride,) * 3, (pad,) * 3, (1, 1, 1)
    ref = F.conv3d(x, w, b, stride=s, padding=p)
    with torch.no_grad():
        out = cpu_conv3d(x, w, b, s, p, d)
        ops = _ops(lambda: cpu_conv3d(x, w, b, s, p, d))
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops


def test_gradients_and_the_switch_take_the_plain_op(monkeypatch):
    x = torch.randn(1, 4, 4, 4, 4)
    w = torch.randn(4, 4, 3, 3, 3, requires_grad=True)
    out = cpu_conv3d(x, w, None, (1,) * 3, (1,) * 3, (1,) * 3)
    assert out.grad_fn is not None  # autograd kept: not the inference-only call
    assert "aten::mkldnn_convolution" not in _ops(
        lambda: cpu_conv3d(x, w, None, (1,) * 3, (1,) * 3, (1,) * 3)
    )
    with torch.no_grad():
        w0 = w.detach()
        monkeypatch.setenv("LAD_FAST_ONEDNN_BATCH1", "0")
        ops = _ops(lambda: cpu_conv3d(x, w0, None, (1,) * 3, (1,) * 3, (1,) * 3))
        assert "aten::mkldnn_convolution" not in ops


def test_dispatched_ops_use_it_and_match_the_references():
    from lad_fast.kernels.conv3d import conv3d_ref, norm_act_conv3d_ref

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 4, 8, 8, generator=g)
    w = torch.randn(8, 8, 3, 3, 3, generator=g) * 0.2
    b, gamma, beta = (
        torch.randn(8, generator=g),
        torch.rand(8, generator=g) + 0.5,
        torch.randn(8, generator=g),
    )
    res = torch.randn(1, 8, 4, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(conv3d(x, w, b, padding=1, impl="torch"), conv3d_ref(x, w, b, padding=1))
        torch.testing.assert_close(
            norm_act_conv3d(x, gamma, beta, 4, w, b, res, padding=1, impl="torch"),
            norm_act_conv3d_ref(x, gamma, beta, 4, w, b, res, padding=1),
        )
        assert "aten::slow_conv3d_forward" not in _ops(lambda: conv3d(x, w, b, padding=1, impl="torch"))


def test_tiny_models_at_batch_1_run_no_slow_conv3d_and_equal_the_plain_path(monkeypatch):
    from lad_fast.config import get_preset
    from lad_fast.models.unet import build_unet
    from lad_fast.models.vqgan import VQGAN

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    vq = VQGAN(cfg.vqgan).eval()
    net = build_unet(cfg.unet, cfg.condition, 8, 12).eval()
    z = torch.randn(1, 8, 4, 16, 16)
    spatial = torch.rand(1, net.spatial_channels, 4, 16, 16)
    args = (z, torch.full((1,), 7.0), torch.randn(1, cfg.condition.embed_dim), spatial)
    with torch.no_grad():
        for fn in (lambda: vq.decode(z), lambda: net(*args)):
            fast, ops = fn(), _ops(fn)
            assert "aten::slow_conv3d_forward" not in ops and "aten::mkldnn_convolution" in ops
            monkeypatch.setenv("LAD_FAST_ONEDNN_BATCH1", "0")
            plain = fn()
            monkeypatch.delenv("LAD_FAST_ONEDNN_BATCH1")
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
