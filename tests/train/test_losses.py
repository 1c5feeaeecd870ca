"""VQ-GAN losses: the locality loss against a per-sample loop, hinge and feature matching on known values,
the offline perceptual term, and VQGANLoss's weighting and GAN start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from lad_fast.config import VQGANLossConfig
from lad_fast.data.labels import CANONICAL_ID
from lad_fast.errors import ConfigError
from lad_fast.models.discriminators import PatchDiscriminator
from lad_fast.train.losses import (
    SlicePerceptualLoss,
    VQGANLoss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    l1_loss,
    locality_loss,
    make_discriminators,
    organ_groups,
    random_axial_slices,
)

PANCREAS, LESION, LIVER = CANONICAL_ID["pancreas"], CANONICAL_ID["pancreatic_lesion"], CANONICAL_ID["liver"]


def naive_locality(x, recon, mask, organs, weights, mode, dilate=1):
    """Per-sample, per-organ loop (the official code's way), written independently of losses.py."""
    total = 0.0
    for group, w in zip(organs, weights, strict=True):
        ids = list(group) if isinstance(group, tuple) else [group]
        values = []
        for b in range(x.shape[0]):
            m = np.isin(mask[b].numpy(), ids)
            if not m.any():
                continue
            if mode == "box":
                nz = np.argwhere(m)
                lo, hi = nz.min(0), nz.max(0) + 1
                region = np.zeros_like(m)
                region[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
            else:
                region = (
                    ndimage.binary_dilation(m, np.ones((3, 3, 3), bool), iterations=dilate) if dilate else m
                )
            err = (x[b] - recon[b]).abs()  # (C, D, H, W)
            values.append(err[:, torch.from_numpy(region)].mean())
        if values:
            total = total + w * torch.stack(values).mean()
    return torch.as_tensor(total, dtype=torch.float32)


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 6, 9, 8, generator=g)
    recon = torch.randn(3, 2, 6, 9, 8, generator=g)
    mask = torch.zeros(3, 6, 9, 8, dtype=torch.int64)
    mask[0, 1:3, 2:6, 1:4] = PANCREAS
    mask[0, 4, 7, 6] = PANCREAS  # a stray voxel stretches sample 0's box
    mask[0, 2, 3, 2] = LESION
    mask[1, 0:6, 0:2, 5:8] = LIVER  # sample 1 has no pancreas and no lesion
    mask[2, 3:5, 4:9, 0:8] = PANCREAS
    mask[2, 5, 8, 7] = LESION
    return x, recon, mask


@pytest.mark.parametrize("mode,dilate", [("box", 1), ("mask", 0), ("mask", 1), ("mask", 2)])
@pytest.mark.parametrize(
    "organs,weights",
    [
        ((PANCREAS, LESION), (1.0, 1.0)),
        (((PANCREAS, LESION),), (1.0,)),
        ((PANCREAS, LIVER, LESION), (0.5, 2.0, 3.0)),
    ],
)
def test_locality_matches_per_sample_loop(mode, dilate, organs, weights) -> None:
    x, recon, mask = _case()
    got = locality_loss(x, recon, mask, organs, weights, mode=mode, dilate=dilate)
    want = naive_locality(x, recon, mask, organs, weights, mode, dilate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_locality_accepts_channel_mask_and_default_weights() -> None:
    x, recon, mask = _case(1)
    a = locality_loss(x, recon, mask[:, None], (PANCREAS,))
    torch.testing.assert_close(a, naive_locality(x, recon, mask, (PANCREAS,), (1.0,), "box"))


def test_locality_samples_without_organ_contribute_zero() -> None:
    x, recon, mask = _case()
    # Sample 1 has no pancreas: the batch loss equals the mean of samples 0 and 2 alone.
    both = locality_loss(x[[0, 2]], recon[[0, 2]], mask[[0, 2]], (PANCREAS,))
    torch.testing.assert_close(locality_loss(x, recon, mask, (PANCREAS,)), both)
    only_absent = locality_loss(x[[1]], recon[[1]], mask[[1]], (PANCREAS, LESION))
    assert only_absent.item() == 0.0
    recon = recon.clone().requires_grad_(True)
    locality_loss(x, recon, mask, (PANCREAS,)).backward()
    assert recon.grad[1].abs().sum() == 0
    assert recon.grad[0].abs().sum() > 0


def test_locality_gradient_only_inside_box() -> None:
    x, recon, mask = _case()
    recon = recon.clone().requires_grad_(True)
    locality_loss(x, recon, mask, (PANCREAS,), mode="box").backward()
    box0 = torch.zeros(6, 9, 8, dtype=torch.bool)
    box0[1:5, 2:8, 1:7] = True  # pancreas 1:3, 2:6, 1:4 plus the stray voxel (4, 7, 6)
    nonzero = recon.grad[0].abs().sum(0) > 0
    assert torch.equal(nonzero, box0)


def test_locality_errors() -> None:
    x, recon, mask = _case()
    with pytest.raises(ConfigError, match="mode must be 'box' or 'mask'"):
        locality_loss(x, recon, mask, (PANCREAS,), mode="sphere")
    with pytest.raises(ConfigError, match="2 organs but 1 weights"):
        locality_loss(x, recon, mask, (PANCREAS, LESION), (1.0,))
    with pytest.raises(ConfigError, match="organs is empty"):
        locality_loss(x, recon, mask, ())
    with pytest.raises(ConfigError, match="must be \\(B, D, H, W\\)"):
        locality_loss(x, recon, mask[:, :3], (PANCREAS,))


def test_l1_and_hinge_losses_on_known_values() -> None:
    assert l1_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.5)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(1 - real)) = 0.25 + mean(relu(1 + fake)) = 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)


def test_feature_matching_known_value_and_real_detached() -> None:
    real = [torch.ones(2, 3, requires_grad=True), torch.zeros(2, 3)]
    fake = [torch.zeros(2, 3, requires_grad=True), torch.full((2, 3), 2.0, requires_grad=True)]
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2)
    loss.backward()
    assert real[0].grad is None and fake[0].grad is not None
    with pytest.raises(ConfigError, match="got 2 real and 1 fake"):
        feature_matching_loss(real, fake[:1])


def test_random_axial_slices_take_the_same_index() -> None:
    a = torch.arange(2 * 1 * 5 * 2 * 2, dtype=torch.float32).view(2, 1, 5, 2, 2)
    sa, sb = random_axial_slices(a, a + 100, generator=torch.Generator().manual_seed(0))
    assert sa.shape == (2, 1, 2, 2)
    torch.testing.assert_close(sb, sa + 100)
    for b in range(2):
        assert any(torch.equal(sa[b], a[b, :, d]) for d in range(5))
    again = random_axial_slices(a, generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(again, sa)


class _Feats(torch.nn.Module):
    def __init__(self, conv: type[torch.nn.Module]) -> None:
        super().__init__()
        self.a = conv(1, 4, 3, padding=1, bias=False)
        self.b = conv(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        h1 = self.a(x)
        return [h1, self.b(torch.relu(h1))]


@pytest.mark.parametrize("dims", [2, 3])
def test_perceptual_is_frozen_normalised_and_differentiable(dims: int) -> None:
    torch.manual_seed(0)
    net = _Feats(torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d).train()
    loss = SlicePerceptualLoss(net, spatial_dims=dims).train()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    x = torch.randn(2, 1, 4, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert loss(x, x.clone(), generator=gen).item() == 0.0
    # Bias-free positively homogeneous features: unit-normalised, a brighter copy looks the same.
    assert loss(x, 3.0 * x, generator=gen).item() < 1e-6
    recon = torch.randn_like(x, requires_grad=True)
    value = loss(x, recon, generator=gen)
    assert value.item() > 0.1
    value.backward()
    assert recon.grad.abs().sum() > 0


def test_organ_groups_parse_names() -> None:
    assert organ_groups(("pancreas", "pancreas+pancreatic_lesion")) == ((PANCREAS,), (PANCREAS, LESION))
    with pytest.raises(ConfigError, match="'pancreatic_tumour' is not a canonical organ"):
        organ_groups(("pancreatic_tumour",))


def _tiny_loss_cfg(**kw) -> VQGANLossConfig:
    base = dict(perceptual=0.0, gan_start_step=10, disc_channels=8)
    return VQGANLossConfig(**{**base, **kw})


def test_vqgan_loss_weights_and_gan_start() -> None:
    torch.manual_seed(0)
    cfg = _tiny_loss_cfg(locality_organs=("pancreas", "pancreatic_lesion"), locality_weights=(1.0, 1.0))
    crit = VQGANLoss(cfg)
    d2, d3 = make_discriminators(cfg, layers=2)  # the 6x9x8 test volume is too small for 3 stride-2 layers
    discs = {"disc_2d": d2, "disc_3d": d3}
    x, recon, mask = _case()
    x, recon = x[:, :1], recon[:, :1].clone().requires_grad_(True)
    vq = torch.tensor(0.3)
    before = crit.generator_loss(x, recon, vq, mask, step=9)  # no discriminator needed before gan start
    assert before["g_2d"] == 0 and before["g_3d"] == 0 and before["feature_matching"] == 0
    loc = locality_loss(x, recon, mask, ((PANCREAS,), (LESION,)), (1.0, 1.0))
    torch.testing.assert_close(before["locality"], loc)
    torch.testing.assert_close(before["total"], 4.0 * l1_loss(x, recon) + 0.3 + loc)
    assert crit.discriminator_loss(x, recon, step=9)["total"] == 0
    after = crit.generator_loss(
        x, recon, vq, mask, step=10, generator=torch.Generator().manual_seed(0), **discs
    )
    assert after["feature_matching"] > 0 and after["g_3d"] != 0
    want = before["total"] + 0.25 * after["g_2d"] + 0.25 * after["g_3d"] + 4.0 * after["feature_matching"]
    torch.testing.assert_close(after["total"], want)
    # The generator terms are the discriminators' own outputs on the fake volume.
    torch.testing.assert_close(after["g_3d"], -d3(recon)[0].float().mean())
    after["total"].backward()
    assert recon.grad.abs().sum() > 0
    d = crit.discriminator_loss(x, recon, step=10, **discs)
    torch.testing.assert_close(d["total"], 0.25 * d["d_2d"] + 0.25 * d["d_3d"])
    torch.testing.assert_close(d["d_3d"], hinge_d_loss(d3(x)[0], d3(recon.detach())[0]))
    d["total"].backward()
    assert all(p.grad is not None for m in (d2, d3) for p in m.parameters())
    assert crit.generator_loss(x, recon, vq, None, step=0)["locality"] == 0
    with pytest.raises(
        ConfigError, match=r"from gan_start_step=10 on, the GAN terms need disc_2d and disc_3d"
    ):
        crit.generator_loss(x, recon, vq, mask, step=10, disc_2d=d2)
    with pytest.raises(ConfigError, match=r"the GAN terms need disc_2d and disc_3d"):
        crit.discriminator_loss(x, recon, step=10)


def test_make_discriminators_builds_2d_then_3d() -> None:
    cfg = _tiny_loss_cfg()
    torch.manual_seed(0)
    d2, d3 = make_discriminators(cfg, in_channels=1)
    torch.manual_seed(0)
    ref2 = PatchDiscriminator(2, 1, cfg.disc_channels, 3)
    ref3 = PatchDiscriminator(3, 1, cfg.disc_channels, 3)
    for got, ref in ((d2, ref2), (d3, ref3)):
        want = ref.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())


def test_vqgan_loss_union_box_like_lad() -> None:
    x, recon, mask = _case()
    crit = VQGANLoss(_tiny_loss_cfg(locality_organs=("pancreas+pancreatic_lesion",), locality_weights=(1.0,)))
    got = crit.generator_loss(x[:, :1], recon[:, :1], torch.tensor(0.0), mask, step=0)["locality"]
    torch.testing.assert_close(
        got, naive_locality(x[:, :1], recon[:, :1], mask, ((PANCREAS, LESION),), (1.0,), "box")
    )


def test_vqgan_loss_config_errors() -> None:
    x, recon, mask = _case()
    with pytest.raises(ConfigError, match="1 locality_organs but 2"):
        VQGANLoss(_tiny_loss_cfg(locality_weights=(1.0, 1.0)))
    with pytest.raises(ConfigError, match="locality_mode must be 'box' or 'mask'"):
        VQGANLoss(_tiny_loss_cfg(locality_mode="boxes"))
    crit = VQGANLoss(_tiny_loss_cfg(perceptual=4.0))
    with pytest.raises(
        ConfigError, match="perceptual is 4.0 but no perceptual network was given.*never downloads"
    ):
        crit.generator_loss(x[:, :1], recon[:, :1], torch.tensor(0.0), mask, step=0)
    perceptual = SlicePerceptualLoss(_Feats(torch.nn.Conv2d))
    terms = crit.generator_loss(
        x[:, :1], recon[:, :1], torch.tensor(0.0), mask, step=0, perceptual=perceptual
    )
    assert terms["perceptual"] > 0
    torch.testing.assert_close(
        terms["total"], 4.0 * terms["l1"] + terms["locality"] + 4.0 * terms["perceptual"]
    )
