"""lad_fast.models.content: the content head fits every preset's latent and validates its sizes."""

from __future__ import annotations

import pytest
import torch

from lad_fast.conditioning.conditions import structure_dim
from lad_fast.config import get_preset
from lad_fast.errors import ConfigError, InputError
from lad_fast.models.content import ContentHead


@pytest.mark.parametrize("preset", ["tiny", "lad"])
def test_content_head_and_structure_length_fit_the_presets(preset):
    cfg = get_preset(preset)
    depth = cfg.geometry.shape[0]
    if preset == "lad":  # Lad: 512 + 32 * 3 * 2 = 704
        assert (cfg.condition.content_dim, structure_dim(depth, cfg.condition)) == (512, 192)
    head = ContentHead(cfg.vqgan.latent_channels, cfg.condition.content_dim)
    latent = torch.randn(2, cfg.vqgan.latent_channels, depth // 4, 16, 12)  # any latent geometry
    content = head(latent)
    assert content.shape == (2, cfg.condition.content_dim)
    content.sum().backward()  # trainable
    assert head.conv1.weight.grad is not None


def test_content_head_rejects_bad_shapes():
    with pytest.raises(InputError, match=r"expects \(B, 8, d, h, w\)"):
        ContentHead(8, 16)(torch.zeros(1, 4, 4, 4, 4))
    with pytest.raises(ConfigError, match="positive sizes"):
        ContentHead(0, 16)
