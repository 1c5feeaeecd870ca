"""Pretrained weights into the fine-tuning segmenter: every weight accounted for, and nothing else moved."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lad_fast.config import SegmenterConfig, get_preset
from lad_fast.data.labels import NUM_CLASSES
from lad_fast.errors import CheckpointError
from lad_fast.models.segmenter import Segmenter
from lad_fast.ssl.network import SSLNet, transfer_weights

CFG = SegmenterConfig(channels=(8, 16, 32), groups=4)
SSL_HEADS = {"body.head.weight", "body.head.bias", "rotation.weight", "rotation.bias"}


def test_every_pretrained_and_every_segmenter_weight_is_accounted_for():
    torch.manual_seed(0)
    ssl = SSLNet(CFG, impl="torch")
    pretrained = ssl.state_dict()
    seg = Segmenter(CFG, NUM_CLASSES, impl="torch")
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    t = transfer_weights(pretrained, seg, "test")
    keys = set(seg.state_dict())
    # a partition of the segmenter's keys, and of the pretrained keys
    assert set(t.loaded) | set(t.fresh) == keys and not set(t.loaded) & set(t.fresh)
    assert {"body." + k for k in t.loaded} | set(t.unused) == set(pretrained)
    assert set(t.fresh) == {"head.weight", "head.bias"} and set(t.unused) == SSL_HEADS
    # the encoder is all there: stem and every down block and pooling
    assert {k for k in keys if k.startswith(("stem.", "down.", "pool."))} <= set(t.loaded)
    after = seg.state_dict()
    for k in t.loaded:
        assert torch.equal(after[k], pretrained["body." + k]), k
    for k in t.fresh:
        assert torch.equal(after[k], before[k]), k
    # the network runs with the transferred weights
    assert seg(torch.zeros(1, 1, 4, 8, 8)).shape == (1, NUM_CLASSES, 4, 8, 8)


def test_another_architecture_is_refused_with_the_key_and_shapes():
    pretrained = SSLNet(SegmenterConfig(channels=(8, 16), groups=4), impl="torch").state_dict()
    with pytest.raises(CheckpointError, match=r"another segmenter architecture \(down\.2\..*missing"):
        transfer_weights(pretrained, Segmenter(CFG, NUM_CLASSES, impl="torch"), "runs/x")
    wider = SSLNet(SegmenterConfig(channels=(16, 16, 32), groups=4), impl="torch").state_dict()
    with pytest.raises(
        CheckpointError, match=r"stem\.weight: shape \(16, 1, 3, 3, 3\).*needs \(8, 1, 3, 3, 3\)"
    ):
        transfer_weights(wider, Segmenter(CFG, NUM_CLASSES, impl="torch"), "runs/x")


def test_a_checkpoint_of_another_model_is_not_taken_for_ssl_weights():
    seg_state = Segmenter(CFG, NUM_CLASSES, impl="torch").state_dict()
    with pytest.raises(CheckpointError, match="not an SSL pretraining checkpoint"):
        transfer_weights(seg_state, Segmenter(CFG, NUM_CLASSES, impl="torch"), "runs/seg")


def test_none_and_pretrained_starts_differ_only_in_the_transferred_weights():
    from lad_fast.train.ssl import initial_segmenter

    cfg = replace(get_preset("tiny"), segmenter=CFG)
    torch.manual_seed(123)
    pretrained = SSLNet(CFG, impl="torch").state_dict()
    fresh, none = initial_segmenter(cfg, seed=7, pretrained=None)
    warm, t = initial_segmenter(cfg, seed=7, pretrained=pretrained)
    assert none is None and t is not None
    a, b = fresh.state_dict(), warm.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in t.fresh)
    assert all(torch.equal(b[k], pretrained["body." + k]) for k in t.loaded)
    convs = [k for k in t.loaded if k.endswith("weight") and a[k].ndim == 5]
    assert convs and all(not torch.equal(a[k], b[k]) for k in convs)  # other draws: the start moved


def test_encoder_transfer_leaves_the_decoder_fresh():
    """``transfer="encoder"`` (Swin UNETR's choice): stem, down blocks and pooling take the pretrained
    weights; every decoder weight keeps the seed's initial value and its pretrained value is unused."""
    torch.manual_seed(0)
    pretrained = SSLNet(CFG, impl="torch").state_dict()
    seg = Segmenter(CFG, NUM_CLASSES, impl="torch")
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    t = transfer_weights(pretrained, seg, "test", transfer="encoder")
    keys = set(seg.state_dict())
    encoder = {k for k in keys if k.startswith(("stem.", "down.", "pool."))}
    assert set(t.loaded) == encoder
    assert set(t.fresh) == keys - encoder and any(k.startswith("up.") for k in t.fresh)
    assert {"body." + k for k in t.loaded} | set(t.unused) == set(pretrained)
    after = seg.state_dict()
    for k in t.fresh:
        assert torch.equal(after[k], before[k]), k
    for k in t.loaded:
        assert torch.equal(after[k], pretrained["body." + k]), k


def test_an_unknown_transfer_mode_is_refused():
    from lad_fast.errors import ConfigError

    pretrained = SSLNet(CFG, impl="torch").state_dict()
    with pytest.raises(ConfigError, match="--transfer must be one of all, encoder, got 'decoder'"):
        transfer_weights(pretrained, Segmenter(CFG, NUM_CLASSES, impl="torch"), "x", transfer="decoder")
