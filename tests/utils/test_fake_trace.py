"""The tracer behind ``lad-fast plan``: live bytes and their peak, FLOPs against hand counts, and the
assumptions for data-dependent ops; the GPU table and the roofline time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lad_fast.errors import ConfigError
from lad_fast.generate.plan import tracing
from lad_fast.models.blocks import AttentionBlock3d
from lad_fast.utils.fake_trace import TensorTracker, conv_flops, fake_mode
from lad_fast.utils.gpu_specs import GPUS, GiB, parse_gpu, roofline_seconds

MiB = 2**20


def test_live_bytes_peak_and_categories_on_real_tensors():
    tracker = TensorTracker()
    kept = torch.zeros(1000)  # made before: counted only once tracked
    tracker.track([kept], "weights")
    with tracker, tracker.category("activations"):
        a = torch.empty(MiB // 4)  # 1 MiB of float32
        view = a.view(2, -1)  # a view: no new bytes
        b = torch.ones(2 * MiB // 4)
        assert tracker.live == 4000 + 3 * MiB
        del a, view, b  # freed: off the live total, the peak stays
        c = torch.empty(MiB // 8, dtype=torch.float64)
    assert tracker.live == 4000 + MiB
    assert tracker.trace.peak == 4000 + 3 * MiB
    assert tracker.trace.peak_by == {"weights": 4000, "activations": 3 * MiB}
    assert tracker.trace.block_peaks["activations"][0] == 4000 + 3 * MiB
    tracker.retag([c], "gradients")
    assert tracker._by["gradients"] == MiB and tracker._by["activations"] == 0
    del c
    assert tracker.live == 4000


def test_fake_tensors_are_traced_like_real_ones():
    def step(x: torch.Tensor, w: torch.Tensor) -> None:
        y = F.conv3d(x, w, padding=1).relu()
        y.sum().backward()

    real = TensorTracker()
    x, w = torch.randn(2, 4, 6, 6, 6), torch.randn(8, 4, 3, 3, 3, requires_grad=True)
    with real:
        step(x, w)
    with fake_mode():
        xf, wf = torch.randn(2, 4, 6, 6, 6), torch.randn(8, 4, 3, 3, 3, requires_grad=True)
        fake = TensorTracker()
        with fake:
            step(xf, wf)
    assert fake.trace.peak == real.trace.peak > 0
    assert fake.trace.flops == real.trace.flops > 0
    assert fake.trace.ops == real.trace.ops


@pytest.mark.parametrize("gpu", [True, False], ids=["triton-op", "aten"])
def test_conv3d_flops_match_a_hand_count(gpu):
    """2 FLOPs per multiply-add: N * O * D' H' W' output values, each C * kd kh kw multiply-adds; the
    backward's input and weight gradients cost one forward each."""
    from lad_fast.kernels import conv3d

    n, c, o, d, h, w = 2, 8, 16, 6, 10, 12
    hand = 2 * n * o * (d * h * w) * c * 27
    with tracing(gpu):
        x = torch.zeros(n, c, d, h, w, requires_grad=True)
        weight = torch.zeros(o, c, 3, 3, 3, requires_grad=True)
        fwd = TensorTracker()
        with fwd:
            y = conv3d(x, weight, None, padding=1)
        bwd = TensorTracker()
        with bwd:
            y.sum().backward()
    assert conv_flops(x.shape, weight.shape, y.shape) == hand
    assert fwd.trace.flops == hand
    assert bwd.trace.flops == 2 * hand
    assert ("lad_fast::conv3d" in fwd.trace.ops) == gpu


@pytest.mark.parametrize("gpu", [True, False], ids=["triton-op", "sdpa"])
def test_attention_layer_flops_match_a_hand_count(gpu):
    """An attention block over L = D H W tokens of C channels: the q, k, v projection (C -> 3 h d), the
    scores q k^T and their product with v (2 B h L^2 d each), and the output projection (h d -> C)."""
    b, ch, heads, hd, side = 2, 32, 4, 16, 4
    seq = side**3
    hand = (
        2 * b * seq * ch * 3 * heads * hd  # qkv
        + 2 * 2 * b * heads * seq * seq * hd  # q k^T and p v
        + 2 * b * seq * heads * hd * ch  # proj
    )
    with tracing(gpu), torch.no_grad():
        with torch.device("meta"):
            block = AttentionBlock3d(ch, heads, hd, groups=8)
        from lad_fast.generate.plan import fake_module

        fake_module(block)
        x = torch.zeros(b, ch, side, side, side)
        tracker = TensorTracker()
        with tracker:
            block(x)
    assert tracker.trace.flops == hand
    assert ("lad_fast::attention_fwd" in tracker.trace.ops) == gpu


def test_data_dependent_ops_take_their_largest_outcome():
    with fake_mode():
        labels = torch.zeros(100, dtype=torch.long)
        mask = torch.zeros(4, 5, dtype=torch.bool)
        values = torch.zeros(4, 5, 3)
        tracker = TensorTracker()
        with tracker:
            counts = torch.bincount(labels, minlength=7)
            picked = values[mask]
            taken = bool(mask.any())
            selected = torch.masked_select(values[..., 0], mask)
    assert counts.shape == (7,)
    assert picked.shape == (20, 3)  # every element of the mask true
    assert taken is True
    assert selected.shape == (20,)
    assert set(tracker.trace.assumed) >= {"bincount", "index", "_local_scalar_dense", "masked_select"}


def test_an_unknown_data_dependent_op_is_named():
    with fake_mode():
        x = torch.zeros(10)
        with (
            pytest.raises(
                NotImplementedError,
                match=r"cannot run aten._unique2.default .*depends on tensor values.*TensorTracker._assume",
            ),
            TensorTracker(),
        ):
            torch.unique(x, sorted=False)


def test_gpu_names_sizes_and_refusal():
    assert parse_gpu("H100") is GPUS["h100"]
    assert parse_gpu("24").memory == 24 * GiB and parse_gpu("24").bf16 is None
    assert parse_gpu("12.5GiB").memory == int(12.5 * GiB)
    for bad in ("b200", "-3", "nan", "0"):
        with pytest.raises(ConfigError, match=r"--gpu .*give one of a100-40, .* or a memory size in GiB"):
            parse_gpu(bad)


def test_roofline_takes_each_op_at_its_bound():
    gpu = GPUS["h100"]
    math_bound, memory_bound = (int(gpu.bf16), 0), (0, int(gpu.bandwidth))  # one second each at peak
    assert roofline_seconds([math_bound, memory_bound], gpu, efficiency=False) == pytest.approx(2.0)
    assert roofline_seconds([(int(gpu.bf16), int(gpu.bandwidth))], gpu, efficiency=False) == pytest.approx(
        1.0
    )
    assert roofline_seconds([math_bound], gpu) == pytest.approx(1 / 0.4)
    assert roofline_seconds([math_bound], parse_gpu("24")) is None
