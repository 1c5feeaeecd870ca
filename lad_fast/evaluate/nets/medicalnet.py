"""MedicalNet (Med3D) 3D ResNet encoders, for FID/MMD features on CT.

Chen, Ma and Zheng, "Med3D: Transfer Learning for 3D Medical Image Analysis" (arXiv 1904.00625); the
pretrained weights are published by Tencent (github.com/Tencent/MedicalNet, files ``resnet_10.pth`` ...
``resnet_50.pth``). This module rebuilds the encoder part of that network with the same parameter names,
so the official checkpoints load unchanged (they were saved from ``nn.DataParallel``: keys start with
``module.``):

- stem: ``conv1`` 7x7x7 stride 2 (1 -> 64), ``bn1``, ReLU, 3x3x3 max-pool stride 2;
- ``layer1`` .. ``layer4`` with 64, 128, 256, 512 planes; ``layer2`` has stride 2, ``layer3`` and ``layer4``
  keep the resolution and use dilations 2 and 4 (Med3D trades stride for dilation for segmentation);
- BasicBlock (two 3x3x3 convolutions) for depths 10, 18, 34, Bottleneck (1-3-1, expansion 4) for 50;
- shortcut type as published: ``B`` (1x1x1 conv + BN, keys ``layerN.0.downsample.{0,1}``) for ResNet-10
  and ResNet-50, ``A`` (parameter-free: subsample, then zero-pad the channels) for ResNet-18 and -34.

The segmentation head of the checkpoints (``conv_seg``) is dropped: the encoder output (B, C, d, h, w)
is global-average-pooled to (B, C) features, C = 512 (depths 10-34) or 2048 (depth 50).
Inputs are (B, 1, D, H, W); MedicalNet was trained on volumes normalised to zero mean and unit variance,
which :func:`lad_fast.evaluate.features.make_extractor` applies per volume.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lad_fast.errors import ConfigError, InputError

# depth -> (block type, blocks per layer, shortcut type), as in MedicalNet's README and models/resnet.py
ARCHS: dict[int, tuple[str, tuple[int, int, int, int], str]] = {
    10: ("basic", (1, 1, 1, 1), "B"),
    18: ("basic", (2, 2, 2, 2), "A"),
    34: ("basic", (3, 4, 6, 3), "A"),
    50: ("bottleneck", (3, 4, 6, 3), "B"),
}

WEIGHTS_HELP = (
    "MedicalNet weights are not bundled and never downloaded: get resnet_10.pth ... resnet_50.pth from "
    "Tencent MedicalNet (github.com/Tencent/MedicalNet, 'pretrain' files linked in its README) and pass "
    "the file with --weights"
)


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: stride by subsampling, extra channels zero (MedicalNet type A)."""

    def __init__(self, cout: int, stride: int):
        super().__init__()
        self.cout, self.stride = cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        x = x[:, :, ::s, ::s, ::s]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.cout - x.shape[1]))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MedicalNet(nn.Module):
    """MedicalNet 3D ResNet encoder: (B, 1, D, H, W) -> (B, num_features) after global average pooling."""

    def __init__(self, depth: int):
        super().__init__()
        if depth not in ARCHS:
            raise ConfigError(f"MedicalNet depth must be one of {sorted(ARCHS)}, got {depth}")
        kind, counts, self.shortcut = ARCHS[depth]
        self.depth = depth
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self._cin = 64
        self.layer1 = self._layer(block, 64, counts[0], stride=1, dilation=1)
        self.layer2 = self._layer(block, 128, counts[1], stride=2, dilation=1)
        self.layer3 = self._layer(block, 256, counts[2], stride=1, dilation=2)
        self.layer4 = self._layer(block, 512, counts[3], stride=1, dilation=4)
        self.num_features = 512 * block.expansion

    def _layer(self, block: type, planes: int, count: int, stride: int, dilation: int) -> nn.Sequential:
        cout = planes * block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self._cin != cout:
            if self.shortcut == "A":
                downsample = _ShortcutA(cout, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self._cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout)
                )
        blocks = [block(self._cin, planes, stride, dilation, downsample)]
        self._cin = cout
        blocks += [block(cout, planes, 1, dilation, None) for _ in range(1, count)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3, 4))  # (B, C): global average pooling


def infer_depth(keys: list[str]) -> int:
    """Depth (10, 18, 34 or 50) from the parameter names of a state dict (``module.`` already stripped)."""
    if any(k.startswith("layer1.0.conv3.") for k in keys):
        return 50  # only Bottleneck blocks have a conv3
    counts = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    for depth, (kind, arch_counts, _) in ARCHS.items():
        if kind == "basic" and counts == arch_counts:
            return depth
    first = f"'{keys[0]}'" if keys else "none"
    raise InputError(
        f"MedicalNet weights: cannot tell the ResNet depth from the state dict (blocks per layer {counts}, "
        f"first key {first}); expected the official key layout of resnet_10/18/34/50.pth "
        "('module.conv1.weight', 'module.layer1.0.conv1.weight', ...), or pass the depth explicitly"
    )


def read_state_dict(path: Path, label: str, help_text: str) -> dict[str, torch.Tensor]:
    """The tensors of a local ``.pth`` (a bare state dict or ``{"state_dict": ...}``), loaded with
    ``weights_only=True``. ``label`` names the weights in messages; ``help_text`` says where to get them."""
    if not path.is_file():
        raise InputError(f"{label} weights file not found: {path}. {help_text}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise InputError(
            f"{label} weights {path} could not be read as a PyTorch state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). {help_text}"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # MedicalNet's files: {"state_dict": ..., ...}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"{label} weights {path} hold no state dict (a mapping of parameter names to tensors). "
            + help_text
        )
    return dict(obj)


def load_matching(
    net: nn.Module,
    state: dict[str, torch.Tensor],
    names: Mapping[str, str],
    path: Path,
    what: str,
    hint: str,
    prefix: str = "",
) -> None:
    """Load ``state`` into ``net`` only if its keys and shapes match exactly; else InputError naming the
    first missing key (as ``prefix`` + name: the official layout) and the first unexpected key (as
    ``names`` maps it back to the file). BatchNorm ``num_batches_tracked`` counters may be absent
    (PyTorch < 0.4.1 checkpoints; unused in eval)."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise InputError(
            f"weights {path} do not match {what}: first missing key {_quote(prefix, missing)}, first "
            f"unexpected key {_quote('', [names[k] for k in unexpected])} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected). {hint}"
        )
    bad = [k for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise InputError(
            f"weights {path}: {names[bad[0]]} has shape {tuple(state[bad[0]].shape)}, {what} expects "
            f"{tuple(expected[bad[0]].shape)}"
        )
    net.load_state_dict(state, strict=False)


def load_medicalnet(path: str | Path, depth: int | None = None) -> MedicalNet:
    """A MedicalNet encoder in eval mode with the weights of ``path`` (a local ``.pth``; never downloads).

    Accepts a bare state dict or ``{"state_dict": ...}``, keys with or without the ``module.`` prefix of
    the official files; the ``conv_seg`` head and BatchNorm ``num_batches_tracked`` counters are optional.
    ``depth`` (10, 18, 34, 50) is inferred from the keys when omitted.
    Raises InputError for a missing/unreadable file or a key layout that does not match, naming the first
    missing and the first unexpected key.
    """
    path = Path(path)
    raw = read_state_dict(path, "MedicalNet", WEIGHTS_HELP)
    names = {(k[len("module.") :] if k.startswith("module.") else k): k for k in raw}
    state = {k: raw[o] for k, o in names.items() if not k.startswith("conv_seg.")}
    net = MedicalNet(depth if depth is not None else infer_depth(list(state)))
    what = f"MedicalNet ResNet-{net.depth} (shortcut {net.shortcut})"
    hint = f"Pass the official resnet_{net.depth}.pth state dict, or the matching depth"
    load_matching(net, state, names, path, what, hint, prefix="module.")
    return net.eval()


def _quote(prefix: str, keys: list[str]) -> str:
    """The first key, quoted (missing keys are named in the official ``module.`` layout)."""
    return f"'{prefix}{keys[0]}'" if keys else "none"
