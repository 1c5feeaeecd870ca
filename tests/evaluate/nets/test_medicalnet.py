from __future__ import annotations

import pytest
import torch

from lad_fast.errors import ConfigError, InputError
from lad_fast.evaluate.nets.medicalnet import MedicalNet, infer_depth, load_medicalnet


def official_state_dict(depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the layout of MedicalNet's resnet_<depth>.pth: DataParallel ``module.`` keys,
    including the segmentation head ``conv_seg`` that the encoder drops."""
    torch.manual_seed(seed)
    net = MedicalNet(depth)
    state = {
        f"module.{k}": torch.randn_like(v) if v.is_floating_point() else v
        for k, v in net.state_dict().items()
    }
    state["module.conv_seg.0.weight"] = torch.randn(512 * (4 if depth == 50 else 1), 32, 2, 2, 2)
    state["module.conv_seg.4.weight"] = torch.randn(32, 32, 3, 3, 3)
    return state


@pytest.mark.parametrize("depth", [10, 50])
def test_loads_the_official_key_layout_and_infers_the_depth(tmp_path, depth):
    state = official_state_dict(depth)
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": state, "epoch": 200}, path)
    net = load_medicalnet(path)
    assert net.depth == depth and not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[f"module.{k}"]), k
    x = torch.randn(2, 1, 8, 16, 16)
    assert net(x).shape == (2, net.num_features)
    assert net.num_features == (2048 if depth == 50 else 512)


def test_a_bare_state_dict_without_the_prefix_and_counters_loads(tmp_path):
    state = {k[len("module.") :]: v for k, v in official_state_dict(10).items() if "num_batches" not in k}
    torch.save(state, tmp_path / "w.pth")
    assert load_medicalnet(tmp_path / "w.pth", depth=10).depth == 10


def test_key_names_and_shortcut_types_follow_the_official_code():
    # Facts of MedicalNet's models/resnet.py + README: type B shortcuts (1x1x1 conv + BN) for 10 and 50,
    # parameter-free type A for 18 and 34; Bottleneck expansion 4; a 7^3 stride-2 stem on one channel.
    s10, s18, s50 = (MedicalNet(d).state_dict() for d in (10, 18, 50))
    assert s10["conv1.weight"].shape == (64, 1, 7, 7, 7)
    assert s10["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1, 1)
    assert "layer1.0.downsample.0.weight" not in s10
    assert not any("downsample" in k for k in s18)
    assert s50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1, 1)
    assert s50["layer4.0.downsample.1.running_var"].shape == (2048,)
    assert s50["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1, 1)
    assert "layer4.2.conv3.weight" in s50 and "layer4.3.conv1.weight" not in s50


@pytest.mark.parametrize("depth,published", [(10, 14.36), (18, 32.99), (34, 63.31), (50, 46.21)])
def test_parameter_counts_match_the_published_table(depth, published):
    # MedicalNet's README lists parameters (M) per network; the encoder alone lands within 0.06 M of them.
    count = sum(p.numel() for p in MedicalNet(depth).parameters()) / 1e6
    assert abs(count - published) < 0.06


def test_type_a_shortcut_subsamples_and_zero_pads():
    net = MedicalNet(18)
    short = net.layer2[0].downsample
    x = torch.randn(1, 64, 5, 6, 7)
    y = short(x)
    assert y.shape == (1, 128, 3, 3, 4)
    assert torch.equal(y[:, :64], x[:, :, ::2, ::2, ::2]) and not y[:, 64:].any()


def test_wrong_layout_names_first_missing_and_first_unexpected_key(tmp_path):
    state = official_state_dict(10)
    del state["module.bn1.weight"]
    state["module.fc.weight"] = torch.randn(3, 512)
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    with pytest.raises(
        InputError,
        match=r"first missing key 'module.bn1.weight', first unexpected key "
        r"'module.fc.weight' \(1 missing, 1 unexpected\)",
    ):
        load_medicalnet(tmp_path / "w.pth")


def test_a_depth_that_does_not_match_the_file_is_refused_by_key(tmp_path):
    torch.save({"state_dict": official_state_dict(10)}, tmp_path / "w.pth")
    with pytest.raises(
        InputError, match=r"ResNet-18 \(shortcut A\): first missing key 'module.layer1.1.conv1"
    ):
        load_medicalnet(tmp_path / "w.pth", depth=18)


def test_wrong_shape_is_named(tmp_path):
    state = official_state_dict(10)
    state["module.conv1.weight"] = torch.randn(64, 3, 7, 7, 7)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(
        InputError,
        match=r"module.conv1.weight has shape \(64, 3, 7, 7, 7\), MedicalNet ResNet-10 \(shortcut B\) "
        r"expects \(64, 1,",
    ):
        load_medicalnet(tmp_path / "w.pth")


def test_missing_file_says_where_to_get_the_weights(tmp_path):
    with pytest.raises(
        InputError, match=r"not found: .*nope.pth.*never downloaded.*Tencent MedicalNet.*--weights"
    ):
        load_medicalnet(tmp_path / "nope.pth")


def test_unreadable_or_non_state_dict_files_are_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="could not be read as a PyTorch state dict"):
        load_medicalnet(tmp_path / "junk.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(InputError, match="hold no state dict"):
        load_medicalnet(tmp_path / "list.pth")


def test_depth_inference_and_bad_depths():
    assert infer_depth(list(MedicalNet(34).state_dict())) == 34
    with pytest.raises(InputError, match=r"cannot tell the ResNet depth .*\(1, 1, 1, 0\), first key 'layer1"):
        infer_depth(["layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer3.0.conv1.weight"])
    with pytest.raises(ConfigError, match=r"depth must be one of \[10, 18, 34, 50\], got 101"):
        MedicalNet(101)


def test_a_foreign_state_dict_is_refused_by_its_first_key(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "w.pth")
    with pytest.raises(
        InputError, match=r"cannot tell the ResNet depth .*first key 'encoder.weight'.*module.conv1"
    ):
        load_medicalnet(tmp_path / "w.pth")
