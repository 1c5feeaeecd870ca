"""Shared 3D blocks: shapes, each block against a written-out float64 reference, FiLM, impl switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.models.blocks import AttentionBlock3d, Downsample3d, ResBlock3d, Upsample3d, set_impl

# Independent references, written out from the blocks' docstrings with plain tensor ops in float64 (the
# blocks run in float32): GroupNorm by hand, convolutions through F.conv3d with the documented stride
# and padding, nearest upsampling as repetition. Parameters come from the block; nothing calls its
# sub-modules' forwards.


def _gn(x: torch.Tensor, gn: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm: per sample and group of channels, normalise over (channels in group, D, H, W)."""
    b, c = x.shape[:2]
    g = x.double().reshape(b, gn.num_groups, -1)
    y = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps)
    shape = (1, c, 1, 1, 1)
    return y.reshape(x.shape) * gn.weight.double().view(shape) + gn.bias.double().view(shape)


def _conv(x: torch.Tensor, conv: torch.nn.Conv3d, stride: int = 1, padding: int = 0) -> torch.Tensor:
    return F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), stride=stride, padding=padding)


def _act(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # SiLU


def _ref_resblock(block: ResBlock3d, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """(GroupNorm, SiLU, 3x3x3 conv) twice, FiLM h * (1 + scale) + shift after the second norm, plus the
    identity or a 1x1x1 conv skip."""
    h = _conv(_act(_gn(x, block.norm1)), block.conv1, padding=1)
    h = _gn(h, block.norm2)
    if cond is not None:
        lin = block.film[1]
        film = _act(cond.double()) @ lin.weight.double().T + lin.bias.double()
        scale, shift = film[:, :, None, None, None].chunk(2, dim=1)
        h = h * (1 + scale) + shift
    h = _conv(_act(h), block.conv2, padding=1)
    return h + (x.double() if block.skip is None else _conv(x, block.skip))


def _randomise_norms(module: torch.nn.Module) -> None:
    """GroupNorm starts as the identity affine (weight 1, bias 0); random values test that it is used."""
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.5)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_ch,out_ch", [(8, 8), (8, 16)])
def test_resblock_matches_a_written_out_reference(in_ch: int, out_ch: int) -> None:
    torch.manual_seed(0)
    block = ResBlock3d(in_ch, out_ch, groups=4, impl="torch")
    _randomise_norms(block)
    x = torch.randn(2, in_ch, 4, 6, 5)
    out = block(x)
    assert out.shape == (2, out_ch, 4, 6, 5)
    _close(out, _ref_resblock(block, x))
    assert (block.skip is None) == (in_ch == out_ch)


def test_resblock_film_starts_as_identity_and_uses_condition() -> None:
    torch.manual_seed(0)
    block = ResBlock3d(8, 8, groups=4, film_dim=5, impl="torch")
    _randomise_norms(block)
    x, cond = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 5)
    # Zero-initialised FiLM: same output as the unconditioned block.
    _close(block(x, cond), _ref_resblock(block, x))
    torch.nn.init.normal_(block.film[1].weight)
    torch.nn.init.normal_(block.film[1].bias)
    a = block(x, cond)
    _close(a, _ref_resblock(block, x, cond))
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
    _close(block(x), _ref_resblock(block, x))
    block.train()
    assert not torch.allclose(block(x).double(), _ref_resblock(block, x))


@pytest.mark.parametrize("groups", [None, 4])
def test_down_and_upsample_match_a_written_out_reference(groups: int | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 8, 6)
    down = Downsample3d(8, 16, impl="torch", groups=groups)
    _randomise_norms(down)
    y = down(x)
    assert y.shape == (2, 16, 2, 4, 3)
    pre = x.double() if groups is None else _act(_gn(x, down.norm))
    _close(y, _conv(pre, down.conv, stride=2, padding=1))

    up = Upsample3d(16, 8, impl="torch", groups=groups)
    _randomise_norms(up)
    z = up(y)
    assert z.shape == (2, 8, 4, 8, 6)
    nearest = y.detach()[:, :, :, None, :, None, :, None].expand(2, 16, 2, 2, 4, 2, 3, 2)
    nearest = nearest.reshape(2, 16, 4, 8, 6)  # every voxel repeated twice along D, H and W
    pre = nearest.double() if groups is None else _act(_gn(nearest, up.norm))
    _close(z, _conv(pre, up.conv, padding=1))


def test_attention_matches_naive_softmax() -> None:
    torch.manual_seed(0)
    blk = AttentionBlock3d(8, heads=2, head_dim=4, groups=4, impl="torch")
    x = torch.randn(2, 8, 2, 3, 3)
    _randomise_norms(blk)
    out = blk(x)
    b, c, L = 2, 8, 18
    t = _gn(x, blk.norm).reshape(b, c, L).transpose(1, 2)
    q, k, v = (t @ blk.qkv.weight.double().T + blk.qkv.bias.double()).split(8, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., sl])
    proj = torch.cat(heads, -1) @ blk.proj.weight.double().T + blk.proj.bias.double()
    _close(out, x.double() + proj.transpose(1, 2).reshape(x.shape))


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
