"""Tiled VQ-GAN decoding (lad_fast/generate/tiled.py) against the whole decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lad_fast.config import get_preset
from lad_fast.errors import ConfigError
from lad_fast.generate.tiled import (
    auto_tile,
    decode_bytes,
    decoder_program,
    exact_overlap,
    receptive_radius,
    tiled_decode,
)
from lad_fast.models.vqgan import VQGAN

# Tiled and whole decodes differ only by float32 rounding when the overlap holds the receptive field
# (GroupNorm statistics summed per tile in float64, the blend's division): measured <= 2.3e-6 on
# outputs of magnitude ~2. Anything that is not the same computation is orders of magnitude off.
EXACT_ATOL = 1e-5


def _vqgan(preset: str) -> VQGAN:
    torch.manual_seed(0)
    vq = VQGAN(get_preset(preset).vqgan).eval()
    for m in vq.modules():  # GroupNorm affines away from identity, so a wrong statistic shows
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return vq


# the tiny decoder (nearest upsampling, norm-act at the output), lad (res blocks) and lad-official
# (transposed convs, res blocks with skip convs, norm after conv_in)
@pytest.mark.parametrize("preset, radius", [("tiny", 2), ("lad", 6), ("lad-official", 5)])
def test_overlap_of_the_receptive_radius_is_the_whole_decode_and_one_less_is_not(preset, radius):
    vq = _vqgan(preset)
    assert receptive_radius(decoder_program(vq.decoder)) == exact_overlap(vq.decoder) == radius
    # an axis of 9 > tile + overlap: some tiles do not see the whole volume, even at lad's radius 6
    z = torch.randn(1, vq.cfg.latent_channels, 3, 9, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vq.decode(z)
    # the smallest exact overlap, found by trying: it is the computed radius
    errors = {
        ov: (tiled_decode(vq.decoder, z, tile=3, overlap=ov) - whole).abs().max().item()
        for ov in (radius - 1, radius)
    }
    assert errors[radius] <= EXACT_ATOL
    assert errors[radius - 1] > 100 * EXACT_ATOL
    # more overlap (seams blended) and other tile sizes stay exact; one tile is the whole volume
    for tile, ov in ((4, radius + 2), (2, radius + 3), (9, None)):
        torch.testing.assert_close(tiled_decode(vq.decoder, z, tile, ov), whole, rtol=0, atol=EXACT_ATOL)


def test_batch_of_two_decodes_each_volume_on_its_own_statistics():
    vq = _vqgan("tiny")
    z = torch.randn(2, 8, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    z[1] *= 3  # different statistics per sample
    with torch.no_grad():
        whole = vq.decode(z)
    torch.testing.assert_close(tiled_decode(vq.decoder, z, 3), whole, rtol=0, atol=EXACT_ATOL)


def test_auto_tile_follows_the_budget(monkeypatch):
    vq = _vqgan("tiny")
    shape = (8, 4, 16, 16)
    need = decode_bytes(vq.decoder, shape)
    monkeypatch.setenv("LAD_FAST_DECODE_BUDGET_MB", str(2 * need / 2**20))
    assert auto_tile(vq.decoder, shape, torch.device("cpu")) is None
    monkeypatch.setenv("LAD_FAST_DECODE_BUDGET_MB", str(need / 4 / 2**20))
    tile = auto_tile(vq.decoder, shape, torch.device("cpu"))
    assert tile is not None and 1 <= tile < 16
    grown = [8] + [min(n, tile + 2 * exact_overlap(vq.decoder)) for n in shape[1:]]
    assert decode_bytes(vq.decoder, grown) <= need / 4
    monkeypatch.setenv("LAD_FAST_DECODE_BUDGET_MB", "lots")
    with pytest.raises(ConfigError, match="LAD_FAST_DECODE_BUDGET_MB='lots': give a number of MiB"):
        auto_tile(vq.decoder, shape, torch.device("cpu"))


def test_bad_tiles_and_unknown_blocks_are_refused():
    vq = _vqgan("tiny")
    z = torch.zeros(1, 8, 2, 2, 2)
    with pytest.raises(ConfigError, match="decode tile must be at least 1 latent voxel, got 0"):
        tiled_decode(vq.decoder, z, 0)
    with pytest.raises(ConfigError, match="decode overlap must be >= 0, got -1"):
        tiled_decode(vq.decoder, z, 2, -1)
    vq.decoder.blocks.append(nn.Identity())
    with pytest.raises(ConfigError, match="tiled decoding does not know the decoder block Identity"):
        tiled_decode(vq.decoder, z, 2)
