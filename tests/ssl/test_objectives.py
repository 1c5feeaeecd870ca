"""The SSL objectives on tiny shapes: rotations and their labels, block masks, and a falling
inpainting loss."""

from __future__ import annotations

import pytest
import torch

from lad_fast.config import SegmenterConfig
from lad_fast.errors import ConfigError
from lad_fast.ssl.network import SSLNet
from lad_fast.ssl.objectives import (
    ROTATIONS,
    block_mask,
    contrastive_loss,
    inpainting_loss,
    mask_volumes,
    random_rotations,
    rotate,
    rotation_loss,
)


def _marker(n: int = 6, d: int = 2) -> torch.Tensor:
    """(1, 1, d, n, n) zeros with one voxel set at (h, w) = (1, 0): its position tells the turn."""
    x = torch.zeros(1, 1, d, n, n)
    x[0, 0, :, 1, 0] = 1.0
    return x


def _turned_position(h: int, w: int, k: int, n: int) -> tuple[int, int]:
    """Where (h, w) lands after k counter-clockwise quarter turns of an n x n plane (rot90 convention:
    one turn takes (h, w) to (n - 1 - w, h))."""
    for _ in range(k % 4):
        h, w = n - 1 - w, h
    return h, w


@pytest.mark.parametrize("k", range(ROTATIONS))
def test_rotate_moves_the_marker_where_each_quarter_turn_puts_it(k):
    n = 6
    out = rotate(_marker(n), [k])
    where = (out[0, 0, 0] == 1).nonzero().tolist()
    assert where == [list(_turned_position(1, 0, k, n))]
    assert torch.equal(rotate(out, [(4 - k) % 4]), _marker(n))  # the inverse turn restores it


def test_random_rotation_labels_match_the_turn_of_every_volume():
    n = 6
    x = _marker(n).repeat(64, 1, 1, 1, 1)
    out, labels = random_rotations(x, torch.Generator().manual_seed(0))
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(ROTATIONS))  # all 4 drawn
    positions = {k: _turned_position(1, 0, k, n) for k in range(ROTATIONS)}
    assert len(set(positions.values())) == ROTATIONS  # the marker tells the four turns apart
    for vol, label in zip(out, labels.tolist(), strict=True):
        assert tuple((vol[0, 1] == 1).nonzero()[0].tolist()) == positions[label]


def test_rotate_refuses_non_square_planes():
    with pytest.raises(ConfigError, match="H = W"):
        rotate(torch.zeros(1, 1, 2, 4, 6), [1])


def test_block_mask_covers_the_stated_fraction_in_whole_blocks():
    g = torch.Generator().manual_seed(1)
    m = block_mask((3, 1, 8, 16, 16), (4, 8, 8), 0.4, g)
    assert m.shape == (3, 1, 8, 16, 16) and m.dtype == torch.bool
    blocks = m.view(3, 4, 2, 8, 2, 8, 2)
    # every 2 x 2 x 2 block is all masked or all visible
    assert torch.equal(blocks.all(dim=(2, 4, 6)), blocks.any(dim=(2, 4, 6)))
    assert m.float().mean(dim=(1, 2, 3, 4)).tolist() == [round(0.4 * 256) / 256] * 3
    assert not torch.equal(m[0], m[1])  # drawn per volume
    with pytest.raises(ConfigError, match="does not divide"):
        block_mask((1, 1, 6, 16, 16), (4, 8, 8), 0.4, g)


def test_masked_voxels_hold_noise_and_the_loss_counts_only_them():
    g = torch.Generator().manual_seed(2)
    x = torch.full((2, 1, 4, 8, 8), 0.5)
    m = block_mask(tuple(x.shape), (2, 2, 2), 0.5, g)
    masked = mask_volumes(x, m, 0.5, g)
    assert torch.equal(masked[~m], x[~m]) and not torch.equal(masked[m], x[m])
    pred = x.clone()
    pred[~m] = 9.0  # errors outside the mask do not count
    assert inpainting_loss(pred, x, m).item() == 0.0
    pred[m] += 0.25
    assert inpainting_loss(pred, x, m).item() == pytest.approx(0.25)


def _toy_volume() -> torch.Tensor:
    """(1, 1, 8, 16, 16): a bright ellipsoid off centre in a dark background (so turns are visible)."""
    d, h, w = torch.meshgrid(torch.arange(8.0), torch.arange(16.0), torch.arange(16.0), indexing="ij")
    inside = ((d - 4) / 3) ** 2 + ((h - 5) / 4) ** 2 + ((w - 10) / 3) ** 2 < 1
    return torch.where(inside, 0.6, -0.8)[None, None]


def test_masked_reconstruction_and_rotation_losses_fall_on_a_toy_volume():
    torch.manual_seed(0)
    net = SSLNet(SegmenterConfig(channels=(8, 16), groups=4), impl="torch")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = _toy_volume().repeat(4, 1, 1, 1, 1)
    rec_losses, rot_losses = [], []
    for step in range(60):
        g = torch.Generator().manual_seed(step)
        target, labels = random_rotations(x, g)
        mask = block_mask(tuple(target.shape), (2, 4, 4), 0.4, g)
        rec, logits = net(mask_volumes(target, mask, 0.5, g))
        l_rec, l_rot = inpainting_loss(rec, target, mask), rotation_loss(logits, labels)
        opt.zero_grad()
        (l_rec + l_rot).backward()
        opt.step()
        rec_losses.append(l_rec.item())
        rot_losses.append(l_rot.item())
    first, last = sum(rec_losses[:5]) / 5, sum(rec_losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert sum(rot_losses[-5:]) / 5 < sum(rot_losses[:5]) / 5


def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The NT-Xent loss written out, one anchor at a time (SimCLR's definition)."""
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n, total = z1.shape[0], 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [float(torch.dot(z[i], z[k])) / t for k in range(2 * n) if k != i]
        total += -float(torch.dot(z[i], z[positive])) / t + float(torch.logsumexp(torch.tensor(others), 0))
    return total / (2 * n)


def test_contrastive_loss_is_nt_xent():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    for t in (0.1, 0.5):
        assert contrastive_loss(z1, z2, t).item() == pytest.approx(_nt_xent_by_hand(z1, z2, t), rel=1e-5)
    # two views that agree, unlike the other volumes: lower than two that do not
    assert contrastive_loss(z1, z1 + 0.01, 0.5) < contrastive_loss(z1, z2, 0.5)
    with pytest.raises(ConfigError, match=r"contrastive loss needs two \(B >= 2, E\) views, got \(1, 8\)"):
        contrastive_loss(z1[:1], z2[:1], 0.5)


def test_the_projection_head_embeds_both_views():
    net = SSLNet(SegmenterConfig(channels=(8, 16), groups=4), impl="torch", contrast=6)
    x = _toy_volume().repeat(2, 1, 1, 1, 1)
    rec, logits, z1, z2 = net(x, torch.flip(x, dims=(-1,)))
    assert rec.shape == x.shape and logits.shape == (2, ROTATIONS) and z1.shape == z2.shape == (2, 6)
    assert torch.allclose(net(x, x)[2], net(x, x)[3])  # the same view, the same embedding
    plain = SSLNet(SegmenterConfig(channels=(8, 16), groups=4), impl="torch")
    assert len(plain(x)) == 2 and not any(k.startswith("contrast.") for k in plain.state_dict())
    with pytest.raises(ConfigError, match="no projection head"):
        plain(x, x)
