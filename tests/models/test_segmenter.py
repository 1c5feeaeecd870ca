from __future__ import annotations

import pytest
import torch

from lad_fast.config import SegmenterConfig
from lad_fast.errors import ConfigError
from lad_fast.models.segmenter import Segmenter, dice_loss, dice_per_class


def tiny() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(SegmenterConfig(channels=(8, 16), groups=4), num_classes=3)


def test_shapes_and_prediction():
    net = tiny()
    x = torch.randn(2, 1, 4, 8, 6)
    assert net(x).shape == (2, 3, 4, 8, 6)
    assert net.predict(x).dtype == torch.uint8
    assert [f.shape[1] for f in net.encoder_features(x)] == [8, 16]


def test_odd_sizes_are_refused_with_the_divisor():
    with pytest.raises(ConfigError, match=r"divisible by 2, got \(1, 1, 3, 8, 8\)"):
        tiny()(torch.randn(1, 1, 3, 8, 8))


def test_it_learns_a_toy_segmentation():
    net = tiny()
    x = torch.zeros(1, 1, 4, 8, 8)
    y = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    x[..., 2:6, 1:4], y[..., 2:6, 1:4] = 1.0, 1
    x[..., 1:3, 5:7], y[..., 1:3, 5:7] = -1.0, 2
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        dice_loss(net(x), y).backward()
        opt.step()
    d = dice_per_class(net.predict(x), y, 3)
    assert (d > 0.95).all(), d


def test_dice_per_class_known_values():
    pred = torch.tensor([0, 1, 1, 2])
    target = torch.tensor([0, 1, 2, 2])
    d = dice_per_class(pred, target, 4)
    torch.testing.assert_close(d[:3], torch.tensor([1.0, 2 / 3, 2 / 3]))
    assert torch.isnan(d[3])
