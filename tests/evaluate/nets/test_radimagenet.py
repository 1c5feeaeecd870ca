from __future__ import annotations

import pytest
import torch

from lad_fast.errors import InputError
from lad_fast.evaluate.nets.radimagenet import RadImageNetResNet50, load_radimagenet


def test_parameter_counts_are_keras_resnet50_without_top():
    # keras.applications.ResNet50(include_top=False): 23,534,592 trainable weights and 53,120
    # non-trainable ones (the BatchNorm moving means and variances)
    net = RadImageNetResNet50()
    assert sum(p.numel() for p in net.parameters()) == 23_534_592
    assert sum(b.numel() for k, b in net.named_buffers() if "running" in k) == 53_120


def test_keras_v1_layout_biases_and_strides():
    net = RadImageNetResNet50()
    sd = net.state_dict()
    assert sd["conv1.bias"].shape == (64,) and sd["layer1.0.downsample.0.bias"].shape == (256,)
    assert sd["layer2.0.conv1.weight"].shape == (128, 256, 1, 1)
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    assert net.bn1.eps == pytest.approx(1.001e-5)
    assert "layer4.2.conv3.weight" in sd and "layer4.3.conv1.weight" not in sd and "fc.weight" not in sd
    assert net(torch.randn(2, 3, 16, 40)).shape == (2, 2048)


def test_loads_the_port_state_dict_and_refuses_a_torchvision_one(tmp_path):
    torch.manual_seed(0)
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in RadImageNetResNet50().state_dict().items()
    }
    torch.save(state, tmp_path / "RadImageNet-ResNet50_notop.pth")
    net = load_radimagenet(tmp_path / "RadImageNet-ResNet50_notop.pth")
    assert not net.training and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    tv = {k: v for k, v in state.items() if k != "conv1.bias"} | {"fc.weight": torch.zeros(1000, 2048)}
    torch.save(tv, tmp_path / "tv.pth")
    with pytest.raises(
        InputError,
        match=r"do not match the RadImageNet ResNet-50: first missing key 'conv1.bias', first unexpected key "
        r"'fc.weight' \(1 missing, 1 unexpected\)\. Pass RadImageNet-ResNet50_notop.pth",
    ):
        load_radimagenet(tmp_path / "tv.pth")


def test_missing_file_says_where_to_get_the_weights(tmp_path):
    with pytest.raises(InputError, match=r"RadImageNet weights file not found: .*never downloaded.*Warvito"):
        load_radimagenet(tmp_path / "nope.pth")
