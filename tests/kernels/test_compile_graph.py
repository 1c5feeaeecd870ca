"""vq_nearest and attention stay inside one torch.compile graph (custom ops, no graph breaks)."""

from __future__ import annotations

import warnings

import torch

from lad_fast.kernels import attention, vq_nearest
from lad_fast.kernels._dispatch import resolve_impl


def _step(z: torch.Tensor, codebook: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    idx, dist = vq_nearest(z, codebook, impl="triton")
    out = attention(q, k, v, impl="triton")
    return out.float().square().mean() + dist.mean(), idx


def _inputs():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(9, 8, generator=g), torch.randn(17, 8, generator=g)
    qkv = [torch.randn(1, 2, 5, 16, generator=g).requires_grad_(True) for _ in range(3)]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # real kernels where there is CUDA
    return z.to(dev), codebook.to(dev), [t.detach().to(dev).requires_grad_(True) for t in qkv]


def test_zero_graph_breaks():
    torch._dynamo.reset()
    z, codebook, (q, k, v) = _inputs()
    explanation = torch._dynamo.explain(_step)(z, codebook, q, k, v)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_step_matches_eager_with_gradients():
    torch._dynamo.reset()
    z, codebook, qkv = _inputs()
    loss, idx = _step(z, codebook, *qkv)
    grads = torch.autograd.grad(loss, qkv)

    compiled = torch.compile(_step, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    qkv_c = [t.detach().clone().requires_grad_(True) for t in qkv]
    loss_c, idx_c = compiled(z, codebook, *qkv_c)
    grads_c = torch.autograd.grad(loss_c, qkv_c)
    assert torch.equal(idx_c, idx)
    torch.testing.assert_close(loss_c, loss)
    for got, want in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(got, want)


def test_dispatch_traces_without_warnings(monkeypatch):
    """resolve_impl reads module constants only: dynamo traces it without warning (e.g. about a cache)."""
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # earlier tests may have warned
    monkeypatch.setenv("LAD_FAST_KERNELS", "")

    def pick(x: torch.Tensor) -> torch.Tensor:
        # impl="triton" is the branch that asks whether triton is installed
        return x * 3 if resolve_impl("triton", x) == "triton" else x * 2

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(pick, backend="eager", fullgraph=True)(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 3.0))
    assert not [
        str(w.message) for w in caught if "dynamo" in str(w.message).lower() or "cache" in str(w.message)
    ]
