"""RadImageNet ResNet-50 (2D), for MAISI-style 2.5D features of CT volumes.

Mei et al., "RadImageNet: An Open Radiologic Deep Learning Research Dataset for Effective Transfer
Learning" (Radiology: AI 2022) published Keras weights; MAISI (and MONAI's generative tutorials) use the
PyTorch port ``RadImageNet-ResNet50_notop.pth`` of github.com/Warvito/radimagenet-models. This module
rebuilds that port's network with the same parameter names, so its state dict loads unchanged. It is
Keras' ResNet50 ("v1"), which differs from torchvision's: every convolution has a bias, the stride of
a downsampling bottleneck sits on its first 1x1 convolution, BatchNorm eps is 1.001e-5.

Keys: ``conv1.{weight,bias}``, ``bn1.*``, ``layer{1..4}.{i}.conv{1,2,3}.{weight,bias}``,
``layer{1..4}.{i}.bn{1,2,3}.*``, ``layer{1..4}.0.downsample.{0,1}.*``; 3, 4, 6, 3 blocks.
Input (B, 3, H, W), output (B, 2048) after global average pooling ("notop": no classifier).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.evaluate.nets.medicalnet import load_matching, read_state_dict

WEIGHTS_HELP = (
    "RadImageNet weights are not bundled and never downloaded: get RadImageNet-ResNet50_notop.pth (the "
    "PyTorch port in github.com/Warvito/radimagenet-models that MAISI uses) and pass the file with --weights"
)
BN_EPS = 1.001e-5  # Keras' default


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, stride=stride)  # Keras v1: the stride is on the 1x1
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1)
        self.bn3 = _bn(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RadImageNetResNet50(nn.Module):
    """(B, 3, H, W) -> (B, 2048): RadImageNet's ResNet-50 without its classifier, globally pooled."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = _bn(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._cin = 64
        self.layer1 = self._layer(64, 3, stride=1)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 6, stride=2)
        self.layer4 = self._layer(512, 3, stride=2)

    def _layer(self, planes: int, count: int, stride: int) -> nn.Sequential:
        # every layer's first block changes the width (64 -> 256 in layer1), so it always has a projection
        down = nn.Sequential(nn.Conv2d(self._cin, planes * 4, 1, stride=stride), _bn(planes * 4))
        blocks = [Bottleneck(self._cin, planes, stride, down)]
        self._cin = planes * 4
        blocks += [Bottleneck(self._cin, planes, 1, None) for _ in range(1, count)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def load_radimagenet(path: str | Path) -> RadImageNetResNet50:
    """The RadImageNet ResNet-50 in eval mode with the weights of ``path`` (a local ``.pth``; never
    downloads). Raises InputError for a missing/unreadable file or a key layout that does not match,
    naming the first missing and the first unexpected key."""
    path = Path(path)
    state = read_state_dict(path, "RadImageNet", WEIGHTS_HELP)
    net = RadImageNetResNet50()
    hint = "Pass RadImageNet-ResNet50_notop.pth (the PyTorch port MAISI loads)"
    load_matching(net, state, {k: k for k in state}, path, "the RadImageNet ResNet-50", hint)
    return net.eval()
