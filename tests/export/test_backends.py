"""Export: the ONNX graph agrees with PyTorch, and sampling through ONNX Runtime matches eager."""

from __future__ import annotations

import pytest
import torch

from lad_fast.errors import BackendUnavailableError, ConfigError
from lad_fast.export.backends import make_denoiser

pytest.importorskip("onnxruntime")


class ToyDenoiser(torch.nn.Module):
    """net(x, t, cond, keep): a conv, a time embedding and a learned null condition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)
        self.temb = torch.nn.Embedding(50, 2)
        self.cond = torch.nn.Linear(5, 2)
        self.null = torch.nn.Parameter(torch.randn(2))

    def forward(self, x, t, cond, keep):
        c = keep[:, None] * self.cond(cond) + (1 - keep[:, None]) * self.null
        bias = (self.temb(t) + c)[:, :, None, None, None]
        return torch.nn.functional.silu(self.conv(x)) + bias


def example(b: int = 3):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(b, 2, 3, 4, 5, generator=g),
        torch.randint(0, 50, (b,), generator=g),
        torch.randn(b, 5, generator=g),
        torch.ones(b),
    ]


NAMES = ("x", "t", "cond", "keep")


def test_onnx_backend_matches_eager_with_a_new_batch_size(tmp_path):
    torch.manual_seed(0)
    net = ToyDenoiser()
    onnx = make_denoiser("onnx", net, example(1), NAMES, tmp_path)
    inputs = example(4)  # dynamic batch: exported at 1, run at 4
    inputs[3] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        ref = net(*inputs)
    torch.testing.assert_close(onnx(*inputs), ref, atol=1e-5, rtol=1e-5)
    assert len(list(tmp_path.glob("denoiser-*.onnx"))) == 1


def test_guided_ddim_through_onnx_equals_eager(tmp_path):
    from lad_fast.config import DiffusionConfig
    from lad_fast.diffusion.samplers import guided_denoiser, sample
    from lad_fast.diffusion.schedules import make_schedule

    torch.manual_seed(1)
    net = ToyDenoiser()
    sched = make_schedule(DiffusionConfig(timesteps=50))
    cond = (torch.randn(2, 5), torch.ones(2))
    null = (torch.zeros(2, 5), torch.zeros(2))
    out = {}
    for backend in ("torch", "onnx"):
        den = make_denoiser(backend, net, example(1), NAMES, tmp_path)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out[backend] = sample(
            "ddim", guided_denoiser(den, cond, null, 2.0), sched, (2, 3, 4, 5), gens, steps=8
        )
    torch.testing.assert_close(out["onnx"], out["torch"], atol=1e-4, rtol=1e-4)


class FlowToy(torch.nn.Module):
    """net(x, t, cond) with the U-Net's sinusoidal embedding of a continuous (float) time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)
        self.time = torch.nn.Linear(8, 2)
        self.cond = torch.nn.Linear(5, 2)

    def forward(self, x, t, cond):
        from lad_fast.models.blocks import timestep_embedding

        bias = (self.time(timestep_embedding(t, 8)) + self.cond(cond))[:, :, None, None, None]
        return torch.nn.functional.silu(self.conv(x)) + bias


def test_guided_flow_heun_through_onnx_equals_eager(tmp_path):
    from lad_fast.config import DiffusionConfig
    from lad_fast.diffusion.samplers import guided_denoiser, sample
    from lad_fast.diffusion.schedules import make_schedule

    torch.manual_seed(2)
    net = FlowToy()
    sched = make_schedule(DiffusionConfig(timesteps=50, objective="flow", flow_shift=3.0))
    # the flow samplers pass float time: the graph is exported with a float t (as generate does)
    ex = [torch.randn(1, 2, 3, 4, 5), torch.zeros(1, dtype=torch.float32), torch.randn(1, 5)]
    cond, null = (torch.randn(2, 5),), (torch.zeros(2, 5),)
    out = {}
    for backend in ("torch", "onnx"):
        den = make_denoiser(backend, net, ex, ("x", "t", "cond"), tmp_path)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out[backend] = sample(
            "heun", guided_denoiser(den, cond, null, 2.0), sched, (2, 3, 4, 5), gens, steps=4
        )
    torch.testing.assert_close(out["onnx"], out["torch"], atol=1e-4, rtol=1e-4)


def test_unknown_backend_is_named():
    with pytest.raises(
        ConfigError, match="unknown backend 'tensorflow'; choose one of: torch, compile, onnx, trt"
    ):
        make_denoiser("tensorflow", ToyDenoiser(), example(1), NAMES, "unused")


def test_trt_without_tensorrt_says_how_to_install_and_exports_nothing(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(
        BackendUnavailableError,
        match=r'TensorRT is not installed: pip install "lad-fast\[trt\]" \(TensorRT engines need Linux and '
        "an NVIDIA GPU with CUDA\\)",
    ):
        make_denoiser("trt", ToyDenoiser(), example(1), NAMES, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_missing_onnx_file_says_how_to_make_one(tmp_path):
    from lad_fast.export.onnx import OnnxDenoiser

    with pytest.raises(
        BackendUnavailableError,
        match=r"absent.onnx: no ONNX file; write one with `lad-fast export --run RUN` \(or "
        r"lad_fast.export.onnx.export_onnx\), or let `lad-fast generate --backend onnx` export",
    ):
        OnnxDenoiser(tmp_path / "absent.onnx")
