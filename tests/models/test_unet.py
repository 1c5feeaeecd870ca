from __future__ import annotations

import pytest
import torch

from lad_fast.config import ConditionConfig, UNetConfig, get_preset
from lad_fast.errors import ConfigError
from lad_fast.models.unet import LatentUNet

CFG = UNetConfig(
    channels=8, multipliers=(1, 2), attention_levels=(1,), heads=2, head_dim=8, groups=4, time_dim=16
)
COND = ConditionConfig(content_dim=6, embed_dim=12)


def tiny() -> LatentUNet:
    torch.manual_seed(0)
    net = LatentUNet(CFG, COND, latent_channels=3, structure_dim=10)
    torch.nn.init.normal_(net.out.weight, std=0.1)  # zero-init would hide wiring errors
    return net


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(b, 3, 2, 4, 6, generator=g),
        torch.randint(0, 300, (b,), generator=g),
        torch.randn(b, 3, 2, 4, 6, generator=g),
        torch.rand(b, 10, generator=g),
    )


def test_shapes_and_condition_changes_output():
    net = tiny()
    x, t, content, structure = inputs()
    emb = net.embed_condition(content, structure)
    out = net(x, t, emb)
    assert out.shape == x.shape
    # FiLM starts at zero: nudge it so the condition reaches the output
    for m in net.modules():
        if hasattr(m, "film") and m.film is not None:
            torch.nn.init.normal_(m.film[1].weight, std=0.1)
    a = net(x, t, net.embed_condition(content, structure))
    b = net(x, t, net.null_condition(2))
    assert (a - b).abs().max() > 1e-4


def test_keep_zero_is_the_null_embedding():
    net = tiny()
    _, _, content, structure = inputs()
    emb = net.embed_condition(content, structure, keep=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(emb[1], net.null_emb)
    torch.testing.assert_close(emb[0], net.embed_condition(content, structure)[0])


def test_gradients_reach_every_parameter():
    net = tiny()
    x, t, content, structure = inputs()
    for m in net.modules():
        if hasattr(m, "film") and m.film is not None:
            torch.nn.init.normal_(m.film[1].weight, std=0.1)
    emb = net.embed_condition(content, structure, keep=torch.tensor([1.0, 0.0]))
    net(x, t, emb).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []


def test_bad_shapes_are_explained():
    net = tiny()
    x, t, content, structure = inputs()
    with pytest.raises(ConfigError, match=r"divisible by 2, got \(2, 3, 3, 4, 6\)"):
        net(torch.randn(2, 3, 3, 4, 6), t, net.null_condition(2))
    with pytest.raises(ConfigError, match="structure condition has 9 values, the model was built for 10"):
        net.embed_condition(content, structure[:, :9])


def test_tiny_preset_builds_for_its_latent():
    cfg = get_preset("tiny")
    net = LatentUNet(cfg.unet, cfg.condition, cfg.vqgan.latent_channels, structure_dim=96)
    x = torch.randn(1, 8, 4, 16, 16)
    emb = net.embed_condition(torch.randn(1, 8, 4, 16, 16), torch.rand(1, 96))
    spatial = torch.rand(1, net.spatial_channels, 4, 16, 16)  # the preset's organ-fraction input
    assert net(x, torch.tensor([5]), emb, spatial).shape == x.shape
