"""Shared 3D blocks: shapes, the fused path against plain PyTorch modules, FiLM, attention, impl switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.models.blocks import AttentionBlock3d, Downsample3d, ResBlock3d, Upsample3d, set_impl


def _plain_resblock(block: ResBlock3d, x: torch.Tensor) -> torch.Tensor:
    """The same block written with the nn modules' own forwards (no kernels module)."""
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(F.silu(block.norm2(h)))
    return h + (x if block.skip is None else block.skip(x))


@pytest.mark.parametrize("in_ch,out_ch", [(8, 8), (8, 16)])
def test_resblock_matches_plain_modules(in_ch: int, out_ch: int) -> None:
    torch.manual_seed(0)
    block = ResBlock3d(in_ch, out_ch, groups=4, impl="torch")
    x = torch.randn(2, in_ch, 4, 6, 6)
    out = block(x)
    assert out.shape == (2, out_ch, 4, 6, 6)
    torch.testing.assert_close(out, _plain_resblock(block, x), rtol=1e-5, atol=1e-5)
    assert (block.skip is None) == (in_ch == out_ch)


def test_resblock_film_starts_as_identity_and_uses_condition() -> None:
    torch.manual_seed(0)
    block = ResBlock3d(8, 8, groups=4, film_dim=5, impl="torch")
    x, cond = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 5)
    # Zero-initialised FiLM: same output as the unconditioned block.
    torch.testing.assert_close(block(x, cond), _plain_resblock(block, x), rtol=1e-5, atol=1e-5)
    torch.nn.init.normal_(block.film[1].weight)
    a = block(x, cond)
    b = block(x, torch.randn(2, 5))
    assert not torch.allclose(a, b)
    # Per sample: changing sample 1's condition leaves sample 0 unchanged.
    cond2 = cond.clone()
    cond2[1] += 1.0
    c = block(x, cond2)
    torch.testing.assert_close(c[0], a[0])
    assert not torch.allclose(c[1], a[1])


def test_resblock_cond_mismatch_errors() -> None:
    x = torch.randn(1, 8, 2, 2, 2)
    with pytest.raises(ConfigError, match="pass cond exactly when"):
        ResBlock3d(8, 8, groups=4)(x, torch.randn(1, 3))
    with pytest.raises(ConfigError, match="pass cond exactly when"):
        ResBlock3d(8, 8, groups=4, film_dim=3)(x)


def test_groups_must_divide_channels() -> None:
    with pytest.raises(ConfigError, match="12 channels cannot be split into 8 groups"):
        ResBlock3d(12, 12, groups=8)


def test_resblock_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    block = ResBlock3d(8, 8, groups=4, dropout=0.5, impl="torch").eval()
    x = torch.randn(1, 8, 4, 4, 4)
    torch.testing.assert_close(block(x), _plain_resblock(block, x), rtol=1e-5, atol=1e-5)
    block.train()
    assert not torch.allclose(block(x), _plain_resblock(block, x))


def test_down_and_upsample_shapes_and_values() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 8, 6)
    down = Downsample3d(8, 16, impl="torch")
    y = down(x)
    assert y.shape == (2, 16, 2, 4, 3)
    torch.testing.assert_close(y, down.conv(x))
    up = Upsample3d(16, 8, impl="torch")
    z = up(y)
    assert z.shape == (2, 8, 4, 8, 6)
    torch.testing.assert_close(
        z,
        up.conv(
            torch.repeat_interleave(torch.repeat_interleave(torch.repeat_interleave(y, 2, 2), 2, 3), 2, 4)
        ),
    )


def test_attention_matches_naive_softmax() -> None:
    torch.manual_seed(0)
    blk = AttentionBlock3d(8, heads=2, head_dim=4, groups=4, impl="torch")
    x = torch.randn(2, 8, 2, 3, 3)
    out = blk(x)
    b, c, L = 2, 8, 18
    t = blk.norm(x).reshape(b, c, L).transpose(1, 2)
    q, k, v = blk.qkv(t).split(8, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., sl])
    ref = x + blk.proj(torch.cat(heads, -1)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_set_impl_reaches_every_block_and_validates() -> None:
    model = torch.nn.Sequential(ResBlock3d(8, 8, 4), torch.nn.Sequential(Downsample3d(8)))
    set_impl(model, "torch")
    assert [m.impl for m in model.modules() if hasattr(m, "impl")] == ["torch", "torch"]
    with pytest.raises(ConfigError, match="impl must be one of"):
        set_impl(model, "cuda")
    with pytest.raises(ConfigError, match="impl must be one of"):
        Upsample3d(8, impl="fast")


def test_triton_impl_on_cpu_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LAD_FAST_KERNELS", raising=False)
    from lad_fast.kernels._dispatch import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    block = ResBlock3d(8, 8, 4, impl="triton")
    with pytest.raises(Exception, match="TRITON_INTERPRET=1"):
        block(torch.randn(1, 8, 2, 2, 2))


_TRITON_SCRIPT = """
import torch
from lad_fast.config import VQGANConfig
from lad_fast.models.blocks import AttentionBlock3d, Downsample3d, ResBlock3d, Upsample3d, set_impl
from lad_fast.models.vqgan import VQGAN

torch.manual_seed(0)
net = torch.nn.ModuleList([ResBlock3d(4, 8, 4), ResBlock3d(8, 8, 4, film_dim=3), Downsample3d(8, 8),
                           Upsample3d(8, 4), AttentionBlock3d(4, 2, 16, 4)])
torch.nn.init.normal_(net[1].film[1].weight)

def run(impl):
    set_impl(net, impl)
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    c = torch.randn(1, 3, generator=torch.Generator().manual_seed(2))
    h = net[4](net[3](net[2](net[1](net[0](x), c))))
    h.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    return h.detach(), x.grad, grads

ref, tri = run("torch"), run("triton")
torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-5)
torch.testing.assert_close(tri[1], ref[1], rtol=1e-4, atol=1e-5)
for a, b in zip(tri[2], ref[2]):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
cfg = VQGANConfig(channels=(4, 8), groups=4, latent_channels=4, code_dim=4, codebook_size=8)
model = VQGAN(cfg, impl="triton")
x = torch.randn(1, 1, 2, 4, 4)
lat = model.eval().encode(x)
torch.testing.assert_close(lat, set_impl(model, "torch").encode(x))
print("OK")
"""


def test_blocks_through_triton_kernels_match_torch() -> None:
    """The blocks' calls into the fused ops (residual, padding, stride, FiLM path, attention) give the same
    values and gradients through the Triton kernels (interpreter, fresh process) as through PyTorch."""
    import os
    import subprocess
    import sys

    from lad_fast.kernels._dispatch import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("LAD_FAST_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
