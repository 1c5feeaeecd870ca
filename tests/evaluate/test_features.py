from __future__ import annotations

import pytest
import torch

from lad_fast.config import SegmenterConfig
from lad_fast.errors import ConfigError, InputError
from lad_fast.evaluate.features import FeatureExtractor, make_extractor, state_dict_hash
from lad_fast.evaluate.nets.medicalnet import MedicalNet
from lad_fast.evaluate.nets.radimagenet import RadImageNetResNet50
from lad_fast.models.segmenter import Segmenter


def segmenter(seed: int = 0) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(SegmenterConfig(channels=(8, 16), groups=4), num_classes=3)


def volumes(b: int = 5, shape: tuple[int, int, int] = (8, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_segmenter_features_pool_and_concatenate_every_encoder_scale():
    net = segmenter()
    ext = make_extractor("segmenter", segmenter=net, batch_size=2)
    assert isinstance(ext, FeatureExtractor) and ext.name == "segmenter"
    x = volumes()
    feats = ext(x)
    assert feats.shape == (5, 8 + 16) and feats.dtype == torch.float32 and not feats.requires_grad
    with torch.no_grad():
        want = torch.cat([f.mean(dim=(2, 3, 4)) for f in net.encoder_features(x)], 1)
    torch.testing.assert_close(feats, want)
    # batching does not change a volume's features
    torch.testing.assert_close(make_extractor("segmenter", segmenter=net, batch_size=5)(x), feats)


def test_segmenter_weights_hash_follows_the_weights():
    a = make_extractor("segmenter", segmenter=segmenter(0)).weights_hash
    assert a == make_extractor("segmenter", segmenter=segmenter(0)).weights_hash
    assert a != make_extractor("segmenter", segmenter=segmenter(1)).weights_hash
    assert len(a) == 16 and a == state_dict_hash(segmenter(0))


@pytest.fixture(scope="module")
def medicalnet_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = MedicalNet(10)
    for m in net.modules():  # non-trivial BN statistics, so that the input normalisation matters
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("medicalnet") / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


def test_medicalnet_features_and_name(medicalnet_weights):
    ext = make_extractor("medicalnet", weights=medicalnet_weights, batch_size=3)
    assert ext.name == "medicalnet-resnet10" and len(ext.weights_hash) == 16
    x = volumes(4)
    feats = ext(x)
    assert feats.shape == (4, 512) and torch.isfinite(feats).all()
    # per-volume zero mean / unit std first: an intensity rescaling of a volume changes nothing
    torch.testing.assert_close(ext(3 * x + 0.5), feats, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ext(x.flip(-1)), feats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extractors_on_cuda_match_the_cpu(medicalnet_weights, radimagenet):
    x = volumes(3)
    cases = [
        ("segmenter", {"segmenter": segmenter()}),
        ("medicalnet", {"weights": medicalnet_weights}),
        ("radimagenet-2.5d", {"weights": radimagenet[0]}),
    ]
    for name, kw in cases:
        cpu = make_extractor(name, **kw)(x)
        gpu = make_extractor(name, device="cuda", **kw)(x)
        assert gpu.device.type == "cpu"  # features come back to the caller's side
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_medicalnet_without_weights_says_where_to_get_them():
    with pytest.raises(ConfigError, match=r"needs a weights file.*Tencent MedicalNet.*--weights"):
        make_extractor("medicalnet")


def test_other_names_and_arguments_are_refused():
    with pytest.raises(
        ConfigError, match=r"radimagenet-2.5d feature extractor needs a weights file.*Warvito"
    ):
        make_extractor("radimagenet-2.5d")
    with pytest.raises(ConfigError, match="unknown feature extractor 'inception'; choose one of segmenter"):
        make_extractor("inception")
    with pytest.raises(ConfigError, match="needs a trained lad-fast segmenter"):
        make_extractor("segmenter")
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        make_extractor("segmenter", segmenter=segmenter(), batch_size=0)


@pytest.fixture(scope="module")
def radimagenet(tmp_path_factory):
    torch.manual_seed(0)
    net = RadImageNetResNet50()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("radimagenet") / "RadImageNet-ResNet50_notop.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_radimagenet_2p5d_averages_every_slice_of_the_three_planes(radimagenet):
    path, net = radimagenet
    ext = make_extractor("radimagenet-2.5d", weights=path, batch_size=2)
    assert ext.name == "radimagenet-2.5d" and len(ext.weights_hash) == 16
    x = volumes(3, shape=(4, 8, 6))
    feats = ext(x)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all()
    # the protocol written out for volume 1: min-max to [0, 1], 3 channels minus the BGR means,
    # mean over each plane's slices, then over the planes
    v = x[1, 0]
    v = (v - v.min()) / (v.max() - v.min())
    mean = torch.tensor([0.406, 0.456, 0.485]).view(1, 3, 1, 1)

    def one(img: torch.Tensor) -> torch.Tensor:  # one slice (h, w) -> (2048,)
        with torch.no_grad():
            return net(img.expand(1, 3, -1, -1) - mean)[0]

    planes = [
        [one(v[i]) for i in range(4)],
        [one(v[:, j]) for j in range(8)],
        [one(v[:, :, k]) for k in range(6)],
    ]
    want = torch.stack([torch.stack(p).mean(0) for p in planes]).mean(0)
    torch.testing.assert_close(feats[1], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ext(2 * x + 0.3), feats, rtol=1e-4, atol=1e-5)  # min-max: scale-free


def test_extractors_take_single_channel_volumes_only():
    ext = make_extractor("segmenter", segmenter=segmenter())
    with pytest.raises(InputError, match=r"expected volumes \(B, 1, D, H, W\), got \(2, 8, 16, 16\)"):
        ext(torch.zeros(2, 8, 16, 16))


def test_the_evaluation_library_does_not_import_monai():
    # MONAI is a test dependency (the metrics' oracle), never a runtime one
    import subprocess
    import sys

    code = (
        "import sys, lad_fast.evaluate.metrics, lad_fast.evaluate.features; "
        "import lad_fast.evaluate.nets.medicalnet; "
        "sys.exit(int(any(m.split('.')[0] == 'monai' for m in sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
