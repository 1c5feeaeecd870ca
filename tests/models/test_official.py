"""The `lad-official` preset: the official Lad VQ-GAN and U-Net at their exact sizes, and the new options.

Full-size models are built on the meta device (no memory, no init cost): only their parameter counts are
checked. Every new block option gets one tiny forward/backward on the CPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lad_fast.conditioning.conditions import structure_dim
from lad_fast.config import (
    ConditionConfig,
    UNetConfig,
    VQGANConfig,
    config_from_dict,
    config_to_dict,
    get_preset,
)
from lad_fast.errors import ConfigError
from lad_fast.models.blocks import Downsample3d, TransposedUpsample3d
from lad_fast.models.unet import LatentUNet, build_unet
from lad_fast.models.unet_official import (
    AxisAttention3d,
    InPlaneResBlock3d,
    OfficialLatentUNet,
    RelativePositionBias,
    SpatialLinearAttention3d,
    rotate_positions,
)
from lad_fast.models.vqgan import VQGAN, count_parameters


def _full_size(preset: str) -> tuple[VQGAN, torch.nn.Module]:
    cfg = get_preset(preset)
    sdim = structure_dim(cfg.geometry.shape[0], cfg.condition)
    with torch.device("meta"):
        return VQGAN(cfg.vqgan), build_unet(cfg.unet, cfg.condition, cfg.vqgan.latent_channels, sdim)


# ------------------------------------------------------------------------------ parameter counts


def test_lad_official_vqgan_has_the_official_size() -> None:
    vq, _ = _full_size("lad-official")
    assert count_parameters(vq) == 1_391_081
    # Official Encoder 441,568 + its 1x1x1 pre-quantisation conv (520), which is lad-fast's conv_out.
    assert count_parameters(vq.encoder) == 441_568 + 520
    assert count_parameters(vq.encoder.conv_out) == 520
    # Official Decoder 948,417; its 1x1x1 post-quantisation conv (576) is lad-fast's conv_in.
    assert count_parameters(vq.decoder.conv_in) == 576
    assert count_parameters(vq.decoder) - 576 == 948_417


def test_lad_official_unet_has_the_official_size() -> None:
    _, net = _full_size("lad-official")
    assert isinstance(net, OfficialLatentUNet)
    # Medical Diffusion's Unet3D(dim=64, cond_dim=704, dim_mults=(1, 2, 4, 8), channels=8): 41,317,960
    # trainable parameters (plus 16 frozen rotary frequencies). The content head (977 values) is built
    # once and kept at its random initialisation, as the official one is untrained: not trainable.
    assert sum(p.numel() for p in net.content_head.parameters()) == 977
    assert count_parameters(net.content_head) == 0
    assert count_parameters(net) == 41_317_960
    assert sum(p.numel() for p in net.parameters()) == 41_318_937
    parts = {name: count_parameters(m) for name, m in net.named_children()}
    assert parts["down"] == 18_205_824 and parts["mid"] == 12_461_056 and parts["up"] == 10_357_184


def test_lad_official_docstring_states_the_tested_numbers() -> None:
    from lad_fast import config

    doc = config._lad_official.__doc__
    for number in ("1,391,081", "441,568", "948,417", "41,317,960", "41,317,976", "977", "41,318,937"):
        assert number in doc


def test_tiny_and_lad_models_are_unchanged() -> None:
    """The sizes of lad-fast's own models; the presets' spatial mask adds only its input channels to the
    U-Net stem (12 organ fractions x 8 octants x stem channels x 3^3), so with global conditions only
    they are the sizes they always had."""
    from lad_fast.organs import NUM_CLASSES

    vq, net = _full_size("tiny")
    assert (count_parameters(vq), count_parameters(net)) == (154_121, 3_169_417)
    assert 3_169_417 - 3_107_209 == 8 * NUM_CLASSES * 24 * 27
    assert isinstance(net, LatentUNet)
    vq, net = _full_size("lad")
    assert (count_parameters(vq), count_parameters(vq.decoder)) == (736_073, 374_689)
    assert count_parameters(net) == 84_291_929
    assert 84_291_929 - 84_126_041 == 8 * NUM_CLASSES * 64 * 27
    assert isinstance(net, LatentUNet)
    for name, size in (("tiny", 3_107_209), ("lad", 84_126_041)):
        cfg = get_preset(name)
        cond = replace(cfg.condition, spatial="none")
        with torch.device("meta"):
            plain = build_unet(
                cfg.unet, cond, cfg.vqgan.latent_channels, structure_dim(cfg.geometry.shape[0], cond)
            )
        assert count_parameters(plain) == size


def test_every_cli_preset_resolves_and_round_trips() -> None:
    from lad_fast.cli.options import Preset

    assert "lad-official" in {p.value for p in Preset}
    for p in Preset:
        cfg = get_preset(p.value)
        assert cfg.preset == p.value
        assert config_from_dict(config_to_dict(cfg)) == cfg
    official = get_preset("lad-official")
    assert official.geometry == get_preset("lad").geometry
    d = official.diffusion
    assert (d.objective, d.timesteps, d.schedule, d.prediction, d.loss, d.latent_norm) == (
        "ddpm",
        300,
        "cosine",
        "eps",
        "l1",
        "none",
    )


# ------------------------------------------------------------------------------ VQ-GAN options

OFFICIAL_SMALL = VQGANConfig(
    channels=(4, 8, 8),
    groups=4,
    latent_channels=4,
    code_dim=4,
    codebook_size=16,
    encoder_res_blocks=(0, 1, 1),
    decoder_channels=(8, 8, 8),
    decoder_res_blocks=(2, 2, 0),
    resample="conv4",
    decoder_in_kernel=1,
    decoder_norm="in",
)


def test_official_layout_vqgan_trains_at_tiny_size() -> None:
    torch.manual_seed(0)
    model = VQGAN(OFFICIAL_SMALL, impl="torch")
    assert model.decoder.norm_out is None and hasattr(model.decoder, "norm_in")
    kinds = [type(b).__name__ for b in model.encoder.blocks]
    assert kinds == ["Downsample3d", "ResBlock3d", "Downsample3d", "ResBlock3d"]
    kinds = [type(b).__name__ for b in model.decoder.blocks]
    assert (
        kinds
        == ["TransposedUpsample3d", "ResBlock3d", "ResBlock3d", "TransposedUpsample3d"] + ["ResBlock3d"] * 2
    )
    x = torch.randn(2, 1, 8, 8, 12)
    out = model(x)
    assert out.recon.shape == x.shape and out.latents.shape == (2, 4, 2, 2, 3)
    (F.l1_loss(out.recon, x) + out.vq_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(encoder_res_blocks=(1, 1)), "encoder_res_blocks has 2 entries but channels has 3"),
        (dict(decoder_channels=(8,)), "decoder_channels has 1 entries but channels has 3"),
        (dict(decoder_res_blocks=(1, 1, 1, 1)), "decoder_res_blocks has 4 entries"),
        (dict(resample="conv5"), "resample must be 'conv3' or 'conv4', got 'conv5'"),
        (dict(decoder_norm="both"), "decoder_norm must be 'out' or 'in', got 'both'"),
        (dict(decoder_in_kernel=2), "decoder_in_kernel must be 1 or 3, got 2"),
    ],
)
def test_bad_vqgan_layout_options_are_explained(change: dict, message: str) -> None:
    from dataclasses import replace

    with pytest.raises(ConfigError, match=message):
        VQGAN(replace(OFFICIAL_SMALL, **change))


# ------------------------------------------------------------------------------ resampling blocks


@pytest.mark.parametrize(
    "kernel,stride,out_shape",
    [(4, 2, (1, 6, 2, 3, 4)), ((1, 4, 4), (1, 2, 2), (1, 6, 4, 3, 4)), (3, 2, (1, 6, 2, 3, 4))],
)
def test_downsample_kernels_match_the_conv_module(kernel, stride, out_shape) -> None:
    torch.manual_seed(0)
    block = Downsample3d(4, 6, impl="torch", kernel=kernel, stride=stride)
    x = torch.randn(1, 4, 4, 6, 8, requires_grad=True)
    out = block(x)
    assert out.shape == out_shape
    torch.testing.assert_close(out, block.conv(x))
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and block.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kernel,stride,out_shape", [(4, 2, (1, 6, 8, 12, 16)), ((1, 4, 4), (1, 2, 2), (1, 6, 4, 12, 16))]
)
def test_transposed_upsample_doubles_the_strided_axes(kernel, stride, out_shape) -> None:
    torch.manual_seed(0)
    block = TransposedUpsample3d(4, 6, kernel=kernel, stride=stride)
    x = torch.randn(1, 4, 4, 6, 8, requires_grad=True)
    out = block(x)
    assert out.shape == out_shape
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0


def test_bad_resampling_kernels_are_explained() -> None:
    with pytest.raises(ConfigError, match=r"kernel \(5, 5, 5\) and stride \(2, 2, 2\) must satisfy"):
        Downsample3d(4, kernel=5)
    with pytest.raises(ConfigError, match=r"even kernel - stride per axis"):
        TransposedUpsample3d(4, kernel=3, stride=2)


# ------------------------------------------------------------------------------ U-Net blocks


def test_inplane_resblock_uses_its_condition() -> None:
    torch.manual_seed(0)
    block = InPlaneResBlock3d(4, 8, groups=4, film_dim=5, impl="torch")
    x, cond = torch.randn(2, 4, 3, 6, 6, requires_grad=True), torch.randn(2, 5)
    out = block(x, cond)
    assert out.shape == (2, 8, 3, 6, 6)
    # in-plane convs (GroupNorm statistics still span every slice, as in the official block)
    assert block.conv1.weight.shape[2:] == block.conv2.weight.shape[2:] == (1, 3, 3)
    assert not torch.allclose(block(x, torch.randn(2, 5)), out)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    with pytest.raises(ConfigError, match="pass cond exactly when the block was built with film_dim"):
        block(x)


def test_attention_blocks_stay_on_their_axis() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 3, 4, 4)
    y = x.clone()
    y[:, :, 0, 0, 0] += torch.randn(8)  # not a constant: the channel LayerNorm would remove it
    spatial, sl = SpatialLinearAttention3d(8, 2, 4), AxisAttention3d(8, 2, 4, "slice", impl="torch")
    for block in (spatial, sl):  # within a slice: other slices unchanged
        torch.testing.assert_close(block(y)[:, :, 1:], block(x)[:, :, 1:])
        assert not torch.allclose(block(y)[:, :, 0], block(x)[:, :, 0])
    depth = AxisAttention3d(8, 2, 4, "depth", impl="torch")
    bias = RelativePositionBias(2)(3, x.device)
    a, b = depth(x, bias), depth(y, bias)  # along depth: other (h, w) columns unchanged
    torch.testing.assert_close(a[..., 1:, :], b[..., 1:, :])
    assert not torch.allclose(a[:, :, 1:, 0, 0], b[:, :, 1:, 0, 0])
    a.square().mean().backward()
    for block in (depth,):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    with pytest.raises(ConfigError, match="axis must be 'depth' or 'slice', got 'width'"):
        AxisAttention3d(8, 2, 4, "width")


def test_rotary_scores_depend_on_the_offset_only() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    seq_q, seq_k = q.expand(6, 8), k.expand(6, 8)  # the same vectors at positions 0..5
    scores = rotate_positions(seq_q, 8) @ rotate_positions(seq_k, 8).T
    torch.testing.assert_close(scores[1, 3], scores[2, 4])
    torch.testing.assert_close(scores[0, 0], q @ k)
    assert not torch.allclose(scores[0, 1], scores[0, 2])
    # features past `dims` are left alone
    torch.testing.assert_close(rotate_positions(seq_q, 4)[:, 4:], seq_q[:, 4:])


def test_relative_position_buckets() -> None:
    rpb = RelativePositionBias(heads=2)  # 32 buckets, max distance 32 (the official settings)
    offsets = torch.tensor([0, -3, 3, -7, 7, -100, 100])
    assert rpb.bucket(offsets).tolist() == [0, 3, 19, 7, 23, 15, 31]
    assert rpb(5, torch.device("cpu")).shape == (2, 5, 5)


# ------------------------------------------------------------------------------ official U-Net

UCFG = UNetConfig(
    channels=8,
    multipliers=(1, 2),
    res_blocks=2,
    attention_levels=(0, 1),
    heads=2,
    head_dim=8,
    groups=4,
    time_dim=16,
    arch="official",
)
UCOND = ConditionConfig(content_dim=2, embed_dim=12)  # latent 3x4x8 -> content 1x1x2; + structure 10


def _small_unet() -> OfficialLatentUNet:
    torch.manual_seed(0)
    return build_unet(UCFG, UCOND, latent_channels=3, structure_dim=10, impl="torch")


def test_official_unet_forward_backward_at_tiny_size() -> None:
    net = _small_unet()
    g = torch.Generator().manual_seed(1)
    x, content = torch.randn(2, 3, 3, 4, 8, generator=g), torch.randn(2, 3, 3, 4, 8, generator=g)
    t, structure = torch.tensor([1, 7]), torch.rand(2, 10, generator=g)
    emb = net.embed_condition(content, structure, keep=torch.tensor([1.0, 0.0]))
    assert emb.shape == (2, 12)
    torch.testing.assert_close(emb[1], net.null_emb)
    out = net(x, t, emb)
    assert out.shape == x.shape
    assert not torch.allclose(net(x, t, net.null_condition(2)), out)
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []


def test_official_unet_errors_are_explained() -> None:
    net = _small_unet()
    with pytest.raises(ConfigError, match=r"h, w divisible by 2, got \(1, 3, 3, 5, 8\)"):
        net(torch.randn(1, 3, 3, 5, 8), torch.tensor([0]), net.null_condition(1))
    with pytest.raises(ConfigError, match="structure condition has 9 values, the model was built for 10"):
        net.embed_condition(torch.randn(1, 3, 3, 4, 8), torch.rand(1, 9))
    with pytest.raises(ConfigError, match=r"gives 4 values .*, but condition.content_dim is 2"):
        net.embed_condition(torch.randn(1, 3, 3, 8, 8), torch.rand(1, 10))
    with pytest.raises(ConfigError, match=r"content_dim \+ structure_dim = 2 \+ 10 = 12, got 13"):
        build_unet(UCFG, ConditionConfig(content_dim=2, embed_dim=13), 3, 10)
    from dataclasses import replace

    with pytest.raises(ConfigError, match="no dropout; set unet.dropout to 0"):
        build_unet(replace(UCFG, dropout=0.1), UCOND, 3, 10)
    with pytest.raises(ConfigError, match=r"unet.arch must be one of \('lad_fast', 'official'\), got 'x'"):
        build_unet(replace(UCFG, arch="x"), UCOND, 3, 10)
    with pytest.raises(ConfigError, match="LatentUNet builds unet.arch='lad_fast', got 'official'"):
        LatentUNet(UCFG, UCOND, 3, 10)
